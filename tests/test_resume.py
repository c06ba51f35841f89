"""Resume determinism: a run killed with SIGKILL at a random step and resumed from its last
checkpoint matches an uninterrupted run exactly (bit for bit, on the CPU).

Three real interpreters run ``tests/_resume_worker.py`` (every stateful clipper at once, each
with its own model): the uninterrupted reference; a run the test kills with SIGKILL right after a
step it picks at random (the steps since the last checkpoint are lost, as in a real crash); and
a fresh process that loads that checkpoint with ``torch.load(weights_only=True)`` and finishes.
For every clipper, the resumed run's ``ClipInfo`` at each redone step, its final parameters and
its final ``state_dict`` equal the reference's exactly. The killed step is printed in failure
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


def _spawn(workdir, mode: str, **kwargs):
    return subprocess.Popen([sys.executable, WORKER, str(workdir), mode], text=True, **kwargs)


def _kill_at(workdir, kill_step: int) -> int:
    """Run ``killable`` and SIGKILL it right after ``kill_step``; return the exit status."""
    process = _spawn(workdir, "killable", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        for line in process.stdout:
            step = int(line.split()[1])
            if step == kill_step:
                process.send_signal(signal.SIGKILL)
                break
            process.stdin.write("go\n")
            process.stdin.flush()
        return process.wait(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference and the killed-then-resumed results (one set of processes per module)."""
    reference_dir = tmp_path_factory.mktemp("reference")
    crash_dir = tmp_path_factory.mktemp("crash")
    # Past the first checkpoint, and not on a checkpoint step (so some work is really lost).
    choices = [s for s in range(worker.CHECKPOINT_EVERY, worker.STEPS - 1) if (s + 1) % worker.CHECKPOINT_EVERY]
    replay = os.environ.get("GRADCLIP_RESUME_KILL_STEP")  # to replay a failure's kill step
    kill_step = int(replay) if replay else random.SystemRandom().choice(choices)
    reference = _spawn(reference_dir, "reference")  # runs while the other one is killed
    status = _kill_at(crash_dir, kill_step)
    assert status == -signal.SIGKILL, f"the worker was to be killed, exited with {status}"
    assert not (crash_dir / "killable.pt").exists()
    subprocess.run([sys.executable, WORKER, str(crash_dir), "resume"], check=True, timeout=TIMEOUT)
    assert reference.wait(timeout=TIMEOUT) == 0
    load = lambda path: torch.load(path, weights_only=True)  # noqa: E731
    return kill_step, load(reference_dir / "reference.pt"), load(crash_dir / "resume.pt")


CASES = list(worker.cases())


@pytest.mark.parametrize("name", CASES)
def test_resumed_run_matches_the_uninterrupted_one_bitwise(name, runs):
    kill_step, reference, resumed = runs
    expected, got = reference[name], resumed[name]
    start = got["start"]
    where = f"{name}, killed after step {kill_step}, resumed from step {start}"
    assert start == (kill_step + 1) // worker.CHECKPOINT_EVERY * worker.CHECKPOINT_EVERY, where
    assert start <= kill_step, where  # the steps since the checkpoint were lost and redone
    # As JSON text: floats print exactly (shortest round-trip repr), and NaN (the norm of the
    # NaN step) compares equal to NaN.
    assert json.dumps(got["infos"]) == json.dumps(expected["infos"][start:]), where
    for position, (a, b) in enumerate(zip(got["params"], expected["params"])):
        assert torch.equal(a, b), f"{where}: parameter #{position} differs"
    assert got["clipper"] == expected["clipper"], where


def test_every_stateful_registered_clipper_is_covered():
    from test_conformance import make_clipper

    import gradclip

    stateful = {name for name in gradclip.available() if make_clipper(name)._stateful()}
    assert {"autoclip", "zclip", "adagc", "quantile_norm", "skip_on_spike", "non_finite", "subset"} <= stateful
    assert stateful <= set(CASES)


def test_the_runs_exercise_state(runs):
    """The comparison is not vacuous: clipping, skipping and adaptive thresholds happened."""
    _, reference, _ = runs
    infos = {name: [info for _, info in result["infos"]] for name, result in reference.items()}
    assert any(info["skip"] for info in infos["skip_on_spike"])
    assert any(info["skip"] for info in infos["non_finite"])
    assert any(info["clipped"] for info in infos["zclip"])
    assert len({info["threshold"] for info in infos["autoclip"]}) > 5
    assert all(result["clipper"]["state"] is not None for result in reference.values())
