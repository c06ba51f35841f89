"""Chained clipper specs on the command line: ``zclip+skip_on_spike:sigma=3`` is one clipper,
``gradclip.chain`` of its links; ``+`` inside a value (``1e+3``, ``+inf``) stays a value."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest

import gradclip
from gradclip._core.errors import InvalidArgumentError, UnknownNameError
from gradclip.clippers.chain import Chain
from gradclip.experiments.spec import CHAIN, parse_spec, split_links


@pytest.mark.parametrize(
    "text, canonical, links",
    [
        ("zclip+skip_on_spike:sigma=3", "zclip+skip_on_spike:sigma=3", [("zclip", {}), ("skip_on_spike", {"sigma": 3})]),
        (
            "non_finite:policy=zero+global_norm:max_norm=1.0",
            "non_finite:policy=zero+global_norm:max_norm=1.0",
            [("non_finite", {"policy": "zero"}), ("global_norm", {"max_norm": 1.0})],
        ),
        # Spaces and dashes as in a single spec; keys sorted within each link, links kept in order.
        (
            " skip-on-spike:sigma=4,window=32 + value:max_value=0.5,min_value=-0.5 ",
            "skip_on_spike:sigma=4,window=32+value:max_value=0.5,min_value=-0.5",
            [("skip_on_spike", {"sigma": 4, "window": 32}), ("value", {"min_value": -0.5, "max_value": 0.5})],
        ),
        # A "+" in a value before the next link: the exponent stays in the value.
        (
            "global_norm:max_norm=1e+3+zclip",
            "global_norm:max_norm=1000.0+zclip",
            [("global_norm", {"max_norm": 1000.0}), ("zclip", {})],
        ),
    ],
)
def test_a_chain_parses_into_links_and_builds_a_chain(text, canonical, links):
    spec = parse_spec(text)
    assert spec.text == canonical and spec.name == CHAIN and spec.kwargs == {}
    assert [(link.name, link.kwargs) for link in spec.links] == links
    built = spec.build()
    assert isinstance(built, Chain)
    assert [clipper.name for clipper in built.clippers] == [name for name, _ in links]
    for clipper, (_, kwargs) in zip(built.clippers, links):
        assert {key: clipper.config()[key] for key in kwargs} == kwargs
    # The canonical text is itself a spec of the same chain.
    assert parse_spec(canonical) == spec


def test_a_chain_is_the_same_as_gradclip_chain_of_its_links():
    built = parse_spec("non_finite:policy=zero+global_norm:max_norm=1.0").build()
    by_hand = gradclip.chain(gradclip.get("non_finite", policy="zero"), gradclip.GlobalNorm(max_norm=1.0))
    assert built.config() == by_hand.config()


@pytest.mark.parametrize(
    "text, value",
    [
        ("global_norm:max_norm=1e+3", 1000.0),
        ("global_norm:max_norm=2.5E+2", 250.0),
        ("global_norm:max_norm=+inf", math.inf),
        ("global_norm:max_norm=1e+3,norm_type=2", 1000.0),
    ],
)
def test_a_plus_inside_a_value_is_not_a_chain(text, value):
    assert split_links(text) == [text]
    spec = parse_spec(text)
    assert spec.links == () and spec.name == "global_norm" and spec.kwargs["max_norm"] == value
    assert spec.build().max_norm == value


def test_single_specs_are_unchanged():
    spec = parse_spec("value:min_value=-0.5,max_value=0.5")
    assert (spec.text, spec.name, spec.links) == ("value:max_value=0.5,min_value=-0.5", "value", ())
    assert parse_spec("none").build() is None and parse_spec("none").links == ()


@pytest.mark.parametrize(
    "text, error, message",
    [
        ("zclip+none", InvalidArgumentError, "clipper spec 'zclip+none', link 2 'none': 'none' cannot be a link"),
        ("none+global_norm", InvalidArgumentError, "link 1 'none': 'none' cannot be a link"),
        ("zclip+", InvalidArgumentError, "clipper spec 'zclip+': link 2 is empty"),
        ("+zclip", InvalidArgumentError, "clipper spec '+zclip': link 1 is empty"),
        ("zclip++global_norm", InvalidArgumentError, "link 2 is empty"),
        ("global_norm:max_norm=1.0+", InvalidArgumentError, "link 2 is empty"),
        ("zclip+bogus", UnknownNameError, "clipper spec 'zclip+bogus', link 2 'bogus': unknown clipper 'bogus'; valid names: none, "),
        ("zclip:z_thresh=2+bogus:x=1", UnknownNameError, "link 2 'bogus:x=1': unknown clipper 'bogus'"),
        (
            "zclip+global_norm:bogus=1",
            UnknownNameError,
            (
                "clipper spec 'zclip+global_norm:bogus=1', link 2 'global_norm:bogus=1': global_norm has no "
                "parameter 'bogus'; its parameters: max_norm,"
            ),
        ),
        (
            "zclip+global_norm:max_norm=-1",
            InvalidArgumentError,
            "link 2 'global_norm:max_norm=-1': GlobalNorm: max_norm must be in [0, inf], got -1 (max_norm expects float)",
        ),
        ("non_finite:policy=oops+global_norm", InvalidArgumentError, "link 1 'non_finite:policy=oops': NonFinite: policy"),
    ],
)
def test_bad_chains_name_the_spec_and_the_link(text, error, message):
    with pytest.raises(error) as caught:
        parse_spec(text)
    assert message in str(caught.value)


def test_a_chain_of_one_link_is_that_link():
    assert parse_spec("zclip") == parse_spec(" zclip ")
    assert parse_spec("zclip").links == ()


def test_sweeps_refuse_chains_and_dedup_tells_chains_apart():
    from gradclip.experiments.sweep import expand, parse_sweep

    with pytest.raises(InvalidArgumentError, match=r"--sweep 'zclip\+global_norm:max_norm=0.1,1': a chain .* cannot be swept"):
        parse_sweep("zclip+global_norm:max_norm=0.1,1")
    assert parse_sweep("global_norm:max_norm=1e+3,1e+4") == ["global_norm:max_norm=1000.0", "global_norm:max_norm=10000.0"]
    # Chains that differ only in a later link are two clippers; 1 and 1.0 stay one value.
    assert expand(["zclip+global_norm:max_norm=1", "zclip+global_norm:max_norm=1.0", "zclip+value", "zclip"], None) == [
        "zclip+global_norm:max_norm=1", "zclip+value", "zclip",
    ]


def test_the_verdict_and_figures_read_a_chain_by_its_links():
    from gradclip.experiments.figures import threshold_scope
    from gradclip.experiments.verdict import clipper_kind

    assert clipper_kind("non_finite:policy=zero+global_norm:max_norm=1.0") == "fixed"
    assert clipper_kind("global_norm:max_norm=1.0+skip_on_spike") == "adaptive"
    # The chain reports its last link's threshold.
    assert threshold_scope("zclip+value:clip_value=0.1") == threshold_scope("value:clip_value=0.1") is not None
    assert threshold_scope("value:clip_value=0.1+global_norm") is None


def test_private_training_refuses_a_chain_by_name():
    from gradclip.experiments.private import check_private_clipper

    with pytest.raises(InvalidArgumentError, match=r"clipper 'non_finite\+global_norm' is a chain, and DP-SGD clips"):
        check_private_clipper("non_finite+global_norm")


def test_the_run_seed_reaches_each_unseeded_link():
    from gradclip.experiments.runner import RunConfig, _clipper

    def built(clipper: str, seed: int = 7):
        return _clipper(RunConfig("digits", clipper, seed, 2, None, None))

    chained = built("non_finite:policy=zero+subset:fraction=0.3")
    assert isinstance(chained, Chain)
    assert chained.clippers[0].config() == {"policy": "zero", "max_consecutive": None}
    assert chained.clippers[1].seed == 7 and chained.clippers[1].fraction == 0.3
    # Two unseeded links both take it; a seed given in the spec is kept.
    both = built("subset:fraction=0.3+subset:by=tensor", seed=3)
    assert [link.seed for link in both.clippers] == [3, 3] and both.clippers[1].by == "tensor"
    assert [getattr(link, "seed", None) for link in built("subset:seed=5+global_norm").clippers] == [5, None]
    assert built("subset").seed == 7  # a single clipper as before


def test_compare_runs_a_chain_end_to_end(tmp_path):
    pytest.importorskip("torch", reason="the experiment runner trains torch models")
    pytest.importorskip("matplotlib", reason="compare writes plots")
    pytest.importorskip("rich", reason="compare prints rich tables")
    chain, other = "non_finite:policy=zero+global_norm:max_norm=1e+3", "zclip+skip_on_spike:sigma=3"
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "gradclip.cli", "compare", "--task", "digits", "--steps", "3", "--seeds", "1",
         "--jobs", "1", "--no-progress", "--clipper", chain, "--clipper", other, "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr
    canonical = "non_finite:policy=zero+global_norm:max_norm=1000.0"
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["clipper"], r["status"], r["steps_run"]) for r in records] == [(canonical, "ok", 3), (other, "ok", 3)]
    with (out / "summary.csv").open() as handle:
        kinds = {row["clipper"]: row["kind"] for row in csv.DictReader(handle)}
    assert kinds == {canonical: "fixed", other: "adaptive"}
    table = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert any(line.startswith(f"│ {canonical} ") for line in table), result.stdout
    assert any(line.startswith(f"│ {other} ") for line in table), result.stdout


def test_compare_refuses_a_bad_chain_before_training(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gradclip.cli", "compare", "--task", "digits", "--steps", "3", "--no-progress",
         "--clipper", "zclip+global_norm:bogus=1", "--out", str(tmp_path / "run")],
        check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 2
    assert "link 2 'global_norm:bogus=1': global_norm has no parameter 'bogus'" in result.stderr
    assert not (tmp_path / "run" / "results.jsonl").exists()
