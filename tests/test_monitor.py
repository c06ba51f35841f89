"""``gradclip.Monitor`` and its writers (JSON Lines, CSV, TensorBoard event files).

TensorBoard files are read back with TensorBoard's own ``EventAccumulator``; the device-side
batching is checked by counting host reads of tensor values, as tests/test_no_sync.py does.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradclip  # noqa: E402
import gradclip.torch as gct  # noqa: E402
from _host_reads import record_host_reads  # noqa: E402
from gradclip.monitor import (  # noqa: E402
    ClipRateWarning,
    CsvWriter,
    JsonlWriter,
    Monitor,
    TensorBoardWriter,
    read_log,
)

SCHEMA = {"step", "norm", "norm_after", "threshold", "coef", "clipped", "finite", "skip", "clip_rate"}


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))


def _backward(model, scale=1.0, seed=None):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn(8, 4, generator=generator)
    model.zero_grad()
    model(x).pow(2).mean().mul(scale).backward()


def _run(monitor, model, clipper, steps, scale=1.0):
    infos = []
    for step in range(steps):
        _backward(model, scale, seed=step)
        info = clipper.clip_(model)
        monitor.observe(info)
        infos.append(info.to_dict())
    return infos


def test_jsonl_csv_and_tensorboard_writers_record_every_step(tmp_path):
    model = _model()
    writers = [JsonlWriter(tmp_path / "log.jsonl"), CsvWriter(tmp_path / "log.csv"), TensorBoardWriter(tmp_path / "tb")]
    monitor = Monitor(model, every=3, writers=writers, warn=False)
    infos = _run(monitor, model, gradclip.GlobalNorm(0.3), steps=7)
    monitor.close()

    records = read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in records] == list(range(7))
    names = [n for n, _ in model.named_parameters()]
    for record, info in zip(records, infos):
        assert SCHEMA <= set(record)
        assert record["norm"] == pytest.approx(info["norm"])
        assert record["norm_after"] == pytest.approx(info["norm"] * info["coef"])
        assert record["threshold"] == pytest.approx(0.3)
        assert record["coef"] == pytest.approx(info["coef"])
        assert record["clipped"] is info["clipped"] and record["finite"] is True and record["skip"] is False
        assert list(record["layer_norms"]) == names
        assert record["nonfinite_layers"] == 0

    with open(tmp_path / "log.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 7
    assert float(rows[4]["norm"]) == pytest.approx(records[4]["norm"])
    assert float(rows[4]["layer_norm/2.weight"]) == pytest.approx(records[4]["layer_norms"]["2.weight"])
    assert rows[4]["clipped"] == str(int(records[4]["clipped"])) and rows[4]["nonfinite_layers"] == "0"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"gradclip/norm", "gradclip/norm_after", "gradclip/clip_rate", "gradclip/nonfinite_layers",
            "gradclip/layer_norm/0.weight"} <= tags
    events = accumulator.Scalars("gradclip/norm")
    assert [e.step for e in events] == list(range(7))
    assert [e.value for e in events] == pytest.approx([r["norm"] for r in records], rel=1e-6)
    layer = accumulator.Scalars("gradclip/layer_norm/0.weight")
    assert [e.value for e in layer] == pytest.approx([r["layer_norms"]["0.weight"] for r in records], rel=1e-6)


def test_layer_norms_are_those_of_the_gradients_the_optimizer_uses(tmp_path):
    model = _model()
    monitor = Monitor(model, writers=[JsonlWriter(tmp_path / "l.jsonl")], warn=False)
    _backward(model, scale=50.0, seed=0)
    monitor.observe(gradclip.GlobalNorm(0.1).clip_(model))
    monitor.close()
    (record,) = read_log(tmp_path / "l.jsonl")
    for name, param in model.named_parameters():
        assert record["layer_norms"][name] == pytest.approx(float(param.grad.norm()), rel=1e-6)
    total = math.sqrt(sum(v**2 for v in record["layer_norms"].values()))
    assert total == pytest.approx(record["norm_after"], rel=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["clip_in_place", "folded"])
def test_clipped_optimizer_feeds_the_monitor_the_same_records(tmp_path, fused):
    """Folded or not, the monitor sees the same norms (layer norms after clipping, unscaled)."""
    records = {}
    for fold in (False, True) if fused else (False,):
        model = _model()
        path = tmp_path / f"{fold}.jsonl"
        monitor = Monitor(model, writers=[JsonlWriter(path)], warn=False)
        scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
        opt = gct.ClippedOptimizer(torch.optim.AdamW(model.parameters(), fused=fused), gradclip.GlobalNorm(0.2),
                                   scaler=scaler, fold=fold, monitor=monitor)
        for step in range(3):
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
            scaler.scale(model(x).pow(2).mean().mul(10)).backward()
            opt.step()
            scaler.update()
            opt.zero_grad()
        monitor.close()
        records[fold] = read_log(path)
        assert opt.folded == fold
    if fused:
        for a, b in zip(records[False], records[True]):
            assert a["norm"] == pytest.approx(b["norm"], rel=1e-5)
            assert a["norm_after"] == pytest.approx(b["norm_after"], rel=1e-5)
            for name in a["layer_norms"]:
                assert a["layer_norms"][name] == pytest.approx(b["layer_norms"][name], rel=1e-5)


def test_values_stay_on_the_device_until_every_steps():
    model = _model()
    monitor = Monitor(model, every=4, warn=False)
    clipper = gradclip.GlobalNorm(0.5)
    reads_per_step = []
    for step in range(8):
        _backward(model, seed=step)
        info = clipper.clip_(model)
        with record_host_reads() as calls:
            monitor.observe(info)
        reads_per_step.append(len(calls))
    # Steps 1-3 and 5-7 read nothing; steps 4 and 8 fetch the batch with one transfer.
    assert reads_per_step[0:3] == [0, 0, 0] and reads_per_step[4:7] == [0, 0, 0]
    assert 0 < reads_per_step[3] <= 2 and 0 < reads_per_step[7] <= 2
    assert monitor.steps == 8


def test_warns_when_more_than_half_of_recent_steps_are_clipped():
    model = _model()
    monitor = Monitor(model, window=10)
    with pytest.warns(ClipRateWarning, match="step-size limit") as record:
        _run(monitor, model, gradclip.GlobalNorm(1e-4), steps=15)
    assert len(record) == 1  # once, not every step
    assert monitor.summary()["recent_clip_rate"] == 1.0


def _observe_pattern(monitor, pattern):
    """Observe NumPy steps, clipped where ``pattern`` has "C" (norm 20 > 1) and not where "U"."""
    clipper = gradclip.GlobalNorm(1.0)
    for letter in pattern:
        _, info = clipper.clip([np.full(4, 10.0 if letter == "C" else 0.1, dtype=np.float32)])
        monitor.observe(info)


def test_clip_rate_warning_cut_off_is_more_than_half():
    # Any 10 consecutive steps of "CCCUU..." hold exactly 6 clipped: 60% must warn.
    monitor = Monitor(window=10)
    with pytest.warns(ClipRateWarning, match="60% of the last 10 steps") as record:
        _observe_pattern(monitor, "CCCUU" * 4)
    assert len(record) == 1
    assert monitor.summary()["recent_clip_rate"] == pytest.approx(0.6)
    # Any 10 consecutive steps of "CU..." hold exactly 5: 50% is not "more than half".
    monitor = Monitor(window=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _observe_pattern(monitor, "CU" * 10)
    assert monitor.summary()["recent_clip_rate"] == 0.5


def test_no_clip_rate_warning_when_clipping_is_rare():
    model = _model()
    monitor = Monitor(model, window=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(monitor, model, gradclip.GlobalNorm(1e6), steps=15)
    assert monitor.summary()["clip_rate"] == 0.0


def test_warns_when_observing_before_backward():
    model = _model()
    clipper = gradclip.GlobalNorm(1.0)
    monitor = Monitor(model)
    with pytest.warns(RuntimeWarning, match="before backward"):
        info = clipper.clip_(model)  # the clipper itself warns
    with pytest.warns(RuntimeWarning, match="before backward"):
        monitor.observe(info)


def test_non_finite_steps_are_counted_and_written_as_null(tmp_path):
    model = _model()
    writers = [JsonlWriter(tmp_path / "n.jsonl"), CsvWriter(tmp_path / "n.csv"), TensorBoardWriter(tmp_path / "tb")]
    monitor = Monitor(model, writers=writers, warn=False)
    _backward(model, seed=0)
    model[0].weight.grad[0, 0] = math.nan
    monitor.observe(gradclip.GlobalNorm(1.0).clip_(model))
    _backward(model, seed=1)
    monitor.observe(gradclip.GlobalNorm(1.0, nonfinite="skip").clip_(model))
    monitor.close()
    first, second = read_log(tmp_path / "n.jsonl")
    assert first["norm"] is None and first["finite"] is False and first["nonfinite_layers"] == 1
    assert first["layer_norms"]["0.weight"] is None
    assert second["finite"] is True and second["skip"] is False
    text = (tmp_path / "n.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    summary = monitor.summary()
    assert summary["nonfinite_steps"] == 1 and summary["steps"] == 2
    with open(tmp_path / "n.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [r["nonfinite_layers"] for r in rows] == ["1", "0"] and [r["finite"] for r in rows] == ["0", "1"]
    assert rows[0]["layer_norm/0.weight"] == "nan" and rows[0]["norm"] == "nan"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    assert [e.value for e in accumulator.Scalars("gradclip/nonfinite_layers")] == [1.0, 0.0]
    assert [e.value for e in accumulator.Scalars("gradclip/finite")] == [0.0, 1.0]


def test_zero_policy_steps_with_nan_count_as_non_finite(tmp_path):
    """nonfinite="zero" replaces NaN by 0, but the step's gradients were not finite: info.finite
    is False (the clipper reports what it was given), so the monitor counts it. The per-layer
    count is measured after zeroing and so is 0."""
    model = _model()
    monitor = Monitor(model, writers=[JsonlWriter(tmp_path / "z.jsonl")], warn=False)
    clipper = gradclip.GlobalNorm(1.0, nonfinite="zero")
    _backward(model, seed=0)
    model[0].weight.grad[1, 2] = math.nan
    monitor.observe(clipper.clip_(model))
    assert torch.isfinite(model[0].weight.grad).all()  # the policy did zero it
    _backward(model, seed=1)
    monitor.observe(clipper.clip_(model))
    monitor.close()
    first, second = read_log(tmp_path / "z.jsonl")
    assert first["finite"] is False and second["finite"] is True
    assert first["nonfinite_layers"] == 0
    summary = monitor.summary()
    assert summary["nonfinite_steps"] == 1 and summary["steps"] == 2


def test_summary_percentiles_and_per_layer_statistics():
    model = _model()
    monitor = Monitor(model, every=5, warn=False)
    infos = _run(monitor, model, gradclip.GlobalNorm(0.5), steps=20)
    summary = monitor.summary()
    norms = [i["norm"] for i in infos]
    assert summary["steps"] == 20
    assert summary["norm_percentiles"]["p50"] == pytest.approx(float(np.quantile(norms, 0.5)), rel=1e-6)
    assert summary["norm_percentiles"]["max"] == pytest.approx(max(norms), rel=1e-6)
    assert summary["clipped_steps"] == sum(i["clipped"] for i in infos)
    assert set(summary["layers"]) == {n for n, _ in model.named_parameters()}
    assert summary["layers"]["0.weight"]["p90"] >= summary["layers"]["0.weight"]["p10"]
    assert monitor.norms() == pytest.approx(norms, rel=1e-6)


def test_layers_without_gradients_are_left_out(tmp_path):
    model = _model()
    monitor = Monitor(model, writers=[JsonlWriter(tmp_path / "g.jsonl")], warn=False)
    model.zero_grad()
    model[0](torch.randn(3, 4)).sum().backward()  # only the first layer gets gradients
    monitor.observe(gradclip.GlobalNorm(1.0).clip_(model))
    monitor.close()
    (record,) = read_log(tmp_path / "g.jsonl")
    assert set(record["layer_norms"]) == {"0.weight", "0.bias"}


def test_custom_steps_and_per_layer_off(tmp_path):
    model = _model()
    monitor = Monitor(model, per_layer=False, writers=[JsonlWriter(tmp_path / "s.jsonl")], warn=False)
    _backward(model, seed=0)
    monitor.observe(gradclip.GlobalNorm(1.0).clip_(model), step=100)
    _backward(model, seed=1)
    monitor.observe(gradclip.GlobalNorm(1.0).clip_(model))
    monitor.close()
    records = read_log(tmp_path / "s.jsonl")
    assert [r["step"] for r in records] == [100, 101]
    assert "layer_norms" not in records[0]


def test_numpy_clip_infos_are_recorded_without_a_model(tmp_path):
    monitor = Monitor(writers=[JsonlWriter(tmp_path / "np.jsonl")], warn=False)
    clipper = gradclip.GlobalNorm(1.0)
    for scale in (0.1, 10.0):
        _, info = clipper.clip([np.full(4, scale, dtype=np.float32)])
        monitor.observe(info)
    monitor.close()
    records = read_log(tmp_path / "np.jsonl")
    assert records[0]["norm"] == pytest.approx(0.2) and records[0]["clipped"] is False
    assert records[1]["norm"] == pytest.approx(20.0) and records[1]["norm_after"] == pytest.approx(1.0, rel=1e-5)


def test_close_flushes_once_and_observe_after_close_raises(tmp_path):
    model = _model()
    with Monitor(model, every=100, writers=[JsonlWriter(tmp_path / "c.jsonl")], warn=False) as monitor:
        _run(monitor, model, gradclip.GlobalNorm(1.0), steps=3)
        assert not (tmp_path / "c.jsonl").exists()  # nothing fetched yet
    assert len(read_log(tmp_path / "c.jsonl")) == 3
    monitor.close()  # idempotent
    with pytest.raises(gradclip.InvalidArgumentError, match="closed"):
        monitor.observe(gradclip.GlobalNorm(1.0).clip_(model))


def test_jsonl_append_mode(tmp_path):
    path = tmp_path / "a.jsonl"
    for _ in range(2):
        writer = JsonlWriter(path, append=True)
        writer.write([{"step": 0, "norm": 1.0}])
        writer.close()
    assert len(read_log(path)) == 2


def test_read_log_reports_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"step": 0}\n\nnot json\n')
    with pytest.raises(gradclip.InvalidArgumentError, match=r"bad.jsonl:3"):
        read_log(path)


def test_bad_arguments():
    model = _model()
    with pytest.raises(gradclip.InvalidArgumentError, match="every must be an integer >= 1, got 0"):
        Monitor(model, every=0)
    with pytest.raises(gradclip.InvalidArgumentError, match="model must be a torch.nn.Module"):
        Monitor(object())
    with pytest.raises(gradclip.InvalidArgumentError, match=r"writers\[0\] must have write"):
        Monitor(model, writers=[object()])
    with pytest.raises(gradclip.InvalidArgumentError, match="writers must be a list"):
        Monitor(model, writers=JsonlWriter("x.jsonl"))
    with pytest.raises(gradclip.InvalidArgumentError, match="info must be a gradclip.ClipInfo"):
        Monitor(model).observe({"norm": 1.0})
    with pytest.raises(gradclip.InvalidArgumentError, match="path must be a path"):
        JsonlWriter(3)


def test_importing_gradclip_and_its_monitor_imports_no_framework():
    code = (
        "import sys, gradclip, gradclip.monitor; "
        "from gradclip import Monitor, suggest_threshold; "
        "bad = [m for m in ('torch', 'tensorflow', 'jax') if m in sys.modules]; "
        "assert not bad, bad; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_tensorboard_writer_does_not_import_tensorflow():
    code = (
        "import sys, tempfile; from gradclip.monitor import TensorBoardWriter; "
        "w = TensorBoardWriter(tempfile.mkdtemp()); w.write([{'step': 0, 'norm': 1.0}]); w.close(); "
        "assert 'tensorflow' not in sys.modules and 'torch' not in sys.modules; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def _csv_rows(path):
    with open(path, newline="") as file:
        return list(csv.reader(file))


def test_csv_has_a_column_from_the_start_for_a_layer_whose_gradient_appears_late(tmp_path):
    """The columns are the monitor's layers, not those of the first batch (pandas.read_csv needs
    one header for all rows)."""
    model = _model()
    monitor = Monitor(model, every=2, writers=[CsvWriter(tmp_path / "late.csv"), JsonlWriter(tmp_path / "late.jsonl")],
                      warn=False)
    clipper = gradclip.GlobalNorm(1.0)
    for step in range(4):
        model.zero_grad()
        generator = torch.Generator().manual_seed(step)
        if step < 2:  # only the last layer learns at first; the first layer joins at step 2
            model[2](torch.randn(3, 6, generator=generator)).sum().backward()
        else:
            model(torch.randn(3, 4, generator=generator)).sum().backward()
        monitor.observe(clipper.clip_(model))
    monitor.close()
    header, *rows = _csv_rows(tmp_path / "late.csv")
    names = [n for n, _ in model.named_parameters()]
    assert header == ["step", *gradclip.monitor.SCALAR_KEYS, "nonfinite_layers", *(f"layer_norm/{n}" for n in names)]
    assert len(rows) == 4 and all(len(row) == len(header) for row in rows)
    records = read_log(tmp_path / "late.jsonl")
    for row, record in zip(rows, records):
        cells = dict(zip(header, row))
        for name in names:
            value = record["layer_norms"].get(name)
            if value is None:
                assert cells[f"layer_norm/{name}"] == ""
            else:
                assert float(cells[f"layer_norm/{name}"]) == pytest.approx(value)
    assert rows[0][header.index("layer_norm/0.weight")] == "" and rows[3][header.index("layer_norm/0.weight")] != ""


def test_csv_writer_on_its_own_rewrites_the_header_for_a_new_layer(tmp_path):
    writer = CsvWriter(tmp_path / "own.csv")
    writer.write([{"step": 0, "norm": 1.0, "layer_norms": {"a": 0.5}}])
    writer.write([{"step": 1, "norm": 2.0, "layer_norms": {"a": 0.25, "b": 3.0}},
                  {"step": 2, "norm": 3.0, "layer_norms": {"c": 4.0}}])
    writer.write([{"step": 3, "norm": 4.0, "finite": False, "nonfinite_layers": 1, "layer_norms": {"b": math.inf}}])
    writer.close()
    header, *rows = _csv_rows(tmp_path / "own.csv")
    assert header[-3:] == ["layer_norm/a", "layer_norm/b", "layer_norm/c"]
    assert all(len(row) == len(header) for row in rows)
    table = [dict(zip(header, row)) for row in rows]
    assert [r["step"] for r in table] == ["0", "1", "2", "3"]
    assert [r["layer_norm/a"] for r in table] == ["0.5", "0.25", "", ""]
    assert [r["layer_norm/b"] for r in table] == ["", "3.0", "", "inf"]
    assert [r["layer_norm/c"] for r in table] == ["", "", "4.0", ""]
    assert [r["nonfinite_layers"] for r in table] == ["", "", "", "1"] and table[3]["finite"] == "0"
    assert not (tmp_path / "own.csv.tmp").exists()


def test_bad_monitor_arguments_name_the_argument_value_and_range():
    model = _model()
    with pytest.raises(gradclip.InvalidArgumentError, match=r"Monitor: history must be an integer >= 1, got 0"):
        Monitor(model, history=0)
    with pytest.raises(gradclip.InvalidArgumentError, match=r"Monitor: window must be an integer >= 1, got 0"):
        Monitor(model, window=0)
    with pytest.raises(gradclip.InvalidArgumentError, match=r"window must be an integer >= 1, got 2.5"):
        Monitor(model, window=2.5)


def test_bad_observe_arguments_are_refused_and_record_nothing(tmp_path):
    model = _model()
    monitor = Monitor(model, writers=[JsonlWriter(tmp_path / "o.jsonl")], warn=False)
    clipper = gradclip.GlobalNorm(1.0)
    _backward(model, seed=0)
    info = clipper.clip_(model)
    with pytest.raises(gradclip.InvalidArgumentError, match=r"Monitor.observe: step must be an integer .* got 'x' of type str"):
        monitor.observe(info, step="x")
    with pytest.raises(gradclip.InvalidArgumentError, match=r"step must be an integer .* got True"):
        monitor.observe(info, step=True)
    with pytest.raises(gradclip.InvalidArgumentError, match=r"layer_norms must be \(names, 1-D tensor\)"):
        monitor.observe(info, layer_norms=(["0.weight"], torch.ones(2)))
    with pytest.raises(gradclip.InvalidArgumentError, match=r"layer_norms must be"):
        monitor.observe(info, layer_norms=torch.ones(4))
    assert monitor.steps == 0 and not (tmp_path / "o.jsonl").exists()
    monitor.observe(info, step=np.int64(7))  # any integer type is a step number
    monitor.observe(info)
    monitor.close()
    assert [r["step"] for r in read_log(tmp_path / "o.jsonl")] == [7, 8]


def test_bad_writer_arguments_name_the_argument_and_value(tmp_path):
    with pytest.raises(gradclip.InvalidArgumentError, match=r"CsvWriter: path must be a path \(str or os.PathLike\), got 3 of type int"):
        CsvWriter(3)
    with pytest.raises(gradclip.InvalidArgumentError, match=r"JsonlWriter: path must be a path .* got None"):
        JsonlWriter(None)
    with pytest.raises(gradclip.InvalidArgumentError, match=r"TensorBoardWriter: prefix must be a str .* got 1 of type int"):
        TensorBoardWriter(tmp_path / "tb", prefix=1)
    assert not (tmp_path / "tb").exists()  # nothing created
    with pytest.raises(gradclip.InvalidArgumentError, match=r"names must be a list of str"):
        CsvWriter(tmp_path / "x.csv").set_layer_names("0.weight")


@pytest.mark.parametrize("kind", ["jsonl", "csv", "tensorboard"])
def test_writing_to_a_closed_writer_raises_and_keeps_the_log(tmp_path, kind):
    make = {
        "jsonl": lambda: JsonlWriter(tmp_path / "w.jsonl"),
        "csv": lambda: CsvWriter(tmp_path / "w.csv"),
        "tensorboard": lambda: TensorBoardWriter(tmp_path / "tb"),
    }[kind]
    writer = make()
    writer.write([{"step": 0, "norm": 1.0, "layer_norms": {"a": 1.0}}])
    writer.close()
    path = writer.path
    with open(path, "rb") as file:
        before = file.read()
    with pytest.raises(gradclip.InvalidArgumentError, match=r"write: the writer of .* is closed"):
        writer.write([{"step": 1, "norm": 2.0}])
    with open(path, "rb") as file:
        assert file.read() == before  # not reopened, not overwritten
    writer.close()  # idempotent
