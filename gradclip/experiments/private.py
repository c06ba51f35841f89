"""Private training in ``gradclip compare``: DP-SGD runs that report ε beside the metric.

``gradclip compare --task digits --private epsilon=3`` (``compare(..., private="epsilon=3")``)
trains every run with DP-SGD (Abadi et al. 2016, "Deep learning with differential privacy"):
Poisson sampling at ``q = B / N`` (``B`` the task's batch size, ``N`` its training set),
per-example clipping by the run's clipper (:class:`~gradclip.torch.PerSample`, the bound ``C``
the clipper's own: ``global_norm:max_norm=1.0`` clips each example's whole gradient, ``norm`` each
parameter's, ``quantile_norm`` adapts ``C`` with a noised count, Andrew et al. 2021), Gaussian noise
``N(0, σ²C²)`` and division by ``B`` (:class:`~gradclip.torch.DPOptimizer` around the task's own
optimizer), and records the ε spent at δ (Opacus' accountant) in every run's record.

The privacy spec is ``key=value`` pairs, as a clipper spec's parameters:

* ``noise_multiplier=σ`` (``>= 0``; 0 clips per example without noise: ε is infinite), or
  ``epsilon=ε`` (``> 0``): the σ that spends at most ε, within 0.01, over the run's steps
  (:func:`~gradclip.torch.accounting.noise_multiplier_for`), solved once for every run;
* ``delta=δ`` in ``(0, 1)`` (default: ``1e-5``, or ``1/N`` when the training set is larger than
  100,000 examples: a δ above 1/N would allow leaking one whole example);
* ``accountant=rdp|prv|gdp`` (default ``rdp``, Opacus' default);
* ``mode=auto|bk|ghost|instantiate|vmap`` (:class:`~gradclip.torch.PerSample`'s; default ``auto``);
* ``batch_size=B`` (default: the task's :attr:`~gradclip.experiments.Task.batch_size`).

One privacy setting per comparison, so the verdict compares clippers at equal privacy (its
best C "in hindsight" is picked on the private data, which each run's ε does not cover: tuning
spends privacy too, Papernot & Steinke 2022, "Hyperparameter tuning with Rényi differential
privacy"); the non-private baseline is the same command without ``--private`` (the same model,
optimizer, learning rate, steps and batch size, with the task's own batches and mean loss), and
``noise_multiplier=0`` isolates what per-example clipping alone costs. A task trains privately when it declares its
training set (:meth:`~gradclip.experiments.Task.training_set`) and one loss per example
(:meth:`~gradclip.experiments.Task.example_losses`).

Everything is checked by :func:`plan_private` before any run starts: the spec, every clipper (ZClip,
AutoClip and AdaGC set their threshold from private gradient norms without noise, and ``none``
bounds nothing: both refused), and the task (its model's layers must have per-example rules —
BatchNorm and LSTM are refused by name — and it must declare the two methods above).

The noise and the batches are drawn from generators seeded by the run's seed, so a comparison is
reproducible; a seeded noise is known to whoever knows the seed, so this measures what privacy
costs, it does not deploy it (use ``DPOptimizer(secure_mode=True)`` for that).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gradclip._core.errors import InvalidArgumentError, UnknownNameError
from gradclip._core.validation import check_choice, check_int, check_number
from gradclip.experiments.private_training import (
    check_example_losses,
    checked_training_set,
    example_rows,
)
from gradclip.experiments.spec import NONE, _parse_value, parse_spec
from gradclip.experiments.tasks.base import Task, TaskError

__all__ = [
    "ACCOUNTANTS",
    "PRIVATE_CLIPPERS",
    "PrivateSpec",
    "check_private_clipper",
    "describe_epsilon",
    "epsilon_of",
    "parse_private",
    "plan_private",
]

#: The clippers a private comparison runs when none are given: a fixed bound C = 1 and the
#: adaptive bound of Andrew et al. 2021 (the task's default list holds clippers DP refuses).
PRIVATE_CLIPPERS = ("global_norm:max_norm=1.0", "quantile_norm")
#: Opacus' accountants (:class:`~gradclip.torch.accounting.Accountant`).
ACCOUNTANTS = ("rdp", "prv", "gdp")
#: PerSample's modes (:data:`gradclip.torch.per_sample.MODES`, repeated here so that parsing a
#: spec imports no framework; a test keeps the two equal).
MODES = ("auto", "bk", "ghost", "instantiate", "vmap")
#: δ when none is given: 1e-5, the customary value, unless the training set is larger than 1e5
#: examples; then 1/N (δ above 1/N would allow leaking one whole example).
DEFAULT_DELTA = 1e-5

_WHERE = "private"
_KEYS = ("noise_multiplier", "epsilon", "delta", "accountant", "mode", "batch_size")


@dataclass(frozen=True)
class PrivateSpec:
    """A parsed privacy spec (see the module's documentation for the keys).

    Attributes:
        text: The canonical text (``key=value`` sorted), a label.
        noise_multiplier: σ, or None when ``epsilon`` is given.
        epsilon: The target ε, or None when ``noise_multiplier`` is given.
        delta: δ, or None for the default (:data:`DEFAULT_DELTA`, or 1/N).
        accountant: One of :data:`ACCOUNTANTS`.
        mode: One of :data:`MODES`.
        batch_size: The expected batch size, or None for the task's.
    """

    text: str
    noise_multiplier: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    accountant: str = "rdp"
    mode: str = "auto"
    batch_size: int | None = None


def parse_private(value: Any) -> PrivateSpec:
    """Parse ``"noise_multiplier=1.1,delta=1e-5"`` (or a dict of the same keys) into a
    :class:`PrivateSpec`.

    Args:
        value: The spec text, a mapping, or a :class:`PrivateSpec` (returned as is).

    Returns:
        The parsed spec.

    Raises:
        UnknownNameError: A key that is not one of ``noise_multiplier``, ``epsilon``, ``delta``,
            ``accountant``, ``mode``, ``batch_size``, or an unknown accountant or mode.
        InvalidArgumentError: Malformed text; neither or both of ``noise_multiplier`` and
            ``epsilon``; ``noise_multiplier < 0``; ``epsilon <= 0``; ``delta`` outside ``(0, 1)``;
            ``batch_size < 1`` (each message names the value and the valid range).
    """
    if isinstance(value, PrivateSpec):
        return value
    if isinstance(value, Mapping):
        items = dict(value)
        label = ",".join(f"{k}={v}" for k, v in items.items())
    elif isinstance(value, str) and value.strip():
        label, items = value.strip(), {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            key, equals, raw = item.partition("=")
            if not equals or not key.strip():
                raise InvalidArgumentError(f"{_WHERE}: expected key=value pairs like 'epsilon=3,delta=1e-5', got {item!r}")
            items[key.strip()] = _parse_value(raw)
    else:
        raise InvalidArgumentError(
            f"{_WHERE}: expected a spec like 'noise_multiplier=1.1' or 'epsilon=3,delta=1e-5', got {value!r}"
        )
    where = f"{_WHERE} {label!r}"
    unknown = sorted(set(items) - set(_KEYS))
    if unknown:
        raise UnknownNameError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(_KEYS)}")
    if ("noise_multiplier" in items) == ("epsilon" in items):
        raise InvalidArgumentError(
            f"{where}: give exactly one of noise_multiplier=σ (the noise, >= 0) and epsilon=ε (the budget, > 0; "
            "σ is solved from it)"
        )
    fields: dict[str, Any] = {}
    if "noise_multiplier" in items:
        fields["noise_multiplier"] = check_number(where, "noise_multiplier", items["noise_multiplier"], high_inclusive=False)
    if "epsilon" in items:
        fields["epsilon"] = check_number(where, "epsilon", items["epsilon"], low_inclusive=False, high_inclusive=False)
    if "delta" in items:
        fields["delta"] = check_number(where, "delta", items["delta"], low_inclusive=False, high=1.0, high_inclusive=False)
    if "accountant" in items:
        fields["accountant"] = check_choice(where, "accountant", items["accountant"], ACCOUNTANTS)
    if "mode" in items:
        fields["mode"] = check_choice(where, "mode", items["mode"], MODES)
    if "batch_size" in items:
        fields["batch_size"] = check_int(where, "batch_size", items["batch_size"], low=1)
    text = ",".join(f"{key}={items[key]}" for key in sorted(items))
    return PrivateSpec(text, **fields)


def check_private_clipper(text: str) -> None:
    """Refuse a clipper spec that DP-SGD cannot use, before anything runs.

    Raises:
        InvalidArgumentError: ``none`` (no bound on an example's gradient, so no sensitivity),
            or a clipper :class:`~gradclip.torch.PerSample` refuses: ZClip, AutoClip and AdaGC
            (thresholds that follow private gradient norms without noise), element-wise and
            unit-wise clippers (no per-example norm bound), a norm other than L2, a chain
            (``a+b``). The message names the clipper and why.
    """
    spec = parse_spec(text)
    if spec.name == NONE:
        raise InvalidArgumentError(
            f"{_WHERE}: clipper 'none' bounds no example's gradient, so DP-SGD's noise has no sensitivity to "
            "scale to; for a non-private baseline run the same comparison without private (--private), "
            "for per-example clipping without noise use noise_multiplier=0"
        )
    if spec.links:
        # PerSample bounds each example with one norm clipper and would refuse the built Chain
        # by its class name; say it in the spec's own terms.
        raise InvalidArgumentError(
            f"{_WHERE}: clipper {spec.text!r} is a chain, and DP-SGD clips each example with one clipper "
            "(global_norm, norm or quantile_norm); give one of them without '+'"
        )
    from gradclip.torch.per_sample import check_clipper

    try:
        check_clipper("PerSample", spec.build())
    except InvalidArgumentError as error:
        raise InvalidArgumentError(f"{_WHERE}: clipper {spec.text!r} cannot train privately: {_reason(error)}") from None


def _reason(error: Exception) -> str:
    """PerSample's message without its prefix and its closing "Nothing was changed." (here nothing
    has run at all)."""
    return str(error).removeprefix("PerSample: ").removesuffix(" Nothing was changed.")


def _owner(cls: type, attribute: str) -> type:
    """The class of ``cls``'s MRO that defines ``attribute``."""
    return next(klass for klass in cls.__mro__ if attribute in vars(klass))


def _probe(cls: type[Task], options: Mapping[str, Any], mode: str) -> int:
    """Build the task once (seed 0) and check what private training will need of it: every layer
    has a per-example rule in ``mode`` (PerSample's hooks go on and off again), a training set,
    one loss per example. The caller's random state is left as it was.

    Returns:
        The training set's size N.
    """
    import torch

    import gradclip
    from gradclip.torch import PerSample

    name = cls.name
    with torch.random.fork_rng(devices=[]):  # Task.__init__ seeds torch's global generator
        task = cls(0, **options)
        model = task.model()
        try:
            PerSample(model, gradclip.GlobalNorm(1.0), mode=mode).remove()
        except InvalidArgumentError as error:
            raise TaskError(f"task {name!r} cannot train privately: {_reason(error)}") from None
        data = checked_training_set(task, name)
        examples = len(data[0])
        with torch.no_grad():
            check_example_losses(name, task.example_losses(model, example_rows(data, slice(0, 2))), min(2, examples))
    return examples


def plan_private(
    private: Any, cls: type[Task], options: Mapping[str, Any], clippers: list[str], steps: int
) -> tuple[dict[str, Any], str]:
    """Check a private comparison and resolve its settings; nothing is trained.

    Args:
        private: The privacy spec (text, mapping or :class:`PrivateSpec`).
        cls: The :class:`~gradclip.experiments.Task` subclass.
        options: Its constructor options.
        clippers: The comparison's clipper specs.
        steps: Optimizer steps per run (σ is solved over them for ``epsilon=``).

    Returns:
        ``(settings, description)``: the plain-data settings every run gets
        (``noise_multiplier``, ``delta``, ``sample_rate``, ``expected_batch_size``, ``examples``,
        ``accountant``, ``mode``, ``target_epsilon``) and one line for the reports.

    Raises:
        InvalidArgumentError: A bad spec or a clipper DP-SGD refuses (see
            :func:`parse_private`, :func:`check_private_clipper`).
        TaskError: The task cannot train privately: a layer without a per-example rule (named),
            no training set or per-example losses, gradient faults injected after backward,
            a batch size larger than the training set.
    """
    spec = parse_private(private)
    for text in clippers:
        check_private_clipper(text)
    name = cls.name
    if cls.perturb is not Task.perturb:
        raise TaskError(
            f"task {name!r} cannot train privately: it changes the gradients after backward (Task.perturb), "
            "which would move the clipped sum past the bound the noise is scaled to"
        )
    batches, examples_from = _owner(cls, "batch"), _owner(cls, "training_set")
    if examples_from is not Task and not issubclass(examples_from, batches):
        # e.g. badbatch: digits whose batch() corrupts some batches. Private training samples
        # training_set(), so it would silently train plain digits instead.
        raise TaskError(
            f"task {name!r} cannot train privately: its batches come from {batches.__name__}.batch but its "
            f"training set from {examples_from.__name__}.training_set, so Poisson batches of that set would not be "
            f"the data {name!r} trains on; define training_set() (and example_losses()) in {batches.__name__}"
        )
    examples = _probe(cls, options, spec.mode)
    batch = spec.batch_size if spec.batch_size is not None else cls.batch_size
    if batch is None:
        raise TaskError(f"task {name!r} declares no batch_size; give one: private batch_size=B")
    batch = check_int(f"{_WHERE} (task {name!r})", "batch_size", batch, low=1)
    if batch > examples:
        raise InvalidArgumentError(
            f"{_WHERE}: batch_size must be at most the training set's {examples} examples (q = B / N <= 1), got {batch}"
        )
    delta = spec.delta if spec.delta is not None else min(DEFAULT_DELTA, 1.0 / examples)
    q = batch / examples
    sigma = spec.noise_multiplier
    if spec.epsilon is not None:
        from gradclip.torch.accounting import noise_multiplier_for

        with warnings.catch_warnings():
            # The bisection probes large σ, where Opacus' RDP orders reach their end and it says
            # so; the σ it returns is accounted with orders to spare.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            try:
                sigma = noise_multiplier_for(spec.epsilon, delta, q, steps, kind=spec.accountant)
            except ValueError as error:  # Opacus' search gives up past its largest σ
                raise InvalidArgumentError(
                    f"{_WHERE} {spec.text!r}: no noise multiplier reaches epsilon={spec.epsilon:g} at delta={delta:g} "
                    f"over {steps} steps at q={batch}/{examples} (Opacus: {error}); raise epsilon or delta, or use "
                    "accountant=prv (the rdp accountant's largest order, 63, puts a floor of about ln(1/delta)/62 "
                    "under epsilon)"
                ) from None
    settings = {
        "noise_multiplier": float(sigma),
        "delta": float(delta),
        "sample_rate": q,
        "expected_batch_size": batch,
        "examples": examples,
        "accountant": spec.accountant,
        "mode": spec.mode,
        "target_epsilon": spec.epsilon,
    }
    target = f" (for ε={spec.epsilon:g})" if spec.epsilon is not None else ""
    description = f"DP-SGD σ={sigma:.4g}{target}, δ={delta:g}, q={batch}/{examples}, {spec.accountant} accountant"
    return settings, description


def epsilon_of(records: list[dict[str, Any]]) -> dict[str, float]:
    """The ε of each clipper's runs: the largest over its seeds (a run that stopped early spent
    less; the guarantee of the comparison is the largest). Empty for a non-private comparison."""
    spent: dict[str, float] = {}
    for record in records:
        if record.get("epsilon") is not None:
            spent[record["clipper"]] = max(spent.get(record["clipper"], 0.0), record["epsilon"])
    return spent


def describe_epsilon(value: float) -> str:
    """ε as the tables print it (∞ without noise, — when unknown: a run that failed)."""
    if math.isnan(value):
        return "—"
    return "∞" if math.isinf(value) else f"{value:.3g}"
