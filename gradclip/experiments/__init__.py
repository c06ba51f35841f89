"""The experiment runner behind ``gradclip compare``: train one task under many clippers.

The seeds' advice is to try clipping ranges experimentally; this package does it with evidence:
the same model and data, several clippers and seeds, in parallel, reported side by side.

* :mod:`~gradclip.experiments.tasks` — offline training tasks (synthetic RNN tasks of Pascanu et
  al. 2013, the seeds' digits classifier, gradient spikes, a character LSTM).
* :mod:`~gradclip.experiments.spec` — ``"global_norm:max_norm=1.0"`` clipper specifications.
* :mod:`~gradclip.experiments.runner` — one run, and many in parallel with progress bars.
* :mod:`~gradclip.experiments.report` — results.jsonl, summary.csv, plots, report.md/.html.
"""
