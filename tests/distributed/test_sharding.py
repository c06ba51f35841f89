"""FSDP1, per-parameter reduction groups, CPU offload and scale under real torch.distributed.

One launch per world size (gloo, 2 and 4 processes) runs every scenario of
``_worker_sharding.py``; each test below asserts one topic of it. References are computed in the
workers: FSDP1's own ``clip_grad_norm_`` on an identical model, and one process holding every
parameter whole.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import DEADLINE, Run, launch

pytestmark = pytest.mark.filterwarnings("ignore")
WORKER = Path(__file__).with_name("_worker_sharding.py")


def _needs(module: str, reason: str) -> None:
    """Skip unless ``module`` is installed, without importing it here (the workers import it)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.skip(reason)


def _launch(world: int, tmp_path_factory) -> Run:
    torch = pytest.importorskip("torch")
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    # DeepSpeed on CPU JIT-builds a small communication op once (~30 s): keep it in a cache.
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gradclip" / "torch_extensions"
    env = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(cache))}
    return launch(world, "sharding", tmp_path_factory.mktemp(f"sharding{world}"), DEADLINE[world], worker=WORKER, env_extra=env)


@pytest.fixture(scope="session")
def sharding2(tmp_path_factory) -> Run:
    return _launch(2, tmp_path_factory)


@pytest.fixture(scope="session")
def sharding4(tmp_path_factory) -> Run:
    return _launch(4, tmp_path_factory)


@pytest.fixture(params=[2, 4], ids=["2proc", "4proc"])
def sharding(request) -> Run:
    return request.getfixturevalue(f"sharding{request.param}")


# -- FSDP1 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"])
@pytest.mark.parametrize("orig", [0, 1], ids=["flat", "use_orig_params"])
def test_fsdp1_global_norm_equals_fsdp_clip_grad_norm(sharding, strategy, orig):
    """No process_group passed: p in {1, 2, inf}, 3 steps (one a spike); the norm equals FSDP1's
    own clip_grad_norm_ and the one-process norm on every rank, and the clipped gradients are
    FSDP1's."""
    tag = f"fsdp1/{strategy}.orig{orig}"
    for label in ("p2", "p1", "pinf"):
        sharding.assert_ok(f"{tag}.{label}.norm_equals_fsdp_clip_grad_norm", minimum=3)
        sharding.assert_ok(f"{tag}.{label}.norm_equals_one_process", minimum=3)
        sharding.assert_ok(f"{tag}.{label}.clipped_grads_equal", minimum=3)
        sharding.assert_ok(f"{tag}.{label}.same_on_every_rank", minimum=3)


@pytest.mark.parametrize("orig", [0, 1], ids=["flat", "use_orig_params"])
def test_fsdp1_hybrid_shard_counts_replicas_once(sharding4, orig):
    """HSDP on a 2 x 2 mesh: reduced over the shard group only; equal to FSDP1 and one process."""
    tag = f"fsdp1/HYBRID_SHARD.orig{orig}"
    sharding4.assert_ok(f"{tag}.p2.norm_equals_fsdp_clip_grad_norm", minimum=3)
    sharding4.assert_ok(f"{tag}.p2.norm_equals_one_process", minimum=3)
    sharding4.assert_ok(f"{tag}.pinf.norm_equals_one_process", minimum=3)


@pytest.mark.parametrize("strategy", ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"])
def test_fsdp1_per_tensor_methods_on_original_parameter_views(sharding, strategy):
    """Norm (p=2, inf), BlockRMS and AdaGC under use_orig_params=True: every rank's 1-D views
    equal the same slices of one process's clipped gradients."""
    for name in ("norm", "norm.pinf", "block_rms", "adagc"):
        sharding.assert_ok(f"fsdp1/{strategy}.orig1.{name}.view_equals_one_process", minimum=3)
        sharding.assert_ok(f"fsdp1/{strategy}.orig1.{name}.info_norm", minimum=3)


@pytest.mark.parametrize("label", ["norm", "chain_with_adagc", "flat_list_without_module"])
def test_fsdp1_flat_parameters_refuse_per_tensor_clippers(sharding, label):
    """use_orig_params=False: per-tensor clippers (also inside a Chain) and flat parameters given
    without their module raise, naming the flat parameter and its group; nothing is clipped."""
    for strategy in ("FULL_SHARD", "NO_SHARD"):
        sharding.assert_ok(f"fsdp1/{strategy}.orig0.refused.{label}")
        sharding.assert_ok(f"fsdp1/{strategy}.orig0.refused.{label}.nothing_clipped")


# -- per-parameter reduction groups -----------------------------------------------------------------
@pytest.mark.parametrize("source", ["spec", "megatron"])
@pytest.mark.parametrize("clipper", ["global_norm.p2", "global_norm.p1", "global_norm.pinf", "norm", "adagc", "zclip"])
def test_reduction_spec_equals_one_process(sharding, source, clipper):
    """TP=2 (2 processes; x PP=2 with the embedding tied across the stages on 4), TP-replicated
    LayerNorm weights and row-parallel biases, experts: a ReductionSpec (patterns), and the
    Megatron adapter reading the same parameters' attributes, give one process's norm and
    clipped gradients on every rank, per-tensor methods included (whole tensors' norms)."""
    tag = f"groups/{source}.{clipper}"
    sharding.assert_ok(f"{tag}.norm_equals_one_process", minimum=3)
    sharding.assert_ok(f"{tag}.grads_equal_one_process", minimum=3)
    sharding.assert_ok(f"{tag}.same_on_every_rank", minimum=3)


def test_megatron_adapter_equals_megatrons_filtered_sum_of_squares(sharding):
    """Megatron-core's rule (param_is_not_tensor_parallel_duplicate, param_is_not_shared, summed
    over the model-parallel group; experts over the expert group), computed on CPU; and a plain
    process_group= over-counts the replicas (the reported inflation)."""
    sharding.assert_ok("groups/megatron_filtered_sum_of_squares", minimum=3)
    sharding.assert_ok("groups/plain_process_group_overcounts", minimum=3)


@pytest.mark.parametrize(
    "case",
    [
        "named_by_two_groups",
        "group_without_this_rank",
        "sharded_parameter_unassigned",
        "parameter_unassigned",
        "shard_group_outside_spec_group",
        "gradient_not_in_spec",
    ],
)
def test_reduction_spec_bad_input(sharding, case):
    """A clear error naming the parameter and the group; nothing clipped."""
    sharding.assert_ok(f"groups/bad_input.{case}")
    sharding.assert_ok(f"groups/bad_input.{case}.nothing_clipped")


# -- Lightning ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("orig", [0, 1], ids=["flat", "use_orig_params"])
def test_lightning_callback_under_fsdp1_strategy(sharding2, orig):
    """Trainer.fit with Lightning's FSDP1 strategy (2 gloo processes): GradClipCallback finds the
    FSDP1 layout itself and its norm equals FSDP1's clip_grad_norm_ at every step."""
    _needs("lightning", "lightning is not installed")
    tag = f"lightning/fsdp1.orig{orig}"
    sharding2.assert_ok(f"{tag}.ran_three_steps")
    sharding2.assert_ok(f"{tag}.norm_equals_fsdp_clip_grad_norm", minimum=3)
    sharding2.assert_ok(f"{tag}.callback_uses_the_fsdp_layout")


@pytest.mark.parametrize("strategy", ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"])
def test_fsdp1_original_parameters_need_their_module(sharding, strategy):
    """use_orig_params=True parameters passed as a list: refused (their group is unknown), and
    accepted with gradclip.torch.fsdp.reduction(model) set on the clipper."""
    tag = f"fsdp1/{strategy}.orig1"
    sharding.assert_ok(f"{tag}.orig_list_without_module_refused")
    sharding.assert_ok(f"{tag}.orig_list_without_module_refused.nothing_clipped")
    sharding.assert_ok(f"{tag}.orig_list_with_reduction")


# -- DeepSpeed ZeRO -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stage, clipper",
    [(1, "global_norm.noclip"), (2, "global_norm.noclip"), (3, "global_norm.noclip"), (1, "global_norm"), (3, "global_norm"), (2, "zclip")],
)
def test_deepspeed_zero_equals_one_process_and_engine_norm(sharding2, stage, clipper):
    """gradclip.deepspeed.attach on a real engine (CPU, gloo, client AdamW, 4 steps, one a
    spike): norms and coefficients equal one process training the whole model with the same
    clipper; the engine's get_global_grad_norm() is the clipped norm (the full norm when
    nothing is clipped); the engine's own clip is off while attached."""
    _needs("deepspeed", "deepspeed is not installed (requirements/dev.txt)")
    tag = f"deepspeed/zero{stage}.{clipper}"
    sharding2.assert_ok(f"{tag}.norm_equals_one_process", minimum=4)
    sharding2.assert_ok(f"{tag}.coef_equals_one_process", minimum=4)
    sharding2.assert_ok(f"{tag}.engine_norm_is_clipped_norm", minimum=4)
    sharding2.assert_ok(f"{tag}.same_on_every_rank", minimum=4)
    sharding2.assert_ok(f"{tag}.engine_clip_off_while_attached")


@pytest.mark.parametrize("clipper", ["norm", "adagc"])
def test_deepspeed_zero3_per_tensor_methods(sharding2, clipper):
    """ZeRO-3 holds one shard per parameter: per-tensor methods see whole parameters' norms."""
    _needs("deepspeed", "deepspeed is not installed (requirements/dev.txt)")
    sharding2.assert_ok(f"deepspeed/zero3.{clipper}.norm_equals_one_process", minimum=4)
    sharding2.assert_ok(f"deepspeed/zero3.{clipper}.coef_equals_one_process", minimum=4)


@pytest.mark.parametrize("case", ["zero1_per_tensor", "zero2_agc", "zero0"])
def test_deepspeed_unsupported_refused(sharding2, case):
    """Per-tensor/unit-wise methods on ZeRO-1/2 flat slices, and an engine without ZeRO: a clear
    error naming the stage; the engine is left as it was."""
    _needs("deepspeed", "deepspeed is not installed (requirements/dev.txt)")
    sharding2.assert_ok(f"deepspeed/refused.{case}")
    sharding2.assert_ok(f"deepspeed/refused.{case}.engine_untouched")


def test_transformers_callback_under_deepspeed(sharding2):
    """Trainer(deepspeed=ZeRO-2 config) on 2 CPU processes: GradClipCallback attaches at the
    engine's clip point by itself, logs the same pre-clip norms on every rank, and the engine's
    own norm is the clipped one."""
    _needs("deepspeed", "deepspeed is not installed (requirements/dev.txt)")
    _needs("transformers", "transformers is not installed")
    for name in ("attached", "three_steps_logged", "same_on_every_rank", "clipped", "engine_norm_is_clipped_norm"):
        sharding2.assert_ok(f"hf_deepspeed/{name}")


# -- Megatron-core ----------------------------------------------------------------------------------
def test_megatron_core_tp2_equals_its_filtered_norm(sharding2):
    """Real ColumnParallelLinear/RowParallelLinear (TP=2, CPU, gloo): the adapter (groups from
    Megatron's parallel_state) equals Megatron's own filtered sum of squares over the
    model-parallel group and the whole tensors' norm; plain process_group= over-counts."""
    _needs("megatron", "megatron-core is not installed (requirements/megatron.txt)")
    sharding2.assert_ok("megatron_core/norm_equals_filtered_sum_of_squares", minimum=3)
    sharding2.assert_ok("megatron_core/norm_equals_whole_tensors", minimum=3)
    sharding2.assert_ok("megatron_core/plain_process_group_overcounts", minimum=3)
    sharding2.assert_ok("megatron_core/attributes_as_documented")


# -- scale ------------------------------------------------------------------------------------------------
def test_20000_dtensor_gradients_linear_cost(sharding2):
    """2,000 and 20,000 DTensor gradients clipped in place on 2 processes: aten operations and
    Python calls at most linear in the count (and few Python calls per tensor), collectives
    constant (counted, not timed); equal to torch's DTensor clip_grad_norm_ side by side (on
    300: torch's own cost grows faster than linearly)."""
    sharding2.assert_ok("scale/dtensor.ops_at_most_linear")
    sharding2.assert_ok("scale/dtensor.collectives_independent_of_count")
    sharding2.assert_ok("scale/dtensor.python_calls_at_most_linear")
    sharding2.assert_ok("scale/dtensor.python_calls_per_tensor")
    sharding2.assert_ok("scale/dtensor.norm_equals_torch")
    sharding2.assert_ok("scale/dtensor.grads_equal_torch", minimum=100)


# -- CPU-resident partial sums ------------------------------------------------------------------------
def test_cpu_partial_sums_under_gloo(sharding):
    """CPU DTensor gradients (as CPU offload leaves them): reduced on CPU by gloo, equal to one
    process; the NCCL case (sums moved to the GPU and back) is test_cuda_offload.py."""
    sharding.assert_ok("offload/gloo_keeps_cpu_sums_on_cpu")
    sharding.assert_ok("offload/cpu_dtensor_norm_equals_one_process", minimum=3)
    sharding.assert_ok("offload/norm_stays_on_cpu", minimum=3)
