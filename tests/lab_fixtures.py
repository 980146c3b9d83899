"""Fixtures and model shapes the lab's tests share (test_memory, test_planner, test_verify, ...).
Import the fixtures by name: `from lab_fixtures import one_thread, verify_model_dir`."""
import pytest
import torch
from transformers import GPT2Config, LlamaConfig

# The 7B Llama shape of the planning examples (meta-device only: nothing this size is allocated).
LLAMA_7B = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096)
# 2 blocks, 256 wide, vocab 2048: 2.1M params. Big enough that ZeRO-3 partitions most tensors and
# activations, logits and model states all matter; real 2-rank CPU steps take a fraction of a second.
VERIFY_SEQ = 128


def small_gpt2(n_layer=2, n_embd=128, n_head=4, n_positions=128, vocab_size=1024, attn=None) -> GPT2Config:
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions, vocab_size=vocab_size,
                     bos_token_id=0, eos_token_id=0)
    if attn:
        cfg._attn_implementation = attn
    return cfg


@pytest.fixture(autouse=True, scope="module")  # autouse in every module that imports it
def one_thread():
    # Tiny ops on a shared 2-core box: a second OpenMP thread only spins (3-5x slower under load).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def verify_model_dir(tmp_path_factory):
    """A folder with config.json of the 2.1M-parameter GPT that real-step tests run (`zerokit verify`)."""
    path = tmp_path_factory.mktemp("verify_model")
    small_gpt2(n_embd=256, n_positions=VERIFY_SEQ, vocab_size=2048).save_pretrained(path)
    return str(path)
