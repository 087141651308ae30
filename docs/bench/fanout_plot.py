"""The fan-out plot for docs/benchmarks.md, from the fan-out JSON committed next to this script.

    .venv/bin/python docs/bench/fanout_plot.py           # (re)write fanout.png
    .venv/bin/python docs/bench/fanout_plot.py --check   # exit 1 when it is missing or stale

fanout.png: predicted refit time vs number of target GPUs per strategy, from the
newest `fanout-model-*.json` (`ferry bench fanout --out ...`), one panel per weight
set size; and the small-N check, measured vs predicted, from the newest
`fanout-check-*.json` (`python -m ferry_bench.fanout_check`).

Like plot.py, the PNG carries the sha256 of its inputs (the two JSON files and this
script) in a PNG text chunk, so a test tells a stale plot without comparing pixels.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCRIPT = Path(__file__).resolve()
DIGEST_KEY = "ferry-inputs"
RUNS_KEY = "ferry-runs"
PNG = "fanout.png"
COLORS = {"direct": "#d62728", "tree": "#2ca02c", "chain": "#1f77b4"}


def _plot_module() -> Any:
    spec = importlib.util.spec_from_file_location("ferry_docs_plot", HERE / "plot.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def inputs(folder: Path) -> list[Path]:
    """The newest model result and the newest small-N check (either may be absent)."""
    out = []
    for pattern in ("fanout-model-*.json", "fanout-check-*.json"):
        found = sorted(folder.glob(pattern))
        if found:
            out.append(found[-1])
    return out


def digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in [*sorted(paths, key=lambda p: p.name), SCRIPT]:
        h.update(p.name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _model_panel(ax: Any, model: dict[str, Any], nbytes: int) -> None:
    for sc in model["scenarios"]:
        if sc["bytes"] != nbytes:
            continue
        style = "-" if sc["sources"] == 1 else "--"
        for strategy, rows in sc["strategies"].items():
            ax.plot(
                [r["targets"] for r in rows],
                [r["seconds"] for r in rows],
                style,
                marker="o",
                ms=3,
                color=COLORS.get(strategy),
                label=f"{strategy}, {sc['sources']} source GPU(s)",
            )
        if sc["sources"] == 1:
            one = sc["single_nic_s"]
            ax.axhline(one, color="#555", lw=0.8)
            ax.axhline(1.3 * one, color="#555", lw=0.8, ls=":")
            ax.annotate(
                "one target / 1.3x",
                (1, 1.3 * one),
                fontsize=7,
                color="#555",
                xytext=(2, 2),
                textcoords="offset points",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("target GPUs (8 per node)")
    ax.set_ylabel("predicted seconds")
    ax.set_title(f"{nbytes / 1e9:g} GB per target", fontsize=10)
    ax.grid(True, which="both", lw=0.3)
    ax.legend(fontsize=7)


def _check_panel(ax: Any, check: dict[str, Any]) -> None:
    for strategy in ("direct", "tree", "chain"):
        rows = [r for r in check["results"] if r["strategy"] == strategy]
        if not rows:
            continue
        ks = [r["targets"] for r in rows]
        ax.plot(
            ks,
            [r["predicted_s"] for r in rows],
            "-",
            color=COLORS[strategy],
            label=f"{strategy}: model",
        )
        ax.plot(
            ks,
            [r["measured_s"] for r in rows],
            "o",
            color=COLORS[strategy],
            label=f"{strategy}: measured",
        )
    ax.set_xlabel("targets (host memory, real agents)")
    ax.set_ylabel("seconds")
    ax.set_xticks(sorted({r["targets"] for r in check["results"]}))
    ax.set_title(
        f"small-N check: {check['bytes'] / 2**20:g} MiB paced at {check['max_gbps']} GB/s, "
        f"max |error| {check['max_abs_error_pct']}%",
        fontsize=9,
    )
    ax.grid(True, lw=0.3)
    ax.legend(fontsize=7)


def render(folder: Path = HERE, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = out or folder
    out.mkdir(parents=True, exist_ok=True)
    found = inputs(folder)
    docs = {p: json.loads(p.read_text()) for p in found}
    model = next((d for d in docs.values() if d.get("benchmark") == "fanout-model"), None)
    check = next((d for d in docs.values() if d.get("benchmark") == "fanout-check"), None)
    sizes = sorted({sc["bytes"] for sc in model["scenarios"]}) if model else []
    fig, axes = plt.subplots(
        1, len(sizes) + 1, figsize=(5.2 * (len(sizes) + 1), 4.4), squeeze=False
    )
    for ax, nbytes in zip(axes[0], sizes, strict=False):
        _model_panel(ax, model, nbytes)
    if check:
        _check_panel(axes[0][-1], check)
    else:
        axes[0][-1].text(0.5, 0.5, "no small-N check committed yet", ha="center")
        axes[0][-1].set_axis_off()
    fig.suptitle(
        "Fan-out model: refit time vs target GPUs (planner schedules, bandwidth model)", fontsize=11
    )
    fig.tight_layout()
    path = out / PNG
    fig.savefig(
        path,
        dpi=100,
        metadata={DIGEST_KEY: digest(found), RUNS_KEY: ",".join(p.name for p in sorted(found))},
    )
    plt.close(fig)
    return path


def stale(folder: Path = HERE) -> list[str]:
    png = folder / PNG
    if not png.exists():
        return [f"{PNG} is missing"]
    text = _plot_module().png_text(png)
    found = inputs(folder)
    if text.get(DIGEST_KEY) != digest(found):
        now = ",".join(p.name for p in found) or "none"
        return [
            f"{PNG} is stale (plotted: {text.get(RUNS_KEY) or 'none'}; now: {now}, "
            "or the JSON or fanout_plot.py changed)"
        ]
    return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--check", action="store_true", help="exit 1 when the plot is missing or stale")
    p.add_argument("--dir", type=Path, default=HERE, help="folder with the JSON (and the PNG)")
    args = p.parse_args(argv)
    if args.check:
        problems = stale(args.dir)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("run: .venv/bin/python docs/bench/fanout_plot.py", file=sys.stderr)
        return 1 if problems else 0
    print(render(args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
