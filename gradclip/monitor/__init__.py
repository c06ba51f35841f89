"""Monitoring: what clipping measured and did, per step, written where you look.

::

    import gradclip
    from gradclip.monitor import JsonlWriter, TensorBoardWriter

    monitor = gradclip.Monitor(model, every=50, writers=[JsonlWriter("clip.jsonl"), TensorBoardWriter("runs/x")])
    for batch in loader:
        loss.backward()
        info = clipper.clip_(model)
        monitor.observe(info)          # no host-device sync here; one every 50 steps
        optimizer.step()
    monitor.close()
    print(monitor.suggest())           # a recommended max_norm, with its reasoning

``import gradclip.monitor`` imports no deep-learning framework; torch is imported when the first
torch ``ClipInfo`` is observed.

Log schema (JSON Lines, one object per step; also the CSV columns and TensorBoard tags)
------------------------------------------------------------------------------------------
Every record has:

``step`` (int)
    The step number: the trainer's global step when the integration knows it, else the count
    of observed steps from 0.
``norm`` (float)
    Global L2 norm of the gradients before clipping (unscaled when AMP is used).
``norm_after`` (float)
    ``norm * coef``: the global norm after clipping.
``threshold`` (float)
    The bound the clipper used this step (constant or adaptive).
``coef`` (float)
    The scale applied (1 when untouched; the effective ``norm_after / norm`` for per-tensor and
    element-wise methods).
``clipped``, ``finite``, ``skip`` (bool)
    Clipping changed the gradients; every gradient element was finite; the optimizer step was to
    be skipped.
``clip_rate`` (float)
    Fraction of the last ``window`` steps (this one included) that were clipped.

With ``per_layer=True`` and a model, also:

``layer_norms`` (object: parameter name -> float)
    L2 norm of each parameter's gradient as the optimizer uses it (after clipping). Parameters
    without a gradient that step are absent.
``nonfinite_layers`` (int)
    How many of those norms are NaN or inf. They are measured after the clipper's non-finite
    policy, so under ``nonfinite="zero"`` (which replaced the bad values by 0) this is 0; the
    step's ``finite`` is False then, and ``summary()["nonfinite_steps"]`` counts it.

With ``updates=True`` (``Monitor.before_step``/``after_step`` around each optimizer step; the
``ClippedOptimizer`` and the trainer callbacks call them), also:

``param_norms``, ``update_norms``, ``update_ratios`` (objects: parameter name -> float)
    Per layer, the parameter norm ``‖W‖`` after the step, the norm of the update ``‖ΔW‖`` the
    optimizer step made (0 on a skipped step) and their ratio ``‖ΔW‖ / ‖W‖`` (0 when the update
    is 0; inf for an update of a zero parameter). Measured on the device, fetched with the step.

Non-finite floats are written as ``null`` in JSON Lines (strict JSON has no NaN), as ``nan`` /
``inf`` in CSV and as themselves in TensorBoard. Readers should ignore keys they do not know: new
keys may be added, existing ones keep their meaning. :func:`read_log` reads a log back.

The CSV is a wide table with one fixed header (``pandas.read_csv`` reads it directly): ``step``,
the scalar fields, ``nonfinite_layers``, then ``layer_norm/<name>`` (and with updates
``param_norm/<name>``, ``update_norm/<name>``, ``update_ratio/<name>``) for every layer the monitor
tracks, in the model's order, so a layer whose gradient first appears late still has its column;
an empty cell is a value not recorded that step (pandas: NaN). TensorBoard gets one tag per field
(``gradclip/norm``, ``gradclip/nonfinite_layers``, ``gradclip/layer_norm/<name>``,
``gradclip/update_ratio/<name>``...).
"""

from gradclip.monitor._monitor import ClipRateWarning, Monitor
from gradclip.monitor.suggest import ThresholdSuggestion, suggest_threshold
from gradclip.monitor.writers import SCALAR_KEYS, CsvWriter, JsonlWriter, TensorBoardWriter, read_log

__all__ = [
    "ClipRateWarning",
    "CsvWriter",
    "JsonlWriter",
    "Monitor",
    "SCALAR_KEYS",
    "TensorBoardWriter",
    "ThresholdSuggestion",
    "read_log",
    "suggest_threshold",
]
