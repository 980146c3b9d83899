"""Issue 14: every run ends in a usable model. `zerokit export` turns the checkpoints of every recipe
into a from_pretrained directory (+ a peft adapter for LoRA), from the fp32 master weights.

- bf16 DeepSpeed runs (ZeRO-0, ZeRO-3, ZeRO-1 on the BF16_Optimizer): the export equals the fp32 masters
  read from the live engine at the end of the run, bit for bit, and differs from the bf16 module copy;
- a pre-training checkpoint's export evaluates to the run's val_bpb (1e-4);
- fine-tuning checkpoints (sentiment full + LoRA, summarisation LoRA) give the training engine's
  logits, restored from the same checkpoint (1e-5), and the adapter loads with peft; the end-of-run
  export (<run_dir>/model) equals the offline one, also under DeepSpeed bf16 (ZeRO-0 full and LoRA,
  ZeRO-3 LoRA);
- bad paths: one line, exit status 2; OUT appears whole or not at all.

The 2-rank runs share one torchrun launch (this file is its worker, see the end); the
single-process fine-tuning runs run in this process.
"""
import importlib.util
import json
import signal
import sys
from pathlib import Path

import pytest
import torch

from launch_util import REPO, TINY, launcher, run

STEPS = 4  # a multiple of checkpoint_every: the last step is checkpointed
PRETRAIN = [*TINY, f"train.max_steps={STEPS}", "train.checkpoint_every=2", "train.micro_batch_size=2"]
PRETRAIN_RUNS = {  # 2 ranks each
    "zero0_bf16": ["ds_config=ds_configs/zero0.json", "train.precision=bf16"],
    "zero3_bf16": ["ds_config=ds_configs/zero3.json", "train.precision=bf16"],
    # fp32 gradient accumulation puts ZeRO-1 bf16 on DeepSpeed's BF16_Optimizer, which zero_to_fp32 refuses
    "zero1_bf16_fp32acc": ["ds_config={root}/zero1_fp32acc.json", "train.precision=bf16"],
    "fsdp": ["fsdp=full_shard"],
}
FT_COMMON = [f"train.max_steps={STEPS}", "train.log_every=1", "train.warmup_steps=1", "train.eval_every=0",
             f"train.checkpoint_every={STEPS}", "resume=none", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0",
             "model.dropout=0.0", "lr_auto.none=1e-3", "lr_auto.lora=1e-2"]


def _sentiment(root: Path) -> list[str]:
    return [*FT_COMMON, f"model.name_or_path={root / 'bert'}", f"data.train={root / 'sst_train.tsv'}",
            f"data.validation={root / 'sst_dev.tsv'}", "data.max_length=32", "data.eval_batch_size=4"]


def _summarization(root: Path) -> list[str]:
    return [*FT_COMMON, f"model.name_or_path={root / 'bert_causal'}", f"data.train={root / 'ds_train.jsonl'}",
            f"data.validation={root / 'ds_dev.jsonl'}", "data.max_length=64", "data.max_target_length=16",
            "eval.max_new_tokens=4", "eval.batch_size=2", "eval.max_samples=2"]


def _tiny_models(root: Path, data_dir: Path) -> None:
    """A 64-wide BERT classifier with MiniLM's tokenizer, the same BERT made a causal LM (zerokit
    warm-start), and small slices of SST-2 and DialogSum."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    from zerokit.finetuning import resolve_model_path
    from zerokit.models import warm_start
    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=128, max_position_embeddings=64)
                                  ).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    warm_start(str(root / "bert"), root / "bert_causal", kind="causal-lm")
    sst = (data_dir / "sst2" / "train_full.tsv").read_text().splitlines()
    (root / "sst_train.tsv").write_text("\n".join(sst[:17]) + "\n")
    (root / "sst_dev.tsv").write_text("\n".join((data_dir / "sst2" / "dev.tsv").read_text().splitlines()[:9]) + "\n")
    (root / "ds_train.jsonl").write_text("\n".join((data_dir / "dialogsum" / "train.jsonl").read_text().splitlines()[:16]) + "\n")
    (root / "ds_dev.jsonl").write_text("\n".join((data_dir / "dialogsum" / "dev.jsonl").read_text().splitlines()[:2]) + "\n")


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(recipe: str, overrides: list[str]):
    from zerokit.config import load_config
    return load_config(REPO / "recipes" / "configs" / f"{recipe}.yaml", overrides)


def _in_process(recipe: str, overrides: list[str]) -> None:
    """One single-process recipe run here, as `python recipes/<recipe>.py key=value ...` does it."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}  # the loop installs its own
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a busy 2-core box: one thread is faster
    try:
        _recipe(recipe).main(_config(recipe, overrides))
    finally:
        torch.set_num_threads(threads)
        for s, h in saved.items():
            signal.signal(s, h)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    return make_runs(tmp_path_factory.mktemp("export"), data_dir)


def make_runs(root: Path, data_dir: Path) -> Path:
    """Every run the tests read, under `root`: one 2-rank launch, then three single-process runs here."""
    cache = root / "cache"
    _tiny_models(root, data_dir)
    zero1 = json.loads((REPO / "ds_configs" / "zero1.json").read_text())
    (root / "zero1_fp32acc.json").write_text(json.dumps({**zero1, "data_types": {"grad_accum_dtype": "fp32"}}))
    sent, summ = _sentiment(root), _summarization(root)
    bf16 = ["train.micro_batch_size=2", "train.precision=bf16"]
    two = [["pretrain_gpt", [*PRETRAIN, f"data.cache_dir={cache}", f"run_dir={root / name}",
                             *(e.format(root=root) for e in extra)]] for name, extra in PRETRAIN_RUNS.items()]
    two += [["finetune_sentiment", [*sent, f"peft={peft}", *bf16, "ds_config=ds_configs/zero0.json", f"run_dir={root / name}"]]
            for name, peft in (("sent_zero0_bf16", "none"), ("sent_zero0_bf16_lora", "lora"))]
    two += [["finetune_summarization", [*summ, "peft=lora", *bf16, "ds_config=ds_configs/zero3.json",
                                        f"run_dir={root / 'summ_zero3_bf16_lora'}"]]]
    spec = root / "runs.json"
    spec.write_text(json.dumps(two))
    run([*launcher(2), str(Path(__file__).resolve()), str(spec)], timeout=900)
    _in_process("finetune_sentiment", [*sent, "peft=lora", "train.micro_batch_size=4", f"run_dir={root / 'sent_lora'}"])
    _in_process("finetune_sentiment", [*sent, "peft=none", "train.micro_batch_size=4", f"run_dir={root / 'sent_full'}"])
    _in_process("finetune_summarization", [*summ, "peft=lora", "train.micro_batch_size=4", f"run_dir={root / 'summ_lora'}"])
    return root


def _export(ckpt: Path, out: Path, *extra: str) -> Path:
    from zerokit.cli import main
    assert main(["export", str(ckpt), str(out), *extra]) == 0
    return out


def _ckpt(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / f"step_{STEPS}"


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(model_dir / "model.safetensors")


# ----------------------------------------------------------------------------- fp32 masters, bit for bit

@pytest.mark.parametrize("name", ["zero0_bf16", "zero3_bf16", "zero1_bf16_fp32acc"])
def test_bf16_deepspeed_export_is_the_fp32_masters(runs, name, tmp_path):
    engine = torch.load(runs / name / "engine_weights.pt")  # read from the live engine at the end of the run
    if name == "zero1_bf16_fp32acc":
        assert any((_ckpt(runs / name) / "deepspeed").glob("bf16_zero_pp_rank_1_*")), "not the BF16_Optimizer on 2 ranks"
    out = _weights(_export(_ckpt(runs / name), tmp_path / "hf"))
    assert engine["masters"].keys() <= out.keys()
    for k, master in engine["masters"].items():
        assert master.dtype == torch.float32 and out[k].dtype == torch.float32, k
        assert torch.equal(out[k], master), f"{k}: export differs from the fp32 master by {(out[k] - master).abs().max():.3g}"
    off = max((out[k] - engine["module"][k].float()).abs().max().item() for k in engine["masters"])
    assert engine["module"]["transformer.wte.weight"].dtype == torch.bfloat16
    assert off > 0, "the masters equal the bf16 module copy: the test could not tell them apart"
    bf16 = _weights(_export(_ckpt(runs / name), tmp_path / "hf16", "--dtype", "bfloat16"))
    assert all(torch.equal(bf16[k], engine["module"][k]) for k in engine["masters"])  # the copy is the rounded master


def test_pretraining_export_reproduces_val_bpb(runs, tmp_path):
    from transformers import AutoModelForCausalLM
    from zerokit.pretraining import PretrainTask, prepare_data
    run_dir = runs / "fsdp"
    out = _export(_ckpt(run_dir), tmp_path / "hf")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    cfg = _config("pretrain_gpt", [*PRETRAIN, f"data.cache_dir={runs / 'cache'}", f"run_dir={run_dir}",
                                   *PRETRAIN_RUNS["fsdp"]])
    _, data_dir = prepare_data(cfg.data, runs / "cache")
    # The run's 2 ranks evaluated windows r, r + 2, ... (eval_batches each); one process with twice the
    # micro-batch covers the same windows.
    task = PretrainTask(data_dir, cfg.data.block_size, 2 * cfg.train.micro_batch_size, cfg.data.eval_batches)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = task.evaluate(model, 0, 1)["val_bpb"]
    want = json.loads((run_dir / "summary.json").read_text())["val_bpb"]
    assert abs(got - want) <= 1e-4, (got, want)


# ----------------------------------------------------------------------------- fine-tuning checkpoints

def _batch(tokenizer):
    return tokenizer(["#Person1#: Hello, how are you doing today?", "a charming and often affecting journey"],
                     padding=True, return_tensors="pt")


def _engine_logits(recipe: str, run_dir: Path, batch: dict) -> torch.Tensor:
    """The training engine restored from its checkpoint (the recipe's model + plain backend + DCP load)."""
    from zerokit.backends.plain import PlainBackend
    from zerokit.dist import init_distributed
    from zerokit.finetuning import build_model, load_tokenizer, resolve_model_path
    from zerokit.config import load_config
    cfg = load_config(REPO / "recipes" / "configs" / f"{recipe}.yaml", [], run_dir / "config.yaml")  # as the run resolved it
    path = resolve_model_path(cfg.model.name_or_path)
    kind = "seq_cls" if recipe == "finetune_sentiment" else "causal_lm"
    backend = PlainBackend(build_model(cfg, path, kind, load_tokenizer(path), 2), cfg.train, init_distributed())
    backend.load(_ckpt(run_dir))
    backend.module.eval()
    with torch.no_grad():
        return backend.model(**batch).logits


FT_RUNS = {"sent_full": ("finetune_sentiment", "none"), "sent_lora": ("finetune_sentiment", "lora"),
           "summ_lora": ("finetune_summarization", "lora")}


@pytest.mark.parametrize("name", list(FT_RUNS))
def test_finetuning_export_gives_the_engines_logits(runs, name, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    recipe, peft = FT_RUNS[name]
    auto = AutoModelForSequenceClassification if recipe == "finetune_sentiment" else AutoModelForCausalLM
    out = _export(_ckpt(runs / name), tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(out)
    batch = _batch(tok)
    model = auto.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        logits = model(**batch).logits
    engine = _engine_logits(recipe, runs / name, batch)
    assert (logits - engine).abs().max().item() <= 1e-5
    # the run's own end-of-run export is the same model
    assert all(torch.equal(v, _weights(runs / name / "model")[k]) for k, v in _weights(out).items())
    if peft == "none":
        assert not (out / "adapter").exists()
        return
    base = auto.from_pretrained(json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"])
    with torch.no_grad():
        base_logits = base(**batch).logits
        adapted = PeftModel.from_pretrained(base, out / "adapter").eval()(**batch).logits
    assert (adapted - base_logits).abs().max() > 1e-3, "the adapter changes nothing: LoRA did not train"
    assert (adapted - engine).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["sent_zero0_bf16", "sent_zero0_bf16_lora", "summ_zero3_bf16_lora"])
def test_bf16_deepspeed_finetuning_exports_the_masters(runs, name, tmp_path):
    """The end-of-run export (live engine) and `zerokit export` (checkpoint files) agree bit for bit, and
    hold fp32 weights that round to the bf16 module copy without being it."""
    out = _export(_ckpt(runs / name), tmp_path / "hf")
    offline, in_run = _weights(out), _weights(runs / name / "model")
    assert offline.keys() == in_run.keys()
    assert all(torch.equal(offline[k], in_run[k]) for k in offline)
    if (out / "adapter").exists():
        from safetensors.torch import load_file
        a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, runs / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        trained = {k.replace("base_model.model.", "", 1): v for k, v in a.items()}
    else:
        trained = offline
    states = torch.load(_ckpt(runs / name) / "deepspeed" / ("mp_rank_00_model_states.pt" if "zero0" in name else
                        "zero_pp_rank_0_mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    module16 = {k.replace("base_model.model.", "", 1).replace(".modules_to_save.default", "").replace(".default", ""): v
                for k, v in (states["module"] or {}).items()}  # named as peft names the adapter's weights
    compared = [k for k in trained if k in module16 and module16[k].numel() == trained[k].numel()]
    if "zero3" in name:  # no full module copy in the files; zero3_bf16 above ties zero_to_fp32 to the masters
        return
    assert len(compared) == len(trained), sorted(set(trained) - set(compared))[:5]
    assert all(torch.equal(trained[k].to(torch.bfloat16), module16[k]) for k in compared)
    assert max((trained[k] - module16[k].float()).abs().max().item() for k in compared) > 0


def test_lora_export_takes_a_moved_base(runs, tmp_path, capsys):
    import shutil
    from zerokit.cli import main
    ckpt = _ckpt(runs / "sent_lora")
    assert main(["export", str(ckpt), str(tmp_path / "x"), "--base", str(tmp_path / "gone")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--base" in lines[0], lines
    moved = shutil.copytree(runs / "bert", tmp_path / "moved")
    out = _export(ckpt, tmp_path / "hf", "--base", str(moved))
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(moved)
    assert all(torch.equal(v, _weights(runs / "sent_lora" / "model")[k]) for k, v in _weights(out).items())


def test_a_run_folder_exports_its_newest_valid_checkpoint(runs, tmp_path, capsys):
    import shutil
    from zerokit.cli import main
    run_dir = tmp_path / "run"
    shutil.copytree(runs / "fsdp" / "checkpoints", run_dir / "checkpoints")
    older, newest = run_dir / "checkpoints" / "step_2", run_dir / "checkpoints" / f"step_{STEPS}"
    assert older.is_dir() and newest.is_dir()
    want_newest, want_older = _weights(_export(newest, tmp_path / "newest")), _weights(_export(older, tmp_path / "older"))
    assert any(not torch.equal(want_newest[k], want_older[k]) for k in want_newest)  # the two steps tell apart

    def same(got, want):
        return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    assert same(_weights(_export(run_dir, tmp_path / "a")), want_newest)
    # a damaged newest checkpoint is passed over (and left where it is), as resume=auto would
    with open(newest / "trainer_state.json", "a") as f:
        f.write(" ")
    assert same(_weights(_export(run_dir, tmp_path / "b")), want_older)
    assert newest.is_dir()
    with open(older / "trainer_state.json", "a") as f:
        f.write(" ")
    capsys.readouterr()  # the exports' progress bars
    assert main(["export", str(run_dir), str(tmp_path / "c")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no valid checkpoint" in lines[0], lines
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- bad paths

def test_out_is_never_half_written(tmp_path):
    from zerokit.export import atomic_dir
    out = tmp_path / "hf"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed mid-export")
    assert not out.exists() and not (tmp_path / "hf.tmp").exists()
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
        assert not out.exists()
    assert (out / "config.json").is_file() and not (tmp_path / "hf.tmp").exists()


def test_bad_paths_are_one_line_usage_errors(tmp_path, capsys):
    from zerokit.cli import main
    broken = tmp_path / "no_model_config"
    broken.mkdir()
    (broken / "trainer_state.json").write_text(json.dumps({"step": 2, "backend": "plain", "world_size": 1}))
    (tmp_path / "not_a_checkpoint").mkdir()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    cases = [(tmp_path / "not_a_checkpoint", "out", "not a zerokit checkpoint"), (broken, "out", "config.json missing"),
             (broken, "taken", "already exists")]
    for ckpt, out, words in cases:
        assert main(["export", str(ckpt), str(tmp_path / out)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], lines
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
    # the command line itself: status 2, one line, no traceback
    proc = run([sys.executable, "-m", "zerokit.cli", "export", str(tmp_path / "missing"), str(tmp_path / "out")], check=False)
    assert proc.returncode == 2 and "not found" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ----------------------------------------------------------------------------- the 2-rank worker

def _engine_weights(backend) -> dict:
    """The fp32 masters and the 16-bit module copies by name, read from the live DeepSpeed engine
    (ZeRO-0: its FP16_UnfusedOptimizer's per-parameter masters; ZeRO 1-3: DeepSpeed's
    safe_get_full_fp32_param). All ranks call."""
    import deepspeed
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param
    opt, module = backend.engine.optimizer, backend.module
    masters, copies = {}, {}
    names = {id(p): n for n, p in module.named_parameters()}
    zero0 = isinstance(opt, FP16_UnfusedOptimizer)
    if zero0:  # paired by object identity
        masters = {names[id(lp)]: hp.detach().clone() for lps, hps in zip(opt.fp16_groups, opt.fp32_groups)
                   for lp, hp in zip(lps, hps)}
    for n, p in module.named_parameters():
        if not zero0:
            masters[n] = safe_get_full_fp32_param(p).detach().cpu().clone()
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            copies[n] = p.detach().cpu().clone()
    return {"masters": masters, "module": copies}


def _worker(spec: Path) -> None:
    """torchrun --nproc_per_node 2 tests/test_export.py runs.json: each [recipe, overrides] run in turn;
    after a DeepSpeed pre-training run, rank 0 saves the engine's masters to <run_dir>/engine_weights.pt."""
    import os
    from zerokit.dist import shutdown
    from zerokit.recipe import setup_logging
    setup_logging(0)
    try:
        for recipe, overrides in json.loads(spec.read_text()):
            cfg = _config(recipe, overrides)
            out = _recipe(recipe).main(cfg)
            if getattr(out, "name", None) == "deepspeed":
                weights = _engine_weights(out)
                if int(os.environ["RANK"]) == 0:
                    torch.save(weights, Path(cfg.run_dir) / "engine_weights.pt")
    finally:
        shutdown()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
