"""The files that ship inside the package (the recipes, their YAMLs, the DeepSpeed JSONs), found through
the package itself, so an installed zerokit (`pip install .`, no repository) finds them the same way."""
from __future__ import annotations

from pathlib import Path

from zerokit.errors import UsageError

PACKAGE = Path(__file__).resolve().parent
RECIPES = PACKAGE / "recipes"
RECIPE_CONFIGS = RECIPES / "configs"
DS_CONFIGS = PACKAGE / "ds_configs"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.py") if not p.name.startswith("_"))


def recipe_script(name: str) -> Path:
    """`pretrain_gpt`, `pretrain_gpt.py` or `recipes/pretrain_gpt.py` -> the packaged script."""
    stem = Path(name).name.removesuffix(".py")
    if stem not in recipe_names() or ("/" in name and Path(name).parent.name != "recipes"):
        raise UsageError(f"unknown recipe {name!r}; choose one of {', '.join(recipe_names())}")
    return RECIPES / f"{stem}.py"


def ds_config_names() -> list[str]:
    return sorted(p.stem for p in DS_CONFIGS.glob("*.json"))


def find_ds_config(value: str | None) -> str | None:
    """`ds_config=` as given: a path that exists (relative to the working directory) is used as it is;
    otherwise a packaged name, written `zero2`, `zero2.json` or `ds_configs/zero2.json`, is the packaged JSON."""
    if not value or Path(value).expanduser().exists():
        return value
    path = Path(value)
    if path.parent in (Path("."), Path("ds_configs")) and path.stem in ds_config_names() and path.suffix in ("", ".json"):
        return str(DS_CONFIGS / f"{path.stem}.json")
    raise UsageError(f"DeepSpeed config not found: {value}; pass an existing JSON path, or a packaged name "
                     f"({', '.join(ds_config_names())}), e.g. ds_config=zero2 (ds_config=ds_configs/zero2.json "
                     "names it too where no such file exists)")


def copy_configs(dest: Path) -> list[Path]:
    """Copy the recipe YAMLs (dest/recipes/) and DeepSpeed JSONs (dest/ds_configs/) to `dest`; refuses
    to overwrite (before copying anything), so an edited copy is never lost."""
    import shutil
    pairs = [(p, dest / "recipes" / p.name) for p in sorted(RECIPE_CONFIGS.glob("*.yaml"))]
    pairs += [(p, dest / "ds_configs" / p.name) for p in sorted(DS_CONFIGS.glob("*.json"))]
    existing = [str(d) for _, d in pairs if d.exists()]
    if existing:
        raise UsageError(f"{len(existing)} file(s) already there, e.g. {existing[0]}; not overwriting: "
                         "pick another folder (zerokit configs DEST) or move them away")
    for src, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return [d for _, d in pairs]


def configs_main(argv: list[str]) -> int:
    import argparse
    p = argparse.ArgumentParser(
        prog="zerokit configs", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Copy the recipes' YAML defaults and the DeepSpeed JSONs out of the package, for editing.",
        epilog="example:\n  zerokit configs my_configs\n"
               "  zerokit train pretrain_gpt --config my_configs/recipes/pretrain_gpt.yaml "
               "ds_config=my_configs/ds_configs/zero2.json")
    p.add_argument("dest", nargs="?", default="zerokit_configs", help="folder to copy into (default: zerokit_configs)")
    dest = Path(p.parse_args(argv).dest)
    copied = copy_configs(dest)
    print(f"copied {len(copied)} files into {dest}/: recipes/*.yaml (pass one with --config), "
          "ds_configs/*.json (pass one with ds_config=)")
    return 0
