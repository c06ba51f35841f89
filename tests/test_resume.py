"""Resume determinism: a run killed with SIGKILL and resumed from its last checkpoint matches an
uninterrupted run exactly (bit for bit, on the CPU).

Real interpreters run ``tests/_resume_worker.py`` (every stateful clipper at once, each with its
own model): the uninterrupted reference, and a chain of runs each killed with SIGKILL right after
a chosen step and continued by a fresh process from the last checkpoint (the steps since it are
lost, as in a real crash, and redone). The kill points are fixed around the events of the run —
so the restored state is, in turn, from before the spike at step 9, between it and the NaN at
step 13, after the NaN (``NonFinite``'s counters are non-zero) and after the spike at step 17 —
plus one step drawn at random. A last process loads the final checkpoint with
``torch.load(weights_only=True)`` and finishes.

For every clipper, the ``ClipInfo`` of every step each process ran, the final parameters and the
final ``state_dict`` equal the reference's exactly. The random kill step is printed in failure
messages; it changes from run to run, so CI covers different kill points over time
(``GRADCLIP_RESUME_KILL_STEP=K`` replays a given one).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn", reason="the digits data ships with scikit-learn")

import _resume_worker as worker  # noqa: E402 - needs torch

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_resume_worker.py")
TIMEOUT = 240
#: The worker is killed right after these steps; each kill's successor restores the checkpoint
#: written after step 5, 11, 14 and 17 (resuming at 6, 12, 15, 18): before the spike at 9, between
#: it and the NaN at 13, after the NaN, after the spike at 17.
FIXED_KILLS = (7, 12, 15, 18)


def _spawn(workdir, mode: str, **kwargs):
    return subprocess.Popen([sys.executable, WORKER, str(workdir), mode], text=True, **kwargs)


def _restart_step(kill_step: int) -> int:
    """Where a run killed right after ``kill_step`` resumes: the step after the last checkpoint
    (one is written after every CHECKPOINT_EVERY-th step, once the test has answered)."""
    return (kill_step + 1) // worker.CHECKPOINT_EVERY * worker.CHECKPOINT_EVERY


def _valid_kill(step: int) -> bool:
    # Past the first checkpoint, and not on a checkpoint step (so some work is really lost).
    return worker.CHECKPOINT_EVERY <= step < worker.STEPS - 1 and (step + 1) % worker.CHECKPOINT_EVERY != 0


def _kill_at(workdir, kill_step: int) -> tuple[int, dict[int, dict], int]:
    """Run ``killable`` (from the checkpoint in ``workdir``, if any) and SIGKILL it right after
    ``kill_step``; return the step it started at, the infos it printed per step, and its exit
    status."""
    process = _spawn(workdir, "killable", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    infos: dict[int, dict] = {}
    start = None
    try:
        for line in process.stdout:
            kind, value, *payload = line.rstrip("\n").split(" ", 2)
            if kind == "start":
                start = int(value)
                continue
            step = int(value)
            infos[step] = json.loads(payload[0])
            if step == kill_step:
                process.send_signal(signal.SIGKILL)
                break
            process.stdin.write("go\n")
            process.stdin.flush()
        return start, infos, process.wait(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference, the killed segments and the resumed end (one set of processes per module)."""
    reference_dir = tmp_path_factory.mktemp("reference")
    crash_dir = tmp_path_factory.mktemp("crash")
    replay = os.environ.get("GRADCLIP_RESUME_KILL_STEP")  # to replay a failure's kill step
    choices = [s for s in range(worker.STEPS) if _valid_kill(s)]
    random_kill = int(replay) if replay else random.SystemRandom().choice(choices)
    plan = sorted(set(FIXED_KILLS) | {random_kill})
    reference = _spawn(reference_dir, "reference")  # runs while the others are killed
    segments = []
    for kill_step in plan:
        start, infos, status = _kill_at(crash_dir, kill_step)
        assert status == -signal.SIGKILL, f"the worker was to be killed after step {kill_step}, exited with {status}"
        segments.append({"kill": kill_step, "start": start, "infos": infos})
    assert not (crash_dir / "killable.pt").exists()
    subprocess.run([sys.executable, WORKER, str(crash_dir), "resume"], check=True, timeout=TIMEOUT)
    assert reference.wait(timeout=TIMEOUT) == 0
    load = lambda path: torch.load(path, weights_only=True)  # noqa: E731
    return {
        "random_kill": random_kill,
        "segments": segments,
        "reference": load(reference_dir / "reference.pt"),
        "resumed": load(crash_dir / "resume.pt"),
    }


CASES = list(worker.cases())


@pytest.mark.parametrize("name", CASES)
def test_resumed_run_matches_the_uninterrupted_one_bitwise(name, runs):
    expected, got = runs["reference"][name], runs["resumed"][name]
    kills = [segment["kill"] for segment in runs["segments"]]
    where = f"{name}, killed after steps {kills} (random: {runs['random_kill']})"
    # As JSON text: floats print exactly (shortest round-trip repr), and NaN (the norm of the
    # NaN step) compares equal to NaN.
    reference_infos = {step: json.dumps(info) for step, info in expected["infos"]}
    previous_kill = None
    for segment in runs["segments"]:
        start = 0 if previous_kill is None else _restart_step(previous_kill)
        assert segment["start"] == start, f"{where}: the run after the kill at {previous_kill} started at {segment['start']}"
        assert sorted(segment["infos"]) == list(range(start, segment["kill"] + 1)), where
        for step, infos in segment["infos"].items():
            assert json.dumps(infos[name]) == reference_infos[step], f"{where}: step {step} (run from step {start})"
        previous_kill = segment["kill"]
    start = got["start"]
    assert start == _restart_step(previous_kill), where
    assert start <= previous_kill, where  # the steps since the checkpoint were lost and redone
    assert json.dumps(got["infos"]) == json.dumps(expected["infos"][start:]), f"{where}: resumed from step {start}"
    for position, (a, b) in enumerate(zip(got["params"], expected["params"])):
        assert torch.equal(a, b), f"{where}: parameter #{position} differs"
    assert got["clipper"] == expected["clipper"], where


def test_the_fixed_kills_restore_state_around_every_event():
    """Cheap guard on the constants: for each spike and the NaN step, some run resumes from a
    checkpoint written before it and some from one written after it."""
    assert all(_valid_kill(step) for step in FIXED_KILLS)
    restarts = [_restart_step(step) for step in FIXED_KILLS]
    for event in (*worker.SPIKE_STEPS, worker.NAN_STEP):
        assert any(0 < start <= event for start in restarts), f"no restore from before step {event}"
        assert any(start > event for start in restarts), f"no restore from after step {event}"


def test_every_stateful_registered_clipper_is_covered():
    from test_conformance import make_clipper

    import gradclip

    stateful = {name for name in gradclip.available() if make_clipper(name).keeps_state}
    assert {
        "autoclip", "zclip", "adagc", "quantile_norm", "skip_on_spike", "non_finite", "subset",
        "ada_clip", "ada_gn", "spike_aware",
    } <= stateful
    assert stateful <= set(CASES)


def test_the_runs_exercise_state(runs):
    """The comparison is not vacuous: clipping, skipping and adaptive thresholds happened."""
    infos = {name: [info for _, info in result["infos"]] for name, result in runs["reference"].items()}
    assert any(info["skip"] for info in infos["skip_on_spike"])
    assert any(info["skip"] for info in infos["non_finite"])
    assert any(info["clipped"] for info in infos["zclip"])
    assert len({info["threshold"] for info in infos["autoclip"]}) > 5
    assert all(result["clipper"]["state"] is not None for result in runs["reference"].values())
    # The resumed end starts after the NaN step, so NonFinite's restored counters are not zero.
    assert runs["resumed"]["non_finite"]["start"] > worker.NAN_STEP
