"""Malformed input, as a new user would type it, across the three recipes and every `zerokit` command:
one `error:` line that names the fix, exit status 2, no traceback, and a checkpoint already in the run
dir left byte for byte as it was.

Most cases run in this process through the same entry points the scripts use (`run_recipe` with the
recipe's own `main`, `zerokit.cli.main`), which keeps the file fast; a few run as real subprocesses to
show the process-level behaviour (status, stderr) is the same.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from launch_util import REPO, run
from zerokit import cli
from zerokit.recipe import run_recipe

RECIPES = {"pretrain": "pretrain_gpt", "sentiment": "finetune_sentiment", "summarization": "finetune_summarization"}
# Small, valid settings per recipe; each case adds what is wrong (a later key=value wins).
BASE = {
    "pretrain": ["model.preset=gpt-tiny", "data.block_size=32", "data.vocab_size=512", "train.max_steps=3",
                 "train.log_every=1", "train.eval_every=0", "data.eval_batches=2", "sample.max_new_tokens=4",
                 "data.cache_dir={cache}"],
    "sentiment": ["model.name_or_path=minilm", "train.max_steps=2", "train.eval_every=0",
                  "data.train={data}/sst2/dev.tsv", "data.validation={data}/sst2/dev.tsv"],
    # The checkpoint's model folder (config + tokenizer with eos): data errors come before any weights load.
    "summarization": ["model.name_or_path={ckpt}/model", "train.max_steps=2", "data.max_length=128", "eval.max_samples=2",
                      "data.train={data}/dialogsum/dev.jsonl", "data.validation={data}/dialogsum/dev.jsonl"],
}
# The one line of a user error: the recipes' and `zerokit`'s "error: ...", argparse's "prog: error: ...".
ERROR_LINE = re.compile(r"^(zerokit [\w-]+: )?error: ")
BINARY = bytes(range(256)) * 4
STAGE5 = json.dumps({"zero_optimization": {"stage": 5}})


def case(id, target, args, expect, files=None, subprocess=False):
    return pytest.param(target, args, expect, files or {}, subprocess, id=id)


CASES = [
    # values of the wrong type, sign or range
    case("pretrain-max-steps-negative", "pretrain", ["train.max_steps=-5"], ["train.max_steps=-5", "set e.g. train.max_steps="]),
    case("pretrain-no-steps-no-budget", "pretrain", ["train.max_steps=0", "train.max_minutes=0"],
         ["trains nothing", "train.max_minutes=M"]),
    case("pretrain-micro-batch-zero", "pretrain", ["train.micro_batch_size=0"], ["train.micro_batch_size=0", "integer >= 1"]),
    case("pretrain-grad-accum-text", "pretrain", ["train.grad_accum=lots"], ["train.grad_accum", "expects an int", "set e.g. train.grad_accum=1"]),
    case("pretrain-block-size-zero", "pretrain", ["data.block_size=0"], ["data.block_size=0", "set e.g. data.block_size="]),
    case("pretrain-vocab-too-small", "pretrain", ["data.vocab_size=100"], ["data.vocab_size=100", "integer >= 258"]),
    case("pretrain-precision-unknown", "pretrain", ["train.precision=fp8"], ["train.precision=fp8 is not one of", "one of auto, fp32, bf16, fp16"]),
    case("pretrain-preset-unknown", "pretrain", ["model.preset=gpt-huge"], ["model.preset=gpt-huge is not one of", "gpt-tiny"]),
    case("pretrain-fsdp-unknown", "pretrain", ["fsdp=zero3"], ["fsdp=zero3 is not one of", "full_shard"]),
    case("pretrain-tracker-unknown", "pretrain", ["report_to=mlflow"], ["report_to=mlflow is not a comma list of", "tensorboard, wandb"]),
    case("pretrain-lr-negative", "pretrain", ["train.lr=-1"], ["train.lr=-1", "a number > 0"]),
    case("pretrain-val-fraction", "pretrain", ["data.val_fraction=1.5"], ["data.val_fraction=1.5", "set e.g. data.val_fraction=0.1"]),
    case("pretrain-nonfinite-unknown", "pretrain", ["train.nonfinite=ignore"], ["train.nonfinite=ignore is not one of", "stop, skip"]),
    case("pretrain-dropout-range", "pretrain", ["model.dropout=1.5"], ["model.dropout=1.5", "a number in [0, 1)"]),
    case("sentiment-micro-batch-negative", "sentiment", ["train.micro_batch_size=-1"], ["train.micro_batch_size=-1", "set e.g. train.micro_batch_size=16"]),
    case("sentiment-peft-unknown", "sentiment", ["peft=adapter"], ["peft=adapter is not one of", "none, lora, qlora"]),
    case("sentiment-num-labels-one", "sentiment", ["data.num_labels=1"], ["data.num_labels=1", "integer >= 2"]),
    case("summarization-strategy-unknown", "summarization", ["eval.strategy=sample"], ["eval.strategy=sample is not one of", "greedy, beam"]),
    case("summarization-max-length-zero", "summarization", ["data.max_length=0"], ["data.max_length=0", "set e.g. data.max_length=512"]),
    # YAML that is malformed, not a mapping, or missing
    case("pretrain-yaml-malformed", "pretrain", ["--config", "{tmp}/bad.yaml"], ["malformed YAML", "at line 2", "fix the file"],
         {"bad.yaml": "train: {lr: 0.1\n"}),
    case("pretrain-yaml-list", "pretrain", ["--config", "{tmp}/list.yaml"], ["must hold a YAML mapping"], {"list.yaml": "- a\n- b\n"}),
    case("sentiment-yaml-section-scalar", "sentiment", ["--config", "{tmp}/u.yaml"], ["'train' is a section", "train.<field>="],
         {"u.yaml": "train: 5\n"}),
    case("summarization-yaml-missing", "summarization", ["--config", "{tmp}/nope.yaml"], ["config file not found", "--config"]),
    # DeepSpeed JSON: missing, malformed, not an object, unknown stage, contradicting the run
    case("pretrain-ds-missing", "pretrain", ["ds_config={tmp}/nope.json"], ["DeepSpeed config not found", "ds_configs/zero2.json"]),
    case("pretrain-ds-malformed", "pretrain", ["ds_config={tmp}/ds.json"], ["malformed DeepSpeed JSON", "line 1"], {"ds.json": "{\"zero_optimization\": "}),
    case("pretrain-ds-list", "pretrain", ["ds_config={tmp}/ds.json"], ["holds a JSON list", "zero_optimization"], {"ds.json": "[1, 2]"}),
    case("pretrain-ds-stage5", "pretrain", ["ds_config={tmp}/ds.json"], ["zero_optimization.stage=5", "0, 1, 2 or 3"], {"ds.json": STAGE5}),
    case("pretrain-ds-contradicts", "pretrain", ["ds_config={tmp}/ds.json", "train.micro_batch_size=8"],
         ["train_micro_batch_size_per_gpu=4", "train.micro_batch_size=4"],
         {"ds.json": json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}})}),
    case("sentiment-ds-zero-not-object", "sentiment", ["ds_config={tmp}/ds.json"], ["zero_optimization must be an object"],
         {"ds.json": json.dumps({"zero_optimization": 3})}),
    # corpora
    case("pretrain-corpus-missing", "pretrain", ["data.corpus={tmp}/nope.txt"], ["corpus not found", "nope.txt"]),
    case("pretrain-corpus-empty", "pretrain", ["data.corpus={tmp}/empty.txt"], ["empty.txt is empty", "point data.corpus at files with text"], {"empty.txt": ""}),
    case("pretrain-corpus-too-short", "pretrain", ["data.corpus={tmp}/short.txt"], ["block_size=32", "lower block_size or use more data"],
         {"short.txt": "To be, or not to be.\nThat is the question.\n" * 2}),
    case("pretrain-corpus-binary", "pretrain", ["data.corpus={tmp}/blob.txt"], ["not UTF-8", "convert it to UTF-8"], {"blob.txt": BINARY}),
    case("pretrain-corpus-jsonl-malformed", "pretrain", ["data.corpus={tmp}/c.jsonl"], ["c.jsonl:2", "not valid JSON"],
         {"c.jsonl": '{"text": "one"}\n{"text": \n'}),
    case("pretrain-corpus-jsonl-no-field", "pretrain", ["data.corpus={tmp}/c.jsonl"], ["c.jsonl:1", "set data.text_field"],
         {"c.jsonl": '{"body": "one"}\n{"body": "two"}\n'}),
    case("pretrain-corpus-empty-folder", "pretrain", ["data.corpus={tmp}/corpus"], ["no .txt or .jsonl files", "corpus"], {"corpus/": None}),
    # fine-tuning files
    case("sentiment-missing-column", "sentiment", ["data.train={tmp}/t.tsv"], ["no column 'sentence'", "fix the data"],
         {"t.tsv": "text\tlabel\ngood\t1\n"}),
    case("sentiment-label-out-of-range", "sentiment", ["data.train={tmp}/t.tsv"], ["label 5 outside 0..1", "set num_labels or fix the data"],
         {"t.tsv": "sentence\tlabel\ngood\t1\nbad\t5\n"}),
    case("summarization-missing-column", "summarization", ["data.train={tmp}/t.jsonl"], ["no column 'summary'", "fix the data"],
         {"t.jsonl": '{"dialogue": "#Person1#: hi"}\n'}),
    # run_dir and resume
    case("pretrain-run-dir-is-file", "pretrain", ["run_dir={tmp}/afile"], ["run_dir=", "is a file", "set run_dir"], {"afile": "x"}),
    case("summarization-run-dir-is-file", "summarization", ["run_dir={tmp}/afile"], ["is a file", "set run_dir"], {"afile": "x"}),
    case("pretrain-resume-not-checkpoint", "pretrain", ["resume={tmp}"], ["not a checkpoint directory", "resume=auto"]),
    # a pretrained model.name_or_path is held to the run's settings
    case("pretrain-pretrained-trains-tokenizer", "pretrain", ["model.name_or_path={ckpt}/model"],
         ["needs its own tokenizer", "set data.tokenizer="]),
    case("pretrain-pretrained-block-size", "pretrain",
         ["model.name_or_path={ckpt}/model", "data.tokenizer={ckpt}/model", "data.block_size=64"],
         ["data.block_size=64 exceeds the context", "set data.block_size=32 or less"]),
    case("pretrain-pretrained-vocab-too-big", "pretrain", ["model.name_or_path={tmp}/m", "data.tokenizer={ckpt}/model"],
         ["the tokenizer has 512 tokens", "embeddings for 300", "use the model's own tokenizer"],
         {"m/config.json": json.dumps({"model_type": "gpt2", "vocab_size": 300, "n_positions": 32, "n_embd": 64,
                                       "n_layer": 2, "n_head": 2})}),
    # every zerokit command
    case("export-missing", "cli", ["export", "{tmp}/nope", "{tmp}/out"], ["nope not found", "pass an existing"]),
    case("export-not-checkpoint", "cli", ["export", "{tmp}/notes", "{tmp}/out"], ["not a zerokit checkpoint", "pass <run_dir>"],
         {"notes/todo.txt": "a folder that is neither a run nor a checkpoint"}),
    case("warm-start-missing", "cli", ["warm-start", "{tmp}/nope", "{tmp}/out"], ["model folder not found", "alias"]),
    case("generate-missing", "cli", ["generate", "--model", "{tmp}/nope", "--prompt", "hi"], ["model folder not found", "export"]),
    case("generate-not-a-model", "cli", ["generate", "--model", "{run}", "--prompt", "hi"], ["has no config.json", "exported model folder"]),
    case("estimate-unknown-model", "cli", ["estimate", "--model", "gpt-huge"], ["gpt-huge"]),
    case("plan-bad-memory", "cli", ["plan", "--model", "gpt2-124m", "--gpus", "2", "--gpu-mem", "lots"], ["'lots'", "80GB"]),
    case("bench-bad-sweep", "cli", ["bench", "--sweep", "stage=7"], ["--sweep stage", "not allowed"]),
    case("verify-bad-sweep", "cli", ["verify", "--model", "gpt-tiny", "--sweep", "stage=9"], ["--sweep stage", "not allowed"]),
    case("memtest-bad-gpus", "cli", ["memtest", "--gpus", "0"], ["--gpus", "positive world sizes"]),
    case("slurm-bad-time", "cli", ["slurm", "--nodes", "1", "--gpus-per-node", "1", "--time", "2h", "pretrain_gpt"], ["--time '2h'", "HH:MM:SS"]),
    # the same as real processes
    case("process-pretrain-max-steps-negative", "pretrain", ["train.max_steps=-5"], ["train.max_steps=-5", "set e.g."], subprocess=True),
    case("process-pretrain-ds-stage5", "pretrain", ["ds_config={tmp}/ds.json"], ["zero_optimization.stage=5"], {"ds.json": STAGE5}, subprocess=True),
    case("process-slurm-missing-recipe", "cli", ["slurm", "--nodes", "1", "--gpus-per-node", "1", "--time", "01:00:00",
                                                 "recipes/nope.py", "-o", "{tmp}/job.sbatch"],
         ["recipe recipes/nope.py not found", "name one of", "recipes/pretrain_gpt.py"], subprocess=True),
]


def _load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_MODULES: dict = {}


def invoke(target: str, argv: list[str]) -> int:
    """Exit status of `python recipes/<target>.py argv` / `zerokit argv`, run in this process."""
    if target == "cli":
        try:
            return cli.main(argv)
        except SystemExit as e:  # argparse's own usage errors
            return e.code
    name = RECIPES[target]
    module = _MODULES.setdefault(name, _load_recipe(name))
    return run_recipe(module.main, REPO / "recipes" / "configs" / f"{name}.yaml", name, argv)


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def checkpoint_run(tmp_path_factory, cache, data_dir) -> Path:
    """One small real run whose checkpoint every case finds in its run dir."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    args = [a.format(cache=cache) for a in BASE["pretrain"]] + [
        f"run_dir={run_dir}", "train.max_steps=2", "train.checkpoint_every=2", "resume=none",
        f"data.corpus={data_dir / 'tinyshakespeare' / 'input.txt'}"]
    assert invoke("pretrain", args) == 0
    assert (run_dir / "checkpoints" / "step_2" / "trainer_state.json").is_file()
    return run_dir


@pytest.mark.parametrize("target,args,expect,files,subprocess", CASES)
def test_malformed_input_fails_cleanly(target, args, expect, files, subprocess, tmp_path, capfd, checkpoint_run, cache, data_dir):
    run_dir = tmp_path / "run"
    shutil.copytree(checkpoint_run / "checkpoints", run_dir / "checkpoints")
    before = tree_hash(run_dir)
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir(parents=True)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    subst = dict(tmp=tmp_path, run=run_dir, cache=cache, data=data_dir, ckpt=checkpoint_run / "checkpoints" / "step_2")
    argv = [a.format(**subst) for a in args]
    if target != "cli":
        argv = [a.format(**subst) for a in BASE[target]] + [f"run_dir={run_dir}"] + argv

    if subprocess:
        cmd = [sys.executable, "-m", "zerokit.cli"] if target == "cli" else \
            [sys.executable, str(REPO / "recipes" / f"{RECIPES[target]}.py")]
        proc = run([*cmd, *argv], check=False, timeout=300)
        status, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        capfd.readouterr()
        status = invoke(target, argv)
        out, err = capfd.readouterr()

    errors = [line for line in err.splitlines() if ERROR_LINE.match(line)]
    assert status == 2, f"exit {status}\n{err[-3000:]}"
    assert len(errors) == 1, err[-3000:]
    assert "Traceback" not in err + out, err[-3000:]
    for text in expect:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    assert tree_hash(run_dir) == before, "the checkpoint in the run dir changed"
    assert not (tmp_path / "job.sbatch").exists()  # nothing written for a failed `zerokit slurm -o`


def test_pretrained_model_takes_the_runs_dropout(checkpoint_run, tmp_path):
    """model.dropout reaches a pretrained model (it used to keep its own): every dropout layer gets it."""
    import torch
    from transformers import AutoModelForCausalLM

    from zerokit.models import build_causal_lm
    src = checkpoint_run / "checkpoints" / "step_2" / "model"
    AutoModelForCausalLM.from_config(__import__("transformers").AutoConfig.from_pretrained(src)).save_pretrained(tmp_path / "m")
    model = build_causal_lm(None, str(tmp_path / "m"), None, 32, dropout=0.3)
    rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.3}, rates
    kept = build_causal_lm(None, str(tmp_path / "m"), None, 32)  # no dropout given: the model's own (0.0 here)
    assert {m.p for m in kept.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}
