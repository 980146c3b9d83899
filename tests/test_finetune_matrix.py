"""The fine-tuning compatibility matrix: {full, LoRA, QLoRA} x {single process, ZeRO-2, ZeRO-3, FSDP},
each cell a real recipe run (train, evaluate with generation, checkpoint, export) on tiny models.

A cell passes when its run finishes and trains the same numbers as one process: per-step losses
within 1e-4 (relative) of the single-process run of the same mode (dropout off, same global batch),
and the exported merged model gives the logits of base + adapter within 1e-5 (fp32). All 2-rank
cells of a recipe run in one torchrun launch (tests/workers/run_recipe_many.py); the single-process
cells run in this process. Summarisation evaluation under ZeRO-3 / FSDP generates for 5 dialogues
of different lengths on 2 ranks (3 + 2: rank 1 runs a throw-away batch), so a hang would show here.
"""
import json
import signal
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast)

from launch_util import REPO, launcher, losses, run
from zerokit.config import load_config

MODES = ("none", "lora", "qlora")
ENGINES = {"single": None, "zero2": "ds_config=ds_configs/zero2.json", "zero3": "ds_config=ds_configs/zero3.json",
           "fsdp": "fsdp=full_shard"}
STEPS = 4
GLOBAL_BATCH = 4


def _common() -> list[str]:
    return [f"train.max_steps={STEPS}", "train.log_every=1", "train.warmup_steps=1", "train.eval_every=0",
            f"train.checkpoint_every={STEPS}", "resume=none", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0",
            "lr_auto.none=1e-3", "lr_auto.lora=1e-2", "lr_auto.qlora=1e-2"]


def _summ(root: Path, tiny: Path) -> list[str]:
    return [*_common(), f"model.name_or_path={tiny}", f"data.train={root / 'ds_train.jsonl'}",
            f"data.validation={root / 'ds_dev.jsonl'}", "data.max_length=128", "data.max_target_length=24",
            "eval.max_new_tokens=6", "eval.batch_size=2"]


def _sent(root: Path, tiny: Path) -> list[str]:
    return [*_common(), f"model.name_or_path={tiny}", f"data.train={root / 'sst_train.tsv'}",
            f"data.validation={root / 'sst_dev.tsv'}", "data.max_length=32", "data.eval_batch_size=4"]


def _tiny_models(root: Path, data_dir: Path) -> dict:
    """A 64-wide Llama (bitsandbytes' 4-bit blocks are 64) with a BPE trained on DialogSum, and a
    64-wide BERT classifier with MiniLM's tokenizer, saved like exported models."""
    recs = [json.loads(line) for line in (data_dir / "dialogsum" / "train.jsonl").read_text().splitlines()[:300]]
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator((r["dialogue"] + "\n" + r["summary"] for r in recs),
                          trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>", "<pad>"],
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    from zerokit.finetuning import resolve_model_path
    mtok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    BertForSequenceClassification(BertConfig(vocab_size=mtok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=128, max_position_embeddings=64,
                                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
                                  ).save_pretrained(root / "bert")
    mtok.save_pretrained(root / "bert")
    from zerokit.models import warm_start
    torch.manual_seed(0)  # the new cross-attention weights
    warm_start(str(root / "bert"), root / "bert2bert", kind="seq2seq")
    # Data: 5 validation dialogues of different lengths; 16 training examples (4 steps x 4).
    lines = (data_dir / "dialogsum" / "train.jsonl").read_text().splitlines()
    (root / "ds_train.jsonl").write_text("\n".join(lines[:16]) + "\n")
    (root / "ds_dev.jsonl").write_text("\n".join((data_dir / "dialogsum" / "dev.jsonl").read_text().splitlines()[:5]) + "\n")
    sst = (data_dir / "sst2" / "train_full.tsv").read_text().splitlines()
    (root / "sst_train.tsv").write_text("\n".join(sst[:17]) + "\n")
    (root / "sst_dev.tsv").write_text("\n".join((data_dir / "sst2" / "dev.tsv").read_text().splitlines()[:10]) + "\n")
    return {"llama": root / "llama", "bert": root / "bert", "bert2bert": root / "bert2bert"}


def _in_process(recipe: str, overrides: list[str]) -> None:
    """One single-process recipe run here, as `python recipes/<recipe>.py key=value ...` would do it."""
    import importlib.util
    path = REPO / "recipes" / f"{recipe}.py"
    spec = importlib.util.spec_from_file_location(recipe, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}  # the loop installs its own
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun does: tiny ops on a busy 2-core box are many times slower with 2 threads
    try:
        module.main(load_config(REPO / "recipes" / "configs" / f"{recipe}.yaml", overrides))
    finally:
        torch.set_num_threads(threads)
        for s, h in saved.items():
            signal.signal(s, h)


def _many(recipe: str, runs: list[list[str]], workdir: Path, timeout: float = 900) -> None:
    """Several runs of one recipe in one 2-rank torchrun launch (tests/workers/run_recipe_many.py)."""
    spec = workdir / f"{recipe}_runs.json"
    spec.write_text(json.dumps(runs))
    run([*launcher(2), str(REPO / "tests" / "workers" / "run_recipe_many.py"), str(REPO / "recipes" / f"{recipe}.py"),
         str(spec)], timeout=timeout)


# The extra 2-rank runs besides the matrix: LoRA with gradient checkpointing under ZeRO-3 (its losses must
# equal the single-process LoRA run: checkpointing recomputes, it must not change gradients).
EXTRA = {"zero3_lora_ckpt": ("lora", ["ds_config=ds_configs/zero3.json", "model.grad_ckpt=true"])}
SENT_2RANK = [(e, m) for e in ("zero3", "fsdp") for m in ("lora", "qlora")]  # classifier head (modules_to_save) sharded


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("ftmatrix")
    tiny = _tiny_models(root, data_dir)
    summ, sent = _summ(root, tiny["llama"]), _sent(root, tiny["bert"])
    for mode in MODES:
        _in_process("finetune_summarization", [*summ, f"peft={mode}", "train.micro_batch_size=4",
                                               f"run_dir={root / 'summ' / f'single_{mode}'}"])
    _in_process("finetune_sentiment", [*sent, "peft=lora", "train.micro_batch_size=4", f"run_dir={root / 'sent' / 'single_lora'}"])
    _in_process("finetune_sentiment", [*sent, "peft=qlora", "train.micro_batch_size=4", f"run_dir={root / 'sent' / 'single_qlora'}"])
    two = [[*summ, f"peft={m}", "train.micro_batch_size=2", f"run_dir={root / 'summ' / f'{e}_{m}'}", ENGINES[e]]
           for e in ("zero2", "zero3", "fsdp") for m in MODES]
    two += [[*summ, f"peft={m}", "train.micro_batch_size=2", f"run_dir={root / 'summ' / name}", *extra]
            for name, (m, extra) in EXTRA.items()]
    # An encoder-decoder warm-started from the BERT (its encoder pooler is never used: DDP must allow that).
    b2b = [*_summ(root, tiny["bert2bert"]), "data.max_length=64", "peft=none", "export.merge=false"]
    _in_process("finetune_summarization", [*b2b, "train.micro_batch_size=4", f"run_dir={root / 'summ' / 'single_b2b'}"])
    two.append([*b2b, "train.micro_batch_size=2", f"run_dir={root / 'summ' / 'ddp_b2b'}"])
    _many("finetune_summarization", two, root)
    _many("finetune_sentiment", [[*sent, f"peft={m}", "train.micro_batch_size=2", f"run_dir={root / 'sent' / f'{e}_{m}'}",
                                  ENGINES[e]] for e, m in SENT_2RANK], root)
    return root


def _check_run(run_dir: Path, reference: Path, kind: str, mode: str) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    keys = ("rouge1", "rouge2", "rougeL") if kind == "summ" else ("val_accuracy",)
    assert all(k in summary for k in keys), summary
    got, ref = losses(run_dir), losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - ref[s]) / ref[s] for s in got)
    assert worst < 1e-4, f"losses differ from one process by {worst:.2e}: {got} vs {ref}"
    assert got[STEPS] < got[1], f"no learning: {got}"
    assert (run_dir / "checkpoints" / f"step_{STEPS}" / "trainer_state.json").is_file()
    _check_export(run_dir, kind, mode)


def _check_export(run_dir: Path, kind: str, mode: str) -> None:
    """The merged model (from_pretrained, no peft) gives the logits of base + saved adapter (peft)."""
    auto = AutoModelForCausalLM if kind == "summ" else AutoModelForSequenceClassification
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    x = tok(["#Person1#: Hello, how are you doing today?", "a charming and often affecting journey"],
            padding=True, return_tensors="pt")
    merged = auto.from_pretrained(run_dir / "model", dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        merged_logits = merged(**x).logits
    if mode == "none":
        assert not (run_dir / "adapter").exists()
        return
    from peft import PeftConfig, PeftModel
    base_path = PeftConfig.from_pretrained(run_dir / "adapter").base_model_name_or_path
    base = auto.from_pretrained(base_path, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(**x).logits
        adapted = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
        adapter_logits = adapted(**x).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-4, "the adapter changes nothing: LoRA did not train"
    assert (merged_logits - adapter_logits).abs().max().item() < 1e-5


CELLS = [(e, m) for m in MODES for e in ENGINES]


@pytest.mark.parametrize("engine,mode", CELLS, ids=[f"{m}-{e}" for e, m in CELLS])
def test_summarization_cell(runs, engine, mode):
    _check_run(runs / "summ" / f"{engine}_{mode}", runs / "summ" / f"single_{mode}", "summ", mode)
    preds = (runs / "summ" / f"{engine}_{mode}" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(p)["index"] for p in preds] == list(range(5))  # every rank's summaries, in order


def test_warm_started_seq2seq_under_ddp(runs):
    """`zerokit warm-start --kind seq2seq`'s bert2bert: the encoder and the decoder's own layers are the BERT's weights, only
    cross-attention is new; it trains under DDP (2 ranks) with the single-process losses, and evaluates."""
    from transformers import AutoModel, AutoModelForSeq2SeqLM
    bert = AutoModel.from_pretrained(runs / "bert").state_dict()
    b2b = AutoModelForSeq2SeqLM.from_pretrained(runs / "bert2bert")
    assert type(b2b).__name__ == "EncoderDecoderModel"
    new = set()
    for name, p in b2b.named_parameters():
        _, rest = name.split(".", 1)
        rest = rest.removeprefix("bert.")  # the decoder is a BertLMHeadModel
        if rest in bert:
            assert torch.equal(p, bert[rest]), name
        else:
            new.add(name)
    assert new and all("crossattention" in n or n.startswith("decoder.cls.") for n in new), sorted(new)[:8]
    tok = AutoTokenizer.from_pretrained(runs / "bert2bert")
    assert (b2b.config.decoder_start_token_id, b2b.config.eos_token_id) == (tok.cls_token_id, tok.sep_token_id)
    assert tok.eos_token == "[SEP]"
    got, ref = losses(runs / "summ" / "ddp_b2b"), losses(runs / "summ" / "single_b2b")
    assert sorted(got) == list(range(1, STEPS + 1)) and got[STEPS] < got[1], got
    assert max(abs(got[s] - ref[s]) / ref[s] for s in got) < 1e-4, (got, ref)
    summary = json.loads((runs / "summ" / "ddp_b2b" / "summary.json").read_text())
    assert summary["val_samples"] == 5 and "rougeL" in summary


def test_lora_gradient_checkpointing_zero3(runs):
    _check_run(runs / "summ" / "zero3_lora_ckpt", runs / "summ" / "single_lora", "summ", "lora")
    cfg = (runs / "summ" / "zero3_lora_ckpt" / "config.yaml").read_text()
    assert "grad_ckpt: true" in cfg


@pytest.mark.parametrize("engine,mode", SENT_2RANK + [("single", "lora"), ("single", "qlora")])
def test_sentiment_cell(runs, engine, mode):
    _check_run(runs / "sent" / f"{engine}_{mode}", runs / "sent" / f"single_{mode}", "sent", mode)
