"""F3: the FLOPs-per-token formula behind MFU, checked against PyTorch's FLOP counter."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from zerokit.metrics import model_flops_per_token
from zerokit.models import build_causal_lm


def counted_flops_per_token(model, batch: int, seq: int, vocab: int = 512) -> float:
    """Forward + backward FLOPs per token of a language-model step, as PyTorch's FlopCounterMode counts them."""
    ids = torch.randint(0, vocab, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    return counter.get_total_flops() / (batch * seq)


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
def test_formula_matches_flop_counter(preset):
    seq, batch = 128, 2
    model = build_causal_lm(preset, None, vocab_size=512, block_size=seq, dropout=0.0)
    # Eager attention: the counter does not see inside CPU SDPA kernels; the FLOPs are the same.
    model.set_attn_implementation("eager")
    measured = counted_flops_per_token(model, batch, seq)
    # Both count the full T x T score and value products (no causal-mask discount).
    predicted = model_flops_per_token(model, seq)
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)
