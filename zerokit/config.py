"""Run configuration: a recipe's YAML file plus `key=value` overrides.

The recipe YAMLs (zerokit/recipes/configs/) hold every default, each explained once on its own line: base.yaml
has the keys every recipe shares, and a recipe's YAML names its base (`base: finetune.yaml`) and holds only what
it adds or changes (merged over the base, recursively). `${NAME:-default}` in a YAML string is the environment
variable NAME, or the default (the data root: ZEROKIT_DATA).
Overrides use dotted keys (`train.lr=3e-4`); values are parsed as YAML scalars.
Unknown keys, malformed YAML, values of the wrong type and values out of range (RULES, the one
table of what each setting may be) are `UsageError`s, raised before any process group or model exists.
"""
from __future__ import annotations

import difflib
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from zerokit.errors import UsageError, read_settings_text
from zerokit.schedule import SCHEDULES

log = logging.getLogger("zerokit")


class Config(dict):
    """A nested dict with attribute access: `cfg.train.lr` is `cfg["train"]["lr"]`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else v for k, v in self.items()}


def _wrap(d: dict) -> Config:
    return Config({k: _wrap(v) if isinstance(v, dict) else v for k, v in d.items()})


def load_yaml(path: str | Path) -> dict:
    text = read_settings_text(path, "config file", "pass an existing YAML file with --config")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"malformed YAML in {path}{where}: {getattr(e, 'problem', e)}; fix the file's syntax") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a YAML mapping of settings, not {type(data).__name__}")
    return data


def load_layered_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """A YAML with its `base:` chain merged under it (the file's own values win) and `${NAME:-default}` expanded."""
    path = Path(path)
    data = load_yaml(path)
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise UsageError(f"{path}: base must be the file name of the YAML it builds on, e.g. base: base.yaml")
        base_path = path.parent / base
        if not base_path.is_file():
            raise UsageError(f"{path} builds on {base}, which is not in {path.parent}; put the recipe's base YAMLs "
                             f"(recipes/configs/*.yaml) beside it, or drop its base: line and give every key")
        if base_path.resolve() in _seen:
            raise UsageError(f"{path}: base {base} leads back to itself; break the loop of base: entries")
        merged = load_layered_yaml(base_path, _seen + (path.resolve(),))
        _overlay(merged, data)
        data = merged
    return _expand_env(data, path) if not _seen else data


def _overlay(base: dict, extra: dict) -> None:
    """`extra` over `base` in place: sections merge, values replace, new keys are added."""
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _overlay(base[k], v)
        else:
            base[k] = v


_ENV_REF = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _expand_env(value, path: Path):
    if isinstance(value, dict):
        return {k: _expand_env(v, path) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def sub(m):
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise UsageError(f"{path} uses ${{{name}}}, which is not set; export {name}=... or write ${{{name}:-default}}")
        return default
    return _ENV_REF.sub(sub, value)


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        keys.append(prefix + k)
        if isinstance(v, dict):
            keys += _flat_keys(v, prefix + k + ".")
    return keys


def _unknown_key(key: str, known: dict) -> UsageError:
    close = difflib.get_close_matches(key, _flat_keys(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see the recipe's YAML and the base YAMLs it names (recipes/configs/) for the keys"
    return UsageError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check an override against the type of its default (None defaults take anything)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float) and not isinstance(value, bool):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            pass
    elif isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif isinstance(default, str):
        return str(value)
    elif isinstance(default, (list, dict)) and isinstance(value, type(default)):
        return value
    kind = {"bool": "a bool (true/false)", "int": "an int", "float": "a number", "list": "a list", "dict": "a mapping"}
    raise UsageError(f"config key '{key}' expects {kind.get(type(default).__name__, type(default).__name__)}, got {value!r}; "
                     f"set e.g. {key}={_show(default)}")


def merge(base: dict, updates: dict, prefix: str = "", root: dict | None = None) -> None:
    """Merge `updates` into `base` in place; every key must already exist in `base`."""
    root = base if root is None else root
    for k, v in updates.items():
        key = prefix + k
        if k not in base:
            raise _unknown_key(key, root)
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise UsageError(f"config key '{key}' is a section; set its fields, e.g. {key}.<field>=...")
            merge(base[k], v, key + ".", root)
        else:
            base[k] = _coerce(key, v, base[k])


def parse_overrides(args: list[str]) -> dict:
    """`["train.lr=1e-3", "run_dir=x"]` -> nested dict with YAML-parsed values."""
    nested: dict = {}
    for arg in args:
        if "=" not in arg:
            raise UsageError(f"cannot read argument '{arg}': overrides are key=value, e.g. train.max_steps=100")
        key, raw = arg.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        if value is None and raw.strip() not in ("", "null", "Null", "NULL", "~"):
            value = raw  # e.g. sample.prompt=#Person1#: -- YAML would read it as a comment
        node = nested
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def load_config(defaults_path: str | Path, overrides: list[str], config_path: str | Path | None = None) -> Config:
    """Defaults YAML <- optional user YAML (--config) <- key=value overrides."""
    cfg = load_layered_yaml(defaults_path)
    if config_path:
        user = load_layered_yaml(config_path)
        try:
            merge(cfg, user)
        except UsageError as e:
            raise UsageError(f"{config_path}: {e}") from None
    defaults = _wrap(load_layered_yaml(defaults_path))
    merge(cfg, parse_overrides(overrides))
    cfg = _wrap(cfg)
    validate(cfg, defaults)
    preset = lookup(cfg, "model.preset")
    if isinstance(preset, str):  # an alias (gpt2) runs and is saved as the preset it names (gpt2-124m)
        from zerokit.models import preset_name
        cfg.model.preset = preset_name(preset) or preset
    return cfg


# ---------------------------------------------------------------------------------------------- value rules

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(lo: int, hi: int | None = None, null: bool = False):
    what = f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "") + (" or null" if null else "")
    return (lambda v: (null and v is None) or (_is_int(v) and v >= lo and (hi is None or v <= hi))), what


def _num(lo: float, hi: float | None = None, lo_open: bool = False, hi_open: bool = True, null: bool = False):
    what = (f"a number {'>' if lo_open else '>='} {lo}" if hi is None else
            f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}") + (" or null" if null else "")

    def ok(v):
        if null and v is None:
            return True
        if isinstance(v, str):  # keys whose default is null take raw YAML; YAML 1.1 reads 3e-4 as a string
            try:
                v = float(v)
            except ValueError:
                return False
        return _is_num(v) and (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
    return ok, what


def _choice(*options):
    return (lambda v: v in options), "one of " + ", ".join(map(str, options))


def _comma_subset(*options):
    def ok(v):
        return v is None or isinstance(v, str) and all(t.strip() in options for t in v.split(",") if t.strip())
    return ok, "a comma list of " + ", ".join(options)


def _betas():
    return (lambda v: isinstance(v, list) and len(v) == 2 and all(_is_num(b) and 0 <= b < 1 for b in v)), \
        "two numbers in [0, 1)"


def _threads():
    # The default is the string auto, so a number given on the command line arrives as text.
    return (lambda v: v == "auto" or str(v).isdigit() and int(v) >= 1), "auto or an integer >= 1"


def _presets():
    def ok(v):  # imported on use: the recipe with a model.preset has loaded zerokit.models already
        from zerokit.models import preset_name
        return preset_name(v) is not None

    def what():
        from zerokit.models import preset_choices
        return "one of the " + preset_choices()
    return ok, what


# Every setting with a restricted range, in one place. A recipe's keys that appear here are checked
# after each merge (defaults, --config, key=value); keys a recipe lacks are skipped.
RULES = {
    "train.max_steps": _int(0), "train.epochs": _num(0, null=True),
    "train.micro_batch_size": _int(1), "train.grad_accum": _int(1), "train.seed": _int(0),
    "train.lr": _num(0, lo_open=True, null=True), "train.min_lr": _num(0), "train.warmup_steps": _int(0),
    "train.weight_decay": _num(0), "train.betas": _betas(), "train.eps": _num(0, lo_open=True),
    "train.grad_clip": _num(0), "train.precision": _choice("auto", "fp32", "bf16", "fp16"),
    "train.eval_every": _int(0), "train.log_every": _int(1), "train.checkpoint_every": _int(0),
    "train.checkpoint_every_minutes": _num(0), "train.keep_checkpoints": _int(0),
    "train.peak_tflops": _num(0, lo_open=True, null=True), "train.cpu_threads": _threads(),
    "train.dist_timeout_s": _num(0, lo_open=True), "train.nonfinite": _choice("stop", "skip"),
    "train.schedule": _choice(*SCHEDULES),
    "train.decay_fraction": _num(0, 1, lo_open=True, hi_open=False),
    "train.max_minutes": _num(0),
    "data.vocab_size": _int(258), "data.block_size": _int(1), "data.val_fraction": _num(0, 1, lo_open=True),
    "data.eval_batches": _int(0), "data.max_length": _int(1), "data.max_target_length": _int(1),
    "data.num_labels": _int(2), "data.eval_batch_size": _int(1), "data.tokenizer_sample_mb": _num(0, lo_open=True, null=True),
    "data.prepare": _choice("auto", "always", "never"),
    "eval.strategy": _choice("greedy", "beam"), "eval.num_beams": _int(1), "eval.max_new_tokens": _int(1),
    "eval.batch_size": _int(1), "eval.max_samples": _int(1, null=True),
    "eval.no_repeat_ngram_size": _int(0), "eval.repetition_penalty": _num(0, lo_open=True), "eval.length_penalty": _num(-5, 5, hi_open=False),
    "model.preset": _presets(), "model.dropout": _num(0, 1, null=True),
    "model.attn": _choice("eager", "sdpa", "flash"),
    "model.sdpa_backend": _choice("auto", "math", "efficient", "flash", "cudnn"),
    "model.kv_heads": _int(1, null=True), "model.router_aux_loss_coef": _num(0, null=True),
    "lora.r": _int(1), "lora.alpha": _num(0, lo_open=True), "lora.dropout": _num(0, 1),
    "fsdp": _choice("none", "full_shard", "shard_grad_op"), "parallel.tensor": _int(1), "parallel.pipeline": _int(1),
    "parallel.pipeline_schedule": _choice("gpipe", "1f1b"), "peft": _choice("none", "lora", "qlora"),
    "report_to": _comma_subset("none", "tensorboard", "wandb"), "prometheus_port": _int(0, 65535),
    "sample.max_new_tokens": _int(0), "sample.temperature": _num(0, lo_open=True), "sample.top_k": _int(0),
    "optim.name": _choice("adamw", "lion", "adamw8bit", "lion8bit", "muon"), "optim.muon_lr": _num(0, lo_open=True),
}


def _show(value) -> str:
    """A value as it would be typed after key= (YAML flow style; '' for an empty string)."""
    return yaml.safe_dump(value, default_flow_style=True).split("\n")[0] if value != "" else "''"


def lookup(cfg: dict, key: str):
    """The value at a dotted key, or MISSING."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


MISSING = object()


def validate(cfg: Config, defaults: Config | None = None) -> None:
    """Check every value against RULES, then the paths and cross-setting constraints a run needs before it
    starts (run_dir, the DeepSpeed JSON, a pretrained model's tokenizer). Raises UsageError naming the fix."""
    defaults = defaults or Config()
    for key, (ok, what) in RULES.items():
        value = lookup(cfg, key)
        if value is MISSING or ok(value):
            continue
        what = what() if callable(what) else what
        example = lookup(defaults, key)
        fix = f"set e.g. {key}={_show(example)}" if example is not MISSING and example is not None and ok(example) \
            else f"give {what}"
        raise UsageError(f"{key}={_show(value)} is not {what}; {fix}")
    run_dir = cfg.get("run_dir")
    if run_dir and Path(run_dir).expanduser().exists() and not Path(run_dir).expanduser().is_dir():
        raise UsageError(f"run_dir={run_dir} is a file, not a folder; set run_dir to a new or existing folder")
    if cfg.get("ds_config") or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        from zerokit.backends.common import deepspeed_config_path
        from zerokit.backends.deepspeed import load_ds_json
        path = deepspeed_config_path(cfg.get("ds_config"))
        if path:
            _check_ds_config(load_ds_json(path), cfg.train)
    resume = cfg.get("resume")  # a cheap first look; the loop verifies the checkpoint's manifest and shape keys
    if resume not in (None, "auto", "none") and not (Path(str(resume)).expanduser() / "trainer_state.json").is_file():
        raise UsageError(f"resume={resume}: not a checkpoint directory (no trainer_state.json); pass a "
                         f"<run_dir>/checkpoints/step_N folder, resume=auto or resume=none")
    _check_pretrained(cfg, defaults)
    if lookup(cfg, "model.attn") is not MISSING:  # flash without a GPU, a CUDA-only sdpa kernel on a CPU
        from zerokit.attention import attn_implementation
        backend = cfg.model.get("sdpa_backend", "auto")
        attn_implementation(cfg.model.attn, backend)
        if backend != "auto" and lookup(cfg, "train.compile") is True:  # dynamo cannot trace the pinning hooks
            raise UsageError(f"model.sdpa_backend={backend} cannot be combined with train.compile=true (torch.compile "
                             "does not trace the hooks that pin the kernel); set model.sdpa_backend=auto or train.compile=false")


def _check_ds_config(ds: dict, train) -> None:
    """The JSON's values against the run, as the engine will resolve them, before anything is built.
    A null train.lr (fine-tuning's lr_auto) is only known later, so a JSON optimizer waits for the engine."""
    if train.get("lr") is None and "optimizer" in ds:
        return
    import torch

    from zerokit.backends.common import resolve_precision
    from zerokit.backends.deepspeed import resolve_ds_config
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolve_ds_config(ds, train, int(os.environ.get("WORLD_SIZE", "1")), None, resolve_precision(train.precision, device))


def _check_pretrained(cfg: Config, defaults: Config) -> None:
    """A pretrained model.name_or_path brings its vocabulary: a tokenizer trained here would not match it."""
    name, tokenizer = lookup(cfg, "model.name_or_path"), lookup(cfg, "data.tokenizer")
    if tokenizer is MISSING:
        return
    from zerokit.data.spm import KINDS  # light: config checks must not import transformers
    trained = ("train", *KINDS)
    if name and tokenizer in trained:
        raise UsageError(f"model.name_or_path={name} needs its own tokenizer, but data.tokenizer={tokenizer} would train a "
                         f"new vocabulary its weights do not know; set data.tokenizer={name}")
    vocab, default_vocab = lookup(cfg, "data.vocab_size"), lookup(defaults, "data.vocab_size")
    if tokenizer not in trained and vocab is not MISSING and vocab != default_vocab:
        log.warning("data.vocab_size=%s is ignored: it sizes a tokenizer trained on the corpus, and "
                    "data.tokenizer=%s brings its own vocabulary", vocab, tokenizer)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
