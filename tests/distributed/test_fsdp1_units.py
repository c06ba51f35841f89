"""AGC on FSDP1 ``use_orig_params=True`` views under real torch.distributed (gloo, 2 and 4
processes): each rank holds 1-D pieces of the parameters that cut rows anywhere, and the rows'
norms are formed over the shard group (``gradclip/backends/torch_fsdp_units.py``). References
are computed in the workers (``_worker_fsdp_units.py``): one process, the same model whole.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DEADLINE, Run, launch

pytestmark = pytest.mark.filterwarnings("ignore")
WORKER = Path(__file__).with_name("_worker_fsdp_units.py")


def _launch(world: int, tmp_path_factory) -> Run:
    torch = pytest.importorskip("torch")
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    return launch(world, "fsdp1_units", tmp_path_factory.mktemp(f"units{world}"), DEADLINE[world], worker=WORKER)


@pytest.fixture(scope="session")
def units2(tmp_path_factory) -> Run:
    return _launch(2, tmp_path_factory)


@pytest.fixture(scope="session")
def units4(tmp_path_factory) -> Run:
    return _launch(4, tmp_path_factory)


@pytest.fixture(params=[2, 4], ids=["2proc", "4proc"])
def units(request) -> Run:
    return request.getfixturevalue(f"units{request.param}")


@pytest.mark.parametrize("strategy", ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"])
@pytest.mark.parametrize("label", ["agc", "agc.exclude", "agc.skip"])
def test_agc_on_views_equals_one_process(units, strategy, label):
    """3 steps (one a spike): the norm, the effective coefficient and every rank's clipped views
    equal one process clipping the whole model; units were clipped."""
    tag = f"units/{strategy}.{label}"
    for name in ("norm_equals_one_process", "coef_equals_one_process", "clipped_equals_one_process", "same_on_every_rank", "rank_holds_views"):
        units.assert_ok(f"{tag}.{name}", minimum=3)
    units.assert_ok(f"{tag}.view_equals_one_process", minimum=3)
    units.assert_ok(f"{tag}.some_unit_clipped")


def test_agc_on_hybrid_shard_views_counts_replicas_once(units4):
    """HSDP (2 x 2): rows reduced over the shard group only; equal to one process."""
    for label in ("agc", "agc.exclude"):
        units4.assert_ok(f"units/HYBRID_SHARD.{label}.norm_equals_one_process", minimum=3)
        units4.assert_ok(f"units/HYBRID_SHARD.{label}.view_equals_one_process", minimum=3)


def test_agc_collectives_do_not_grow_with_the_tensor_count(units2):
    """Counted, not timed: five times more parameter tensors, the same all-reduces."""
    units2.assert_ok("units/collectives_independent_of_depth")


@pytest.mark.parametrize("case", ["axis_on_views", "agc_on_flat", "chain_agc_on_flat", "unsharded"])
def test_agc_refusals_name_the_parameter_and_clip_nothing(units2, case):
    """A unit axis views cannot give; AGC (alone or in a Chain) on use_orig_params=False flat
    parameters; views unsharded (inside summon_full_params): a clear error naming the parameter
    (and the flat parameter's group), nothing clipped."""
    units2.assert_ok(f"units/refused.{case}")
    units2.assert_ok(f"units/refused.{case}.nothing_clipped")
