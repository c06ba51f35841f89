"""Clipping under real torch.distributed (gloo, 2 and 4 processes) against one process.

Every check is made inside the worker processes (``_worker.py``) against a one-process reference
on the full model, whose 3-row and 1-row layers leave uneven and empty shards: every registered
clipper (p in {1, 2, 3, inf} for the norm-based ones) over 6 steps with a gradient spike and a
NaN step, the ``torch.nn.utils`` drop-ins, ``ClippedOptimizer`` (plain and fused/folded) and
``Monitor``. The clipped gradients, the ClipInfo, and that info and the clippers' state are
identical on every rank. Each test below asserts one topic of the run.
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


# -- 2 and 4 processes -------------------------------------------------------------------------------
def test_every_registered_clipper_is_covered(dist2):
    dist2.assert_ok("registry.every_clipper_covered")


def test_ddp_adds_no_reduction(dist_run):
    """DDP gradients are already averaged: gradclip issues no collective at all."""
    dist_run.assert_ok("ddp/no_extra_reduction")


def test_ddp_every_clipper_matches_one_process(dist_run):
    dist_run.assert_ok("ddp/", minimum=1000)


def test_fsdp2_fully_shard(dist_run):
    """1-D fully_shard; the 3-row and 1-row layers leave uneven and empty local shards."""
    dist_run.assert_ok("fsdp2/grads_are_dtensors")
    dist_run.assert_ok("fsdp2/uneven_and_empty_shards")
    dist_run.assert_ok("fsdp2/", minimum=1000)


def test_tensor_parallel_mixed_dtensor_and_plain(dist_run):
    dist_run.assert_ok("tp/mixed_layout")
    dist_run.assert_ok("tp/", minimum=1000)


def test_hand_made_dtensors_shard_replicate_partial(dist_run):
    """Functional clip on DTensors (Shard(0), Shard(1), Replicate, Partial, plain; 1-D meshes, and
    2-D ones on 4 processes; uneven and empty shards) returns DTensors equal to one process's
    results; element-wise rewriting of Partial raises."""
    dist_run.assert_ok("manual/every_parameter_laid_out")
    dist_run.assert_ok("manual/uneven_and_empty_shards")
    dist_run.assert_ok("manual/partial_refused")
    dist_run.assert_ok("manual/", minimum=1000)


def test_process_group_partition_and_rank_without_gradients(dist_run):
    dist_run.assert_ok("partition/rank_without_grads")
    dist_run.assert_ok("partition/", minimum=300)


def test_subset_with_process_group_on_ranks_without_gradients(dist_run):
    """Subset (seed given) with rank 0 holding every gradient and the others none."""
    dist_run.assert_ok("partition/without_grads/", minimum=50)


def test_dtensors_mixed_with_plain_tensors_under_process_group(dist_run):
    """DTensors (uneven and empty shards among them) and plain tensors partitioned over the
    group in one list; the last rank holds no plain gradient."""
    dist_run.assert_ok("mixed/rank_without_plain_grads")
    dist_run.assert_ok("mixed/uneven_and_empty_shards")
    dist_run.assert_ok("mixed/", minimum=1000)


def test_tied_embeddings_counted_once(dist_run):
    dist_run.assert_ok("tied/", minimum=8)


def test_clipped_optimizer_under_ddp_fsdp2_tp(dist_run):
    for layout in ("ddp", "fsdp2", "tp"):
        dist_run.assert_ok(f"{layout}/optimizer/", minimum=50)
    dist_run.assert_ok("partition/optimizer/", minimum=5)


def test_monitor_under_ddp_fsdp2_tp_and_process_group(dist_run):
    for layout in ("ddp", "fsdp2", "tp"):
        dist_run.assert_ok(f"{layout}/monitor/", minimum=5)
    dist_run.assert_ok("partition/monitor/", minimum=10)


def test_misc(dist_run):
    """Subset needs a seed; a DeviceMesh as process_group; NaN on one rank only (seen by every
    rank; under nonfinite="raise" every rank raises, the others saying it is on another rank);
    a Partial DTensor whose finite parts overflow when added is named."""
    dist_run.assert_ok("misc/raise_nan_on_another_rank/")
    dist_run.assert_ok("misc/raise_names_partial_overflow")
    dist_run.assert_ok("misc/", minimum=8)


def test_p_norms_of_the_drop_ins(dist_run):
    for layout in ("ddp", "fsdp2", "tp", "partition"):
        for p in ("1.0", "2.0", "3.0", "inf"):
            dist_run.assert_ok(f"{layout}/clip_grad_norm_.p{p}")
            dist_run.assert_ok(f"{layout}/get_total_norm.p{p}")


# -- 4 processes: 2-D meshes ------------------------------------------------------------------------
def test_hsdp_two_dimensional_mesh(dist4):
    """fully_shard on a (replicate, shard) mesh: placements (Replicate, Shard(0))."""
    dist4.assert_ok("hsdp/uneven_and_empty_shards")
    dist4.assert_ok("hsdp/", minimum=1000)


def test_fsdp2_with_tensor_parallel(dist4):
    """FSDP2 over dp and tensor parallel over tp: 2-D placements and two meshes in one list."""
    dist4.assert_ok("fsdp2_tp/mixed_layout")
    dist4.assert_ok("fsdp2_tp/", minimum=1000)


def test_clipped_optimizer_and_monitor_on_two_dimensional_meshes(dist4):
    for layout in ("hsdp", "fsdp2_tp"):
        dist4.assert_ok(f"{layout}/optimizer/sgd/", minimum=50)
        dist4.assert_ok(f"{layout}/optimizer/adamw_fused/", minimum=50)
        dist4.assert_ok(f"{layout}/monitor/", minimum=5)
        for p in ("1.0", "2.0", "3.0", "inf"):
            dist4.assert_ok(f"{layout}/clip_grad_norm_.p{p}")
