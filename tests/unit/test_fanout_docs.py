"""The fan-out model's committed numbers: its parameters are the committed GPU
measurements, its committed JSON is what the code computes, and fanout.png is current."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from ferry_bench import fanout
from ferry_bench.fanout import GPU, predict

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "docs" / "bench"


def fanout_plot() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ferry_fanout_plot", BENCH / "fanout_plot.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_parameters_are_the_committed_measurements() -> None:
    c = json.loads((BENCH / "transfer-cuda-20261122d-h200x2.json").read_text())
    assert GPU.nvlink_GBps == c["read_GBps"]
    assert GPU.per_pull_s == pytest.approx(c["warm_s"] - c["warm_read_s"])
    a = json.loads((BENCH / "transfer-cuda-20261122-h200x2.json").read_text())
    pts = [(a["descriptors"], a["warm_read_s"])] + [
        (s["descriptors"], s["warm_read_s"]) for s in a["sweep"]
    ]
    slope = np.polyfit([x for x, _ in pts], [y for _, y in pts], 1)[0]
    assert GPU.per_descriptor_s == pytest.approx(slope, rel=0.01)
    assert set(fanout.SOURCES) == set(fanout.Params.__dataclass_fields__)


def test_committed_model_json_is_what_the_code_computes() -> None:
    (path,) = sorted(BENCH.glob("fanout-model-*.json"))[-1:]
    doc = json.loads(path.read_text())
    assert doc["params"] == fanout.asdict(GPU)
    for sc in doc["scenarios"]:
        for strategy, rows in sc["strategies"].items():
            for row in rows:
                if row["targets"] <= 64:
                    got = predict(strategy, row["targets"], sc["sources"], sc["bytes"], GPU)
                    assert row["seconds"] == pytest.approx(got.seconds, abs=1e-6), (
                        f"{path.name} is stale: ferry bench fanout --out {path.name}"
                    )


def test_fanout_plot_is_current_and_shown() -> None:
    assert fanout_plot().stale() == [], "run .venv/bin/python docs/bench/fanout_plot.py"
    assert "bench/fanout.png" in (REPO / "docs" / "benchmarks.md").read_text()


def test_fanout_plot_goes_stale_when_a_result_changes(tmp_path: Path) -> None:
    plot = fanout_plot()
    for src in BENCH.glob("fanout-*.json"):
        shutil.copy(src, tmp_path / src.name)
    assert plot.stale(tmp_path) == ["fanout.png is missing"]
    plot.render(tmp_path)
    assert plot.stale(tmp_path) == []
    newest = plot.inputs(tmp_path)[-1]
    newest.write_text(newest.read_text().replace('"bytes_verified": true', '"bytes_verified": 1'))
    (problem,) = plot.stale(tmp_path)
    assert problem.startswith("fanout.png is stale")
