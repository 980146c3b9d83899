import os

import pytest

from zerokit.config import load_config, parse_overrides
from zerokit.errors import UsageError

from launch_util import REPO

DEFAULTS = REPO / "recipes" / "configs" / "pretrain_gpt.yaml"
ZERO2 = REPO / "ds_configs" / "zero2.json"  # ds_config must name an existing JSON


def test_overrides_are_typed_and_nested():
    cfg = load_config(DEFAULTS, ["train.lr=1e-3", "train.max_steps=7", "model.grad_ckpt=true", f"ds_config={ZERO2}"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7 and cfg.model.grad_ckpt is True and cfg.ds_config == str(ZERO2)
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}
    # text YAML would drop as a comment stays text; the spellings of null stay null
    assert parse_overrides(["p=#Person1#:", "q=null", "r=", "s=~"]) == {"p": "#Person1#:", "q": None, "r": None, "s": None}


def test_int_default_accepts_only_ints():
    with pytest.raises(UsageError, match="train.max_steps.*expects an int"):
        load_config(DEFAULTS, ["train.max_steps=lots"])


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(UsageError, match="unknown config key 'train.max_step'.*train.max_steps"):
        load_config(DEFAULTS, ["train.max_step=3"])


def test_user_yaml_layer(tmp_path):
    user = tmp_path / "u.yaml"
    user.write_text("train:\n  lr: 0.01\n")
    cfg = load_config(DEFAULTS, ["train.max_steps=2"], user)
    assert cfg.train.lr == 0.01 and cfg.train.max_steps == 2


def test_malformed_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(UsageError, match=r"malformed YAML in .*bad.yaml at line"):
        load_config(DEFAULTS, [], bad)


# ---------------------------------------------------------------------------------------------- the schema
# Every key the code reads must be defined in the config of each recipe that runs that code: a key read by
# loop.py but defined only in the pre-training YAML (prometheus_port, once) breaks the fine-tuning recipes.
# Which code a recipe runs is its import closure (tests/test_architecture.py's graph); the reads are found
# with ast: `cfg.a.b`, `cfg.get("a")`, `t.b` after `t = cfg.train`, and `train.b` / `data.b` of a parameter so named.

import ast  # noqa: E402

from test_architecture import import_graph, modules  # noqa: E402

from zerokit.config import MISSING, load_layered_yaml, lookup  # noqa: E402

# A parameter of these names is that section of the run config (backends take `train`, data prep `data`).
SECTION_PARAMETERS = {"train", "data"}
_NOT_KEYS = {"get", "items", "keys", "values", "to_dict", "setdefault", "update", "pop", "copy"}


def _chain(node) -> tuple[str, list[str]] | None:
    """`cfg.a.b` -> ("cfg", ["a", "b"]); `cfg.a.get("b")` -> ("cfg", ["a", "b"])."""
    parts = []
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        parts.append(node.args[0].value)
        node = node.func.value
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return (node.id, parts[::-1]) if isinstance(node, ast.Name) and parts else None


def _binds(fn, name: str) -> bool:
    """Whether `fn` binds `name` to something of its own (then it is not the run config there)."""
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Store):
            return True
        if isinstance(node, ast.arg) and node.arg == name and node.annotation is not None \
                and "Config" not in ast.unparse(node.annotation).replace("PretrainedConfig", ""):
            return True
    return False


def config_reads(source: str) -> set[str]:
    """Dotted config keys that `source` reads (or writes)."""
    keys = set()
    tree = ast.parse(source)
    scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for fn in scopes:
        roots = {} if _binds(fn, "cfg") else {"cfg": []}
        for section in SECTION_PARAMETERS & {a.arg for a in fn.args.args + fn.args.kwonlyargs}:
            roots[section] = [section]
        for node in ast.walk(fn):  # aliases: t = cfg.train; ex, run_dir = cfg.export, Path(cfg.run_dir)
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                pairs = zip(node.targets[0].elts, node.value.elts) if isinstance(node.targets[0], ast.Tuple) \
                    and isinstance(node.value, ast.Tuple) else [(node.targets[0], node.value)]
                for target, value in pairs:
                    found = _chain(value)
                    if isinstance(target, ast.Name) and found and found[0] in roots and found[1][-1] not in _NOT_KEYS:
                        roots[target.id] = roots[found[0]] + found[1]
        methods = {id(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)}  # `x.split(...)`: no key
        for node in ast.walk(fn):
            found = None if id(node) in methods else _chain(node)
            if found and found[0] in roots:
                path = roots[found[0]] + found[1]
                while path and path[-1] in _NOT_KEYS:
                    path.pop()
                if path:
                    keys.add(".".join(path))
    return keys


def recipe_configs() -> dict[str, dict]:
    configs = REPO / "zerokit" / "recipes" / "configs"
    return {name: load_layered_yaml(configs / f"{name.rsplit('.', 1)[1]}.yaml")
            for name in modules() if name.startswith("zerokit.recipes.") and (configs / f"{name.rsplit('.', 1)[1]}.yaml").is_file()}


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen | {start}


def test_schema_reader_finds_every_kind_of_read():
    src = ('def f(cfg, train):\n'
           '    t = cfg.train\n    ex, d = cfg.export, Path(cfg.run_dir)\n'
           '    cfg.get("prometheus_port", 0); t.lr; ex.merge; train.get("compile"); cfg.model.get("dropout")\n'
           '    cfg.lora.target_modules.split(",")\n'
           'def g(model):\n    cfg = model.config\n    cfg.n_layer\n')
    assert config_reads(src) == {"train", "export", "run_dir", "prometheus_port", "train.lr", "export.merge",
                                 "train.compile", "model", "model.dropout", "lora", "lora.target_modules"}


def test_every_key_the_code_reads_is_defined():
    graph, mods = import_graph(), modules()
    configs = recipe_configs()
    assert set(configs) == {"zerokit.recipes.pretrain_gpt", "zerokit.recipes.finetune_sentiment",
                            "zerokit.recipes.finetune_summarization"}
    reads = {name: config_reads(path.read_text()) for name, path in mods.items()}
    missing = sorted(f"{recipe.rsplit('.', 1)[1]}.yaml lacks {key} (read in {module})"
                     for recipe, cfg in configs.items() for module in sorted(closure(graph, recipe))
                     for key in reads[module] if lookup(cfg, key) is MISSING)
    assert not missing, "; ".join(missing)
    # the reader really sees the loop's reads (so the check above is not vacuous)
    assert {"prometheus_port", "train.peak_tflops", "train.nonfinite", "report_to"} <= reads["zerokit.loop"]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def test_recipe_yaml_is_its_bases_plus_its_own_keys(tmp_path):
    """Each key resolves to the nearest file that sets it (recipe, then finetune.yaml, then base.yaml), and the
    run's saved config.yaml is that whole resolved config, without the `base:` entries."""
    import yaml

    from zerokit.config import save_config
    configs = REPO / "zerokit" / "recipes" / "configs"
    files = [yaml.safe_load((configs / f).read_text()) for f in ("finetune_sentiment.yaml", "finetune.yaml", "base.yaml")]
    expected = {}
    for layer in reversed(files):
        expected.update(_flat(layer))
    expected = {k: v for k, v in expected.items() if k != "base"}
    root = os.environ.get("ZEROKIT_DATA", "../shared/data")
    for key in ("data.train", "data.validation"):
        expected[key] = expected[key].replace("${ZEROKIT_DATA:-../shared/data}", root)
    cfg = load_config(configs / "finetune_sentiment.yaml", [])
    assert _flat(cfg.to_dict()) == expected
    assert cfg.train.micro_batch_size == 16 and cfg.train.grad_clip == 1.0 and cfg.lora.r == 16  # recipe, base, finetune
    save_config(cfg, tmp_path / "config.yaml")
    assert _flat(yaml.safe_load((tmp_path / "config.yaml").read_text())) == expected


def test_yaml_environment_references(tmp_path, monkeypatch):
    base = tmp_path / "b.yaml"
    base.write_text("x: 1\ndata:\n  path: ${ZK_TEST_ROOT:-fallback}/sst2\n  keep: 2\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: b.yaml\nx: 3\ndata:\n  extra: ${ZK_TEST_ROOT}\n")
    monkeypatch.delenv("ZK_TEST_ROOT", raising=False)
    with pytest.raises(UsageError, match=r"ZK_TEST_ROOT.*not set"):
        load_config(recipe, [])
    monkeypatch.setenv("ZK_TEST_ROOT", "/data")
    assert load_config(recipe, []).to_dict() == {"x": 3, "data": {"path": "/data/sst2", "keep": 2, "extra": "/data"}}
    base.unlink()
    with pytest.raises(UsageError, match="builds on b.yaml, which is not in"):
        load_config(recipe, [])
    base.write_text("base: r.yaml\n")
    with pytest.raises(UsageError, match="leads back to itself"):
        load_config(recipe, [])
