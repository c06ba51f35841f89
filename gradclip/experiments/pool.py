"""Local worker processes for ``--jobs N``: one run per process at a time, so a run that dies
is named and the others go on.

``concurrent.futures.ProcessPoolExecutor`` cannot do this: when one worker dies (a SIGKILL, the
kernel's out-of-memory killer, a segfault in a native extension) it breaks the whole pool and
fails every pending run, without saying which run killed it. Here each worker is a spawned
process with its own pipe; the parent knows which run each worker holds, records a dead worker's
run as ``"killed"`` (with its signal or exit code) and starts a fresh worker for the rest.

Workers are started with the pinned environment (:mod:`~gradclip.experiments.environment`)
in force, so PyTorch picks the same kernels in every worker whatever the parent had imported.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import wait
from typing import Any

from gradclip.experiments.environment import pinned_environment
from gradclip.experiments.tasks.base import TaskError

__all__ = ["run_pool"]


def _worker_main(connection) -> None:
    """A worker's loop: receive ``(index, config)``, send progress and the record back."""
    from gradclip.experiments.runner import run_one

    while True:
        try:
            item = connection.recv()
        except EOFError:  # the parent is gone
            return
        if item is None:
            return
        index, config = item

        def report(done: int, index: int = index) -> None:
            connection.send(("progress", index, done))

        try:
            record = run_one(config, report)
        except TaskError as error:
            connection.send(("task_error", index, str(error)))
            continue
        connection.send(("done", index, record))


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` while a worker is started (it inherits them), then the
    parent's own environment back: the parent's libraries must not change under the user."""
    saved = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"its worker process was killed by {name}"
    return f"its worker process exited with code {exitcode} before the run ended"


class _Worker:
    def __init__(self, context, environment: dict[str, str]):
        parent, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child,), daemon=True)
        with _environment(environment):
            self.process.start()
        child.close()
        self.connection = parent
        self.index: int | None = None

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.connection.send(None)
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        self.connection.close()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.connection.close()


def run_pool(
    configs: Sequence[Any],
    jobs: int,
    on_progress: Callable[[int, int], None] | None = None,
    on_done: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``configs`` on ``jobs`` worker processes.

    Args:
        configs: :class:`~gradclip.experiments.runner.RunConfig` objects.
        jobs: Worker processes (>= 1).
        on_progress: ``(index, steps done)``.
        on_done: ``(index, record)`` as each run ends.

    Returns:
        The records in config order; a run whose worker died has a ``"killed"`` record.

    Raises:
        TaskError: A run found the task breaking the contract; every worker was stopped.
    """
    from gradclip.experiments.runner import failed_record

    context = multiprocessing.get_context("spawn")
    environment = pinned_environment()
    results: list[dict[str, Any] | None] = [None] * len(configs)
    pending = deque(range(len(configs)))
    workers: list[_Worker] = []
    remaining = len(configs)

    def finish(index: int, record: dict[str, Any]) -> None:
        nonlocal remaining
        results[index] = record
        remaining -= 1
        if on_done:
            on_done(index, record)

    def handle(worker: _Worker, message: tuple) -> None:
        kind, index = message[0], message[1]
        if kind == "progress":
            if on_progress:
                on_progress(index, message[2])
        elif kind == "done":
            worker.index = None
            finish(index, message[2])
        elif kind == "task_error":
            raise TaskError(message[2])

    try:
        while remaining:
            while pending and len(workers) < jobs:
                workers.append(_Worker(context, environment))
            for worker in list(workers):
                if worker.index is None and pending:
                    index = pending.popleft()
                    try:
                        worker.connection.send((index, configs[index]))
                    except (BrokenPipeError, EOFError, OSError):
                        # The worker died between runs: the run goes back to the queue, untouched.
                        pending.appendleft(index)
                        worker.kill()
                        workers.remove(worker)
                        continue
                    worker.index = index
            busy = [w for w in workers if w.index is not None]
            ready = wait([w.connection for w in busy] + [w.process.sentinel for w in busy], timeout=1.0)
            for worker in list(busy):
                alive = True
                # Drain what the worker sent before anything else: a run may end and its
                # process die right after.
                while worker.index is not None:
                    try:
                        if not worker.connection.poll():
                            break
                        handle(worker, worker.connection.recv())
                    except (EOFError, OSError):
                        alive = False
                        break
                if worker.index is not None and (not alive or worker.process.sentinel in ready):
                    worker.process.join(timeout=5)
                    if worker.process.is_alive() and alive:
                        continue  # the sentinel fired spuriously; keep waiting
                    config = configs[worker.index]
                    finish(worker.index, failed_record(config, "killed", _death(worker.process.exitcode)))
                    worker.index = None
                    worker.kill()
                    workers.remove(worker)
    except BaseException:
        for worker in workers:
            worker.kill()
        raise
    for worker in workers:
        worker.stop()
    return results  # type: ignore[return-value]
