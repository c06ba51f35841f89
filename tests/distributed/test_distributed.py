"""Clipping under real torch.distributed (gloo, 2 and 4 processes) against one process.

Every check is made inside the worker processes (``_worker.py``) against a one-process reference
on the full model: every registered clipper (p in {1, 2, 3, inf} for the norm-based ones) over 6
steps with a gradient spike and a NaN step, the ``torch.nn.utils`` drop-ins, ``ClippedOptimizer``
(plain and fused/folded) and ``Monitor``. The clipped gradients, the ClipInfo, and that info and
the clippers' state are identical on every rank. Each test below asserts one topic of the run.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.filterwarnings("ignore")


# -- the launcher ---------------------------------------------------------------------------------
def test_a_failing_rank_stops_the_run_fast(launcher, tmp_path):
    """A rank that fails while another waits in a collective ends the run at once (no hang)."""
    import time

    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="deliberate failure on rank 1"):
        launcher(2, "crash", tmp_path, deadline=120)
    assert time.monotonic() - start < 50


# -- 2 processes ----------------------------------------------------------------------------------
def test_every_registered_clipper_is_covered(dist2):
    dist2.assert_ok("registry.every_clipper_covered")


def test_ddp_adds_no_reduction(dist2):
    """DDP gradients are already averaged: gradclip issues no collective at all."""
    dist2.assert_ok("ddp/no_extra_reduction")


def test_ddp_every_clipper_matches_one_process(dist2):
    dist2.assert_ok("ddp/", minimum=1000)


def test_fsdp2_fully_shard(dist2):
    dist2.assert_ok("fsdp2/grads_are_dtensors")
    dist2.assert_ok("fsdp2/", minimum=1000)


def test_tensor_parallel_mixed_dtensor_and_plain(dist2):
    dist2.assert_ok("tp/mixed_layout")
    dist2.assert_ok("tp/", minimum=1000)


def test_hand_made_dtensors_shard_replicate_partial(dist2):
    """Functional clip on DTensors (Shard(0), Shard(1), Replicate, Partial, plain) returns
    DTensors equal to one process's results; element-wise rewriting of Partial raises."""
    dist2.assert_ok("manual/partial_refused")
    dist2.assert_ok("manual/", minimum=1000)


def test_process_group_partition_and_rank_without_gradients(dist2):
    dist2.assert_ok("partition/rank_without_grads")
    dist2.assert_ok("partition/", minimum=500)


def test_tied_embeddings_counted_once(dist2):
    dist2.assert_ok("tied/", minimum=8)


def test_clipped_optimizer_under_ddp_fsdp2_tp(dist2):
    for layout in ("ddp", "fsdp2", "tp"):
        dist2.assert_ok(f"{layout}/optimizer/", minimum=50)


def test_monitor_under_ddp_fsdp2_tp(dist2):
    for layout in ("ddp", "fsdp2", "tp"):
        dist2.assert_ok(f"{layout}/monitor/", minimum=5)


def test_misc_two_processes(dist2):
    """Subset needs a seed; a DeviceMesh as process_group; NaN on one rank only."""
    dist2.assert_ok("misc/", minimum=4)


def test_p_norms_of_the_drop_ins(dist2):
    for layout in ("ddp", "fsdp2", "tp", "partition"):
        for p in ("1.0", "2.0", "3.0", "inf"):
            dist2.assert_ok(f"{layout}/clip_grad_norm_.p{p}")
            dist2.assert_ok(f"{layout}/get_total_norm.p{p}")


# -- 4 processes ------------------------------------------------------------------------------------
def test_hsdp_two_dimensional_mesh(dist4):
    """fully_shard on a (replicate, shard) mesh: placements (Replicate, Shard(0))."""
    dist4.assert_ok("hsdp/", minimum=1000)


def test_fsdp2_with_tensor_parallel(dist4):
    """FSDP2 over dp and tensor parallel over tp: 2-D placements and two meshes in one list."""
    dist4.assert_ok("fsdp2_tp/mixed_layout")
    dist4.assert_ok("fsdp2_tp/", minimum=1000)


def test_hand_made_dtensors_on_two_meshes(dist4):
    dist4.assert_ok("manual/", minimum=1000)


def test_partition_with_rank_without_gradients_four_ranks(dist4):
    dist4.assert_ok("partition/rank_without_grads")
    dist4.assert_ok("partition/", minimum=300)


def test_misc_four_processes(dist4):
    dist4.assert_ok("misc/", minimum=4)
