"""A training run that checkpoints, can be killed, and resumes (driven by tests/test_resume.py).

Usage: ``python _resume_worker.py WORKDIR MODE`` with MODE one of

* ``reference``: train every case for :data:`STEPS` steps, uninterrupted;
* ``killable``: the same, starting from ``WORKDIR/ckpt.pt`` when there is one (left by a run
  killed before); it prints ``start S``, then after each step ``step K`` and that step's
  ``ClipInfo`` of every case as JSON, and waits for a line on stdin before going on (the test
  answers, or sends SIGKILL instead at a step it picked);
* ``resume``: load ``WORKDIR/ckpt.pt`` (``torch.load(weights_only=True)``) and finish the run.

Every case (one clipper each) trains its own copy of the seeds' digits MLP, all in one process so
the whole test starts three interpreters, not three per clipper. A checkpoint holds, per case,
the model, the :class:`~gradclip.torch.ClippedOptimizer` state (the SGD momentum, Adam's moments for SPAM, and the
clipper's ``state_dict``) and the data generator's state, and is written every
:data:`CHECKPOINT_EVERY` steps, atomically (write, then rename), so a kill never leaves a torn
file. The results (``ClipInfo`` per step, final parameters and clipper state) go to
``WORKDIR/MODE.pt``.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gradclip  # noqa: E402
from gradclip.experiments.tasks import DigitsTask  # noqa: E402
from gradclip.torch import ClippedOptimizer  # noqa: E402

STEPS = 24
CHECKPOINT_EVERY = 3
#: Gradient spikes (x50) and a NaN element, so adaptive clippers clip and skip paths run.
SPIKE_STEPS = (9, 17)
NAN_STEP = 13


def cases() -> dict:
    """``{name: (make_clipper, inject_nan)}``: every stateful registered clipper (with the short
    warm-ups of the conformance suite) and a few compositions. NaN is injected only where the
    clipper handles it (a skipped or zeroed step): elsewhere it would poison the weights, and
    the comparison would be between two NaN models.

    ``Subset(seed=None)`` is left out: it draws its key in each process, so the reference and
    the crashed run differ from step 0 by design (its resume is checked in-process by
    tests/test_adaptive_state.py); the seeded and the registry's (``seed=1234``) forms are here.
    """
    from test_conformance import make_clipper

    out = {}
    for name in gradclip.available():
        if make_clipper(name).keeps_state:
            out[name] = ((lambda n=name: make_clipper(n)), name == "non_finite")
    out["autoclip-sketch"] = (lambda: gradclip.AutoClip(percentile=25.0), False)
    out["subset-tensor-seeded"] = (
        lambda: gradclip.Subset(gradclip.AutoClip(history=8), 0.3, by="tensor", seed=7),
        False,
    )
    out["chain-nonfinite-autoclip"] = (
        lambda: gradclip.chain(gradclip.NonFinite("zero"), gradclip.AutoClip(history=8)),
        True,
    )
    out["chain-zclip-skip-on-spike"] = (
        lambda: gradclip.chain(
            gradclip.NonFinite("skip"),
            gradclip.ZClip(warmup_steps=4),
            gradclip.SkipOnSpike(window=8, min_history=4, sigma=3.0),
        ),
        True,
    )
    return out


class Run:
    """One case: its task (data), model and clipped optimizer."""

    def __init__(self, make_clipper, inject_nan: bool):
        self.task = DigitsTask(0)
        torch.manual_seed(0)
        self.model = self.task.model()
        self.clipper = make_clipper()
        if self.clipper.needs_optimizer_state:
            # SPAM compares against Adam's second moment (and resets Adam's moments): the
            # checkpoint must carry them through the restart too.
            inner = torch.optim.Adam(self.model.parameters(), lr=0.01)
        else:
            inner = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.optimizer = ClippedOptimizer(inner, self.clipper)
        self.inject_nan = inject_nan
        self.infos: list[tuple[int, dict]] = []

    def step(self, step: int) -> None:
        self.optimizer.zero_grad()
        self.task.loss(self.model, self.task.batch(step)).backward()
        with torch.no_grad():
            if step in SPIKE_STEPS:
                for p in self.model.parameters():
                    p.grad.mul_(50.0)
            if step == NAN_STEP and self.inject_nan:
                self.model[2].bias.grad[1] = math.nan
        self.optimizer.step()
        self.infos.append((step, self.optimizer.last_info.to_dict()))

    def checkpoint(self) -> dict:
        clipper_state = self.clipper.state_dict()
        json.dumps(clipper_state, allow_nan=False)  # plain, strict JSON data, or this raises
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.task.generator.get_state(),
        }

    def restore(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.task.generator.set_state(saved["generator"])


def main(workdir: str, mode: str) -> None:
    torch.set_num_threads(1)  # one thread: the same reduction order in every process
    runs = {name: Run(make, nan) for name, (make, nan) in cases().items()}
    start = 0
    checkpoint_path = os.path.join(workdir, "ckpt.pt")
    if mode == "resume" or (mode == "killable" and os.path.exists(checkpoint_path)):
        saved = torch.load(checkpoint_path, weights_only=True)
        start = saved["step"]
        for name, run in runs.items():
            run.restore(saved["runs"][name])
    if mode == "killable":
        print(f"start {start}", flush=True)
    for step in range(start, STEPS):
        for run in runs.values():
            run.step(step)
        if mode == "killable":
            # JSON floats print exactly (shortest round-trip repr), NaN as NaN.
            print(f"step {step} {json.dumps({name: run.infos[-1][1] for name, run in runs.items()})}", flush=True)
            if sys.stdin.readline().strip() != "go":
                return
        if (step + 1) % CHECKPOINT_EVERY == 0:
            checkpoint = {"step": step + 1, "runs": {name: run.checkpoint() for name, run in runs.items()}}
            partial = os.path.join(workdir, "ckpt.pt.partial")
            torch.save(checkpoint, partial)
            os.replace(partial, os.path.join(workdir, "ckpt.pt"))
    results = {
        name: {
            "start": start,
            "infos": run.infos,
            "params": [p.detach().clone() for p in run.model.parameters()],
            "clipper": run.clipper.state_dict(),
        }
        for name, run in runs.items()
    }
    torch.save(results, os.path.join(workdir, f"{mode}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
