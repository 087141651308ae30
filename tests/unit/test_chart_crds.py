"""The chart's CRD templates are current copies of crds/*.yaml (regenerate with
`python charts/ferry/hack/sync-crds.py`)."""

from __future__ import annotations

import runpy
from pathlib import Path

import yaml

SCRIPT = Path(__file__).resolve().parents[2] / "charts" / "ferry" / "hack" / "sync-crds.py"


def test_chart_crds_are_not_stale() -> None:
    sync = runpy.run_path(str(SCRIPT))
    assert sync["stale"]() == [], "run: python charts/ferry/hack/sync-crds.py"


def test_chart_crds_keep_the_schema_and_add_keep_and_wave() -> None:
    sync = runpy.run_path(str(SCRIPT))
    for dest, text in sync["wanted"]().items():
        body = "\n".join(line for line in text.splitlines() if not line.startswith(("{{", "#")))
        crd = yaml.safe_load(body)
        src = yaml.safe_load((sync["SOURCE"] / dest.name).read_text())
        assert crd["spec"] == src["spec"]
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert int(crd["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]) < 0
