"""Monitor(updates=True): per-layer parameter norm, update norm and their ratio, on the device."""

from __future__ import annotations

import csv
import math

import pytest

torch = pytest.importorskip("torch")

import gradclip  # noqa: E402
from _host_reads import record_host_reads  # noqa: E402
from gradclip.monitor import CsvWriter, JsonlWriter, Monitor, TensorBoardWriter, read_log  # noqa: E402


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))


def _train(model, monitor, optimizer, clipper, steps):
    """A plain loop with the monitor's hooks; returns the updates measured by hand."""
    expected = []
    for step in range(steps):
        torch.manual_seed(100 + step)
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        monitor.observe(clipper.clip_(model))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        monitor.before_step()
        optimizer.step()
        monitor.after_step()
        expected.append(
            {
                n: (float(p.detach().norm()), float((p.detach() - before[n]).norm()))
                for n, p in model.named_parameters()
            }
        )
    return expected


def test_records_match_the_norms_of_the_parameters_and_of_their_updates(tmp_path):
    model = _model()
    log = tmp_path / "log.jsonl"
    monitor = Monitor(model, every=2, updates=True, writers=[JsonlWriter(log)], warn=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = _train(model, monitor, optimizer, gradclip.GlobalNorm(0.5), steps=4)
    monitor.close()
    records = read_log(log)
    assert len(records) == 4
    for record, truth in zip(records, expected):
        assert set(record["update_ratios"]) == set(truth)
        for name, (param_norm, update_norm) in truth.items():
            assert record["param_norms"][name] == pytest.approx(param_norm, rel=1e-5)
            assert record["update_norms"][name] == pytest.approx(update_norm, rel=1e-5, abs=1e-7)
            assert record["update_ratios"][name] == pytest.approx(update_norm / param_norm, rel=1e-5)
        # The step's gradient norms are still there beside the update norms.
        assert set(record["layer_norms"]) == set(truth)


def test_a_skipped_step_records_a_zero_update():
    model = _model()
    monitor = Monitor(model, updates=True, warn=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(8, 4)).sum().backward()
    monitor.observe(gradclip.GlobalNorm(1.0).clip_(model))
    monitor.before_step()  # the step is skipped: no optimizer.step()
    names, params, updates, ratios = monitor.after_step()
    assert names == [n for n, _ in model.named_parameters()]
    assert torch.equal(updates, torch.zeros_like(updates)) and torch.equal(ratios, torch.zeros_like(ratios))
    monitor.close()


def test_values_stay_on_the_device_until_every_steps():
    model = _model()
    monitor = Monitor(model, every=3, updates=True, warn=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = gradclip.GlobalNorm(0.5)
    reads = []
    for step in range(6):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        info = clipper.clip_(model)
        with record_host_reads() as calls:
            monitor.observe(info)
            monitor.before_step()
        optimizer.step()
        with record_host_reads() as more:
            monitor.after_step()
        reads.append(len(calls) + len(more))
    assert reads[0:2] == [0, 0] and reads[3:5] == [0, 0]
    assert 0 < reads[2] <= 2 and 0 < reads[5] <= 2
    assert monitor.steps == 6


def test_csv_and_tensorboard_get_one_column_or_tag_per_layer_and_group(tmp_path):
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    monitor = Monitor(
        model, updates=True, warn=False, writers=[CsvWriter(tmp_path / "log.csv"), TensorBoardWriter(tmp_path / "tb")]
    )
    _train(model, monitor, torch.optim.SGD(model.parameters(), lr=0.1), gradclip.GlobalNorm(0.5), steps=2)
    monitor.close()
    with open(tmp_path / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    for stem in ("layer_norm", "param_norm", "update_norm", "update_ratio"):
        for name in names:
            assert math.isfinite(float(rows[1][f"{stem}/{name}"]))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"gradclip/update_ratio/{n}" for n in names} <= tags
    assert {f"gradclip/param_norm/{n}" for n in names} <= tags


def test_a_csv_writer_that_meets_update_columns_late_keeps_every_cell_in_its_column(tmp_path):
    writer = CsvWriter(tmp_path / "log.csv")
    base = {"norm": 1.0, "norm_after": 1.0, "threshold": 2.0, "coef": 1.0, "clipped": False, "finite": True,
            "skip": False, "clip_rate": 0.0}
    writer.write([{"step": 0, **base, "layer_norms": {"a": 0.5}}])
    writer.write([{"step": 1, **base, "layer_norms": {"a": 0.25, "b": 0.125},
                   "update_ratios": {"a": 0.01, "b": 0.02}}])
    writer.close()
    with open(tmp_path / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["layer_norm/a"] == "0.5" and rows[0]["update_ratio/a"] == "" and rows[0]["layer_norm/b"] == ""
    assert rows[1]["layer_norm/b"] == "0.125" and rows[1]["update_ratio/b"] == "0.02"


def test_without_updates_the_hooks_do_nothing_and_bad_arguments_are_refused():
    model = _model()
    monitor = Monitor(model, warn=False)
    monitor.before_step()
    assert monitor.after_step() is None
    with pytest.raises(gradclip.InvalidArgumentError, match="updates=True needs the model"):
        Monitor(None, updates=True)
    with pytest.raises(gradclip.InvalidArgumentError, match="updates must be True or False"):
        Monitor(model, updates="yes")
