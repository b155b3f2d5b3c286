"""The report's markdown (specauf/report/render.py): one function per section over one View, in
the report's order, and the claims by name with their labels."""
from __future__ import annotations

from specauf.report.claims import CLAIMS, named_claims
from specauf.report.render import View, render_markdown
from specauf.report.run import load_inputs
from tests.test_report import VARIANTS, _eval, _taus, _train, _write, holding  # noqa: F401 (fixture)


def test_sections_in_the_reports_order(holding):
    from specauf.report import render

    data = load_inputs(holding / "eval", holding / "train", VARIANTS)
    text = render_markdown(data, resamples=200)
    v = View.of(data, 200)
    sections = (render._intro, render._claims, render._goals, render._paper, render._tau_intervals, render._overall,
                render._per_set, render._replay_and_speed, render._runs)
    assert text == "\n".join(line for s in sections for line in s(v))
    heads = [line for line in text.splitlines() if line.startswith("#")]
    assert heads == ["# spec-auf report", "## The paper's claims, measured here", "## Issue goals",
                     "## The paper's numbers beside ours", "## tau with 95% intervals", "## Overall (all eval sets pooled)",
                     *(f"## Eval set: {n}" for n in v.set_names), "## Replay against decoding, and speed",
                     "## Runs: exactness gate and machine"]


def test_claims_are_named_and_labelled_once(holding):
    data = load_inputs(holding / "eval", holding / "train", VARIANTS)
    claims = named_claims(data, resamples=200)
    assert list(claims) == [name for name, _, _ in CLAIMS]
    text = render_markdown(data, resamples=200)
    for n, c in enumerate(claims.values(), start=1):
        assert f"{n}. **{c['label']}" in text and c["status"] in text
