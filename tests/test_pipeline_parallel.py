"""Issue 18, pipeline parallelism (parallel.pipeline, zerokit/pipeline.py, zerokit/backends/pipeline.py): the
stage split against brute force and the stages against the whole model in one process; the settings it
refuses; and runs on 2 and 4 CPU ranks over gloo (both schedules, pipeline x data parallel, a resumed
checkpoint, the merged weights) against one plain process of the same global batch, loss and gradient norm step by step."""
import itertools
import json
import math

import pytest
import torch

from launch_util import REPO, metrics, pretrain_many
from zerokit.dist import DistInfo, init_distributed
from zerokit.errors import UsageError
from zerokit.export import checkpoint_weights
from zerokit.models import build_causal_lm
from zerokit.pipeline import Stage, balanced_split, check_pipeline, stage_layers

STEPS = 10
TIED_STEPS = 4  # llama-demo (tied head) costs 4x llama-tiny a step
LLAMA = ["model.preset=llama-tiny", f"train.max_steps={STEPS}", "train.micro_batch_size=4", "train.grad_clip=1.0",
         "sample.max_new_tokens=0"]


def llama(preset: str = "llama-tiny", layers: int | None = None):
    model = build_causal_lm(preset, None, 512, 32, 0.0)
    if layers is not None:  # the check reads the config
        model.config.num_hidden_layers = layers
    return model


def test_balanced_split_is_the_best_contiguous_split():
    """Against every way of cutting the items into non-empty runs of consecutive items."""
    for costs, parts in (([5, 1, 1, 1, 1, 5], 2), ([9, 1, 1, 1, 9, 2, 2], 3), ([3, 3, 3, 3], 4), ([1, 8, 1], 2)):
        n = len(costs)
        best = min(max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, n)))
                   for cuts in itertools.combinations(range(1, n), parts - 1))
        bounds = balanced_split(costs, parts)
        assert bounds[0] == 0 and bounds[-1] == n and all(a < b for a, b in zip(bounds, bounds[1:]))
        assert max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])) == best, (costs, parts, bounds)


@pytest.mark.parametrize("preset, split", [("llama-tiny", [[0], [1]]), ("llama-demo", [[0, 1], [2, 3]])])
def test_stages_chained_are_the_whole_model(preset, split):
    """Two stages' forwards in one process give the model's logits; together they hold each parameter once,
    under the model's own names (what makes a checkpoint's shards the whole state dict). llama-demo ties its
    head to the embedding: the first stage holds it as the embedding, the last as the head."""
    model = llama(preset)
    layers = stage_layers(model, 2)
    assert [list(r) for r in layers] == split  # tiny: embedding + block 0 against block 1 + norm + head
    first, last = Stage(model, layers[0], 0, 2), Stage(model, layers[1], 1, 2)
    names = [*first.state_dict(), *last.state_dict()]
    assert sorted(names) == sorted(model.state_dict())
    tied = preset == "llama-demo"
    assert (first.tied_copy, last.tied_copy) == ((model.lm_head.weight,) * 2 if tied else (None, None))
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(last(first(ids)), model(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_data_parallel_ranks_within_a_pipeline():
    """The pipeline is the outer mesh dimension: rank = stage * dp + d; a replica's stages read the same data."""
    infos = [DistInfo(r, 8, r, torch.device("cpu"), pipeline_parallel=2) for r in range(8)]
    assert [i.pp_rank for i in infos] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [i.dp_rank for i in infos] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert {i.dp_size for i in infos} == {4} and {i.model_parallel for i in infos} == {2}


def test_refused_settings_get_one_clear_error(monkeypatch):
    with pytest.raises(UsageError, match="Llama-family"):
        check_pipeline(build_causal_lm("gpt-tiny", None, 512, 32, 0.0), 2, "1f1b", 2)
    with pytest.raises(UsageError, match="mixture of experts"):
        check_pipeline(llama("moe-tiny"), 2, "1f1b", 2)
    with pytest.raises(UsageError, match="at least one decoder layer per stage"):
        check_pipeline(llama(), 3, "gpipe", 4)
    with pytest.raises(UsageError, match="raise train.grad_accum to 2"):
        check_pipeline(llama(), 2, "1f1b", 1)
    check_pipeline(llama(), 2, "gpipe", 1)  # GPipe takes any number of micro-batches
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UsageError, match="does not divide the 3 ranks"):
        init_distributed(pipeline_parallel=2)
    with pytest.raises(UsageError, match="set one of them to 1"):
        init_distributed(tensor_parallel=2, pipeline_parallel=2)


def test_engines_refuse_what_they_cannot_serve():
    """Checked before any collective, so one process can stand for rank 0 of 2."""
    from zerokit.backends import make_backend
    from zerokit.config import load_config
    train = load_config(REPO / "recipes" / "configs" / "pretrain_gpt.yaml", ["train.grad_accum=2"]).train
    rank0_of_2 = DistInfo(0, 2, 0, torch.device("cpu"), pipeline_parallel=2)
    with pytest.raises(UsageError, match="drop the DeepSpeed config"):
        make_backend(llama(), train, rank0_of_2, ds_config="zero1.json")
    with pytest.raises(UsageError, match="drop fsdp_offload"):
        make_backend(llama(), train, rank0_of_2, fsdp="full_shard", fsdp_offload=True)
    train.precision = "fp16"
    with pytest.raises(UsageError, match="train.precision=bf16 or fp32"):
        make_backend(llama(), train, rank0_of_2)


def test_a_checkpoint_of_another_pipeline_size_is_refused():
    """The optimizer state is laid out per stage: the checkpoint's identity names the pipeline size."""
    from zerokit.config import load_config
    from zerokit.manifest import identity, identity_mismatch
    configs = REPO / "recipes" / "configs" / "pretrain_gpt.yaml"
    two, one = (identity(load_config(configs, [f"parallel.pipeline={n}"]), None) for n in (2, 1))
    assert identity_mismatch(two, one) == "parallel.pipeline=2 (this run: parallel.pipeline=1)"
    assert identity_mismatch(two, two) is None


def _steps(run_dir) -> dict[int, tuple[float, float]]:
    return {m["step"]: (m["loss"], m["grad_norm"]) for m in metrics(run_dir) if "loss" in m}


def _worst(got: dict, want: dict, steps) -> tuple[float, float]:
    """Largest relative difference of the losses and of the gradient norms over `steps`."""
    loss, norm = ([abs(got[s][k] - want[s][k]) / abs(want[s][k]) for s in steps] for k in (0, 1))
    return max(loss), max(norm)


@pytest.mark.slow  # a 1-rank launch of 2 runs, a 4-rank launch of 2, a 2-rank launch of 4: ~1.5 min on the shared machine
def test_pipeline_equals_one_process_resumes_and_exports(tmp_path):
    cache = tmp_path / "cache"
    dirs = {n: tmp_path / n for n in ("ref", "gpipe", "1f1b", "pp2_dp2", "pp2_fsdp2", "resumed", "ref_tied", "tied")}
    # One process, 4 micro-batches a step; the pipelines run the same 4 (2 a step per replica with dp=2: the
    # loader deals samples to data-parallel ranks in the order one process accumulates them).
    tied = [*LLAMA, "model.preset=llama-demo", f"train.max_steps={TIED_STEPS}", "train.grad_accum=2"]
    pretrain_many([[*LLAMA, "train.grad_accum=4", f"train.checkpoint_every={STEPS}", f"run_dir={dirs['ref']}"],
                   [*tied, f"run_dir={dirs['ref_tied']}"]], nproc=1, cache=cache, workdir=tmp_path)
    half = STEPS // 2
    # 2 stages x 2 replicas: replicated (gradients all-reduced), and FSDP2-sharded over the replicas.
    pretrain_many([[*LLAMA, "train.grad_accum=2", "parallel.pipeline=2", f"run_dir={dirs['pp2_dp2']}"],
                   [*LLAMA, "train.grad_accum=2", "parallel.pipeline=2", "fsdp=full_shard",
                    f"train.checkpoint_every={half}", f"run_dir={dirs['pp2_fsdp2']}"]], nproc=4, cache=cache,
                  workdir=tmp_path)
    # Both schedules on 2 ranks, the FSDP run's step-5 checkpoint resumed by a pipeline without replicas, and
    # a tied head (the first and the last stage sum their copies' gradients).
    pipe = [*LLAMA, "train.grad_accum=4", "parallel.pipeline=2"]
    pretrain_many([*([*pipe, f"parallel.pipeline_schedule={kind}", f"run_dir={dirs[kind]}"] for kind in ("gpipe", "1f1b")),
                   [*pipe, f"run_dir={dirs['resumed']}", f"resume={dirs['pp2_fsdp2'] / 'checkpoints' / f'step_{half}'}"],
                   [*tied, "parallel.pipeline=2", f"run_dir={dirs['tied']}"]],
                  nproc=2, cache=cache, workdir=tmp_path)
    want = _steps(dirs["ref"])
    assert sorted(want) == list(range(1, STEPS + 1))
    table = {}
    for name in ("gpipe", "1f1b", "pp2_dp2", "pp2_fsdp2"):
        table[name] = _worst(_steps(dirs[name]), want, range(1, STEPS + 1))
    table["resumed"] = _worst(_steps(dirs["resumed"]), want, range(half + 1, STEPS + 1))
    table["tied"] = _worst(_steps(dirs["tied"]), _steps(dirs["ref_tied"]), range(1, TIED_STEPS + 1))
    print("max relative difference (loss, grad norm) vs one process:", json.dumps(table))
    # A norm over one stage's parameters, a loss from one stage or replicas reading the same data all miss by
    # far more (a stage's share of the norm, a zero loss, another batch's loss).
    for name, (loss_rel, norm_rel) in table.items():
        assert loss_rel <= 1e-5 and norm_rel <= 1e-5, (name, table)
    summaries = {n: json.loads((dirs[n] / "summary.json").read_text()) for n in ("ref", "gpipe", "1f1b", "pp2_fsdp2")}
    for n in ("gpipe", "1f1b", "pp2_fsdp2"):
        assert summaries[n]["tokens_seen"] == summaries["ref"]["tokens_seen"]
    for n in ("gpipe", "1f1b"):  # the evaluation runs the pipeline forward (with dp=2 it reads other batches)
        assert math.isclose(summaries[n]["val_loss"], summaries["ref"]["val_loss"], rel_tol=1e-5), (n, summaries)
    assert summaries["pp2_fsdp2"]["world_size"] == 4 and summaries["pp2_fsdp2"]["backend"] == "pipeline"

    # What `zerokit export` reads (zerokit.export.checkpoint_weights): the stages' FSDP shards merge into the
    # whole model, the plain run's weights. (`zerokit export` of a pipeline checkpoint, run by hand: within 3.8e-7.)
    got = checkpoint_weights(dirs["pp2_fsdp2"] / "checkpoints" / f"step_{STEPS}")
    want_weights = checkpoint_weights(dirs["ref"] / "checkpoints" / f"step_{STEPS}")
    assert got.keys() == want_weights.keys() == build_causal_lm("llama-tiny", None, 512, 32, 0.0).state_dict().keys()
    for name, weight in want_weights.items():  # AdamW amplifies summation-order noise (see test_tensor_parallel)
        torch.testing.assert_close(got[name], weight, rtol=0, atol=3e-5, msg=name)
