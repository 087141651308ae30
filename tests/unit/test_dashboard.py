"""Every metric the Grafana dashboard queries is one the code registers."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry

import ferry_operator.metrics  # noqa: F401  (registers the operator metrics in REGISTRY)
from ferry_agent.metrics import AgentMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "ferry" / "dashboards" / "ferry.json"
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum"),
    "gauge": ("",),
    "info": ("_info",),
    "summary": ("_count", "_sum"),
}


def exported_names() -> set[str]:
    names: set[str] = set()
    agent = CollectorRegistry()
    AgentMetrics(agent)
    for registry in (REGISTRY, agent):
        for family in registry.collect():
            names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
    return {n for n in names if n.startswith("ferry_")}


def queried_names() -> set[str]:
    exprs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query") and isinstance(value, str):
                    exprs.append(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(DASHBOARD.read_text()))
    return {m for e in exprs for m in re.findall(r"\b(ferry_[a-z0-9_]+)", e)}


def test_every_dashboard_metric_exists() -> None:
    queried, exported = queried_names(), exported_names()
    assert len(queried) >= 10, queried
    assert queried <= exported, f"not exported by the code: {sorted(queried - exported)}"


def test_dashboard_covers_the_issue_panels() -> None:
    queried = queried_names()
    for wanted in (
        "ferry_agent_transfer_gbps",
        "ferry_agent_bytes_moved_total",
        "ferry_agent_registration_seconds_bucket",
        "ferry_operator_condition_transitions_total",
        "ferry_operator_reconcile_duration_seconds_bucket",
        "ferry_operator_watch_canary_age_seconds",
    ):
        assert wanted in queried
    # A counter queried without _total would silently show nothing.
    assert "ferry_agent_bytes_moved" not in queried


def test_dashboard_is_importable_grafana_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] == "Ferry"
    ids = [p.get("id") for p in dash["panels"] if p.get("id") is not None]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"
