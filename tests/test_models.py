"""Model presets and their Hugging Face aliases."""
import pytest
import torch

from launch_util import REPO
from zerokit.config import load_config
from zerokit.errors import UsageError
from zerokit.models import PRESET_ALIASES, PRESETS, build_causal_lm, model_config, preset_name

# The published shapes (the hub's config.json of each model): layers, width, heads.
PUBLISHED = {"gpt2": (12, 768, 12), "gpt2-medium": (24, 1024, 16), "gpt2-large": (36, 1280, 20),
             "gpt2-xl": (48, 1600, 25), "llama-2-7b": (32, 4096, 32), "llama2-7b": (32, 4096, 32),
             "llama-3.2-1b": (16, 2048, 32)}


@pytest.mark.parametrize("alias", sorted(PUBLISHED))
def test_alias_is_the_published_shape(alias):
    cfg = model_config(alias)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == PUBLISHED[alias]
    assert cfg.to_dict() == model_config(PRESET_ALIASES[alias]).to_dict()


def test_gpt2_alias_builds_gpt2_small():
    # 124,439,808: GPT-2 small's published parameter count (tied embeddings, 1024 positions)
    with torch.device("meta"):
        model = build_causal_lm("GPT2", None, None, None)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808


def test_aliases_in_the_run_config_and_errors():
    cfg = load_config(REPO / "recipes" / "configs" / "pretrain_gpt.yaml", ["model.preset=gpt2-medium"])
    assert cfg.model.preset == "gpt2-350m"  # saved and resumed as the preset the alias names
    assert all(preset_name(p) == p for p in PRESETS) and preset_name("gpt3") is None
    for call in (lambda: load_config(REPO / "recipes" / "configs" / "pretrain_gpt.yaml", ["model.preset=gpt3"]),
                 lambda: build_causal_lm("gpt3", None, None, None)):
        with pytest.raises(UsageError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and all(name in message for name in [*PRESETS, *PRESET_ALIASES])
