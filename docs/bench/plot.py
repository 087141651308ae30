"""Plots for docs/benchmarks.md, made from the benchmark JSON committed next to this script.

    .venv/bin/python docs/bench/plot.py           # (re)write transfer.png and artifacts.png
    .venv/bin/python docs/bench/plot.py --check   # exit 1 when a plot is missing or stale

transfer.png: each `ferry bench transfer --json` run, warm pull GB/s next to the
baseline measured in the same run, with the ratio.
artifacts.png: each artifacts benchmark run, GB/s per stage next to tar.

Each PNG carries, in a PNG text chunk, the sha256 of what it was drawn from
(the JSON files it plots and this script), so a test can tell that a plot is
stale without comparing pixels across matplotlib versions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCRIPT = Path(__file__).resolve()
DIGEST_KEY = "ferry-inputs"
RUNS_KEY = "ferry-runs"
FERRY, BASELINE = "#1f77b4", "#9e9e9e"


def kind(doc: dict[str, Any]) -> str | None:
    """transfer (ferry bench transfer) or artifacts (ferry_bench.artifacts); None otherwise."""
    name = doc.get("bench") or doc.get("benchmark")
    return name if name in ("transfer", "artifacts") else None


def runs(folder: Path) -> dict[str, list[tuple[Path, dict[str, Any]]]]:
    out: dict[str, list[tuple[Path, dict[str, Any]]]] = {"transfer": [], "artifacts": []}
    for path in sorted(folder.glob("*.json")):
        doc = json.loads(path.read_text())
        if (k := kind(doc)) is not None:
            out[k].append((path, doc))
    return out


def digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in [*sorted(paths, key=lambda p: p.name), SCRIPT]:
        h.update(p.name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def png_text(path: Path) -> dict[str, str]:
    """The tEXt chunks of a PNG (keyword -> text)."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    out, pos = {}, 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        ctype = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if ctype == b"tEXt":
            key, _, text = body.partition(b"\0")
            out[key.decode("latin-1")] = text.decode("latin-1")
        pos += 12 + length
    return out


def _label(path: Path, prefix: str) -> str:
    return path.stem.removeprefix(prefix)


def plot_transfer(items: list[tuple[Path, dict[str, Any]]], ax: Any) -> None:
    if not items:
        ax.text(0.5, 0.5, "no transfer runs committed yet", ha="center", va="center")
        ax.set_axis_off()
        return
    xs = range(len(items))
    ferry = [d["GBps"] for _, d in items]
    base = [d["baseline"]["GBps"] for _, d in items]
    w = 0.38
    ax.bar(
        [x - w / 2 for x in xs], ferry, w, color=FERRY, label="Ferry pull (NIXL READ, warm median)"
    )
    names = sorted({d["baseline"]["name"] for _, d in items})
    ax.bar(
        [x + w / 2 for x in xs],
        base,
        w,
        color=BASELINE,
        label="baseline, same run: " + (names[0] if len(names) == 1 else "see each JSON"),
    )
    for x, (_, d) in zip(xs, items, strict=True):
        ax.annotate(
            f"{d['ratio']:.2f}x",
            (x - w / 2, d["GBps"]),
            ha="center",
            va="bottom",
            xytext=(0, 2),
            textcoords="offset points",
            fontsize=9,
        )
    ax.set_xticks(list(xs))
    ax.set_xticklabels(
        [
            f"{_label(p, 'transfer-')}\n{d['memory']}, {d['sources']} source(s), "
            f"{d['bytes'] / 2**30:.3g} GiB, {d['tensors']} tensors"
            + ("" if d.get("verified") else ", NOT verified")
            for p, d in items
        ],
        fontsize=8,
    )
    ax.set_ylabel("GB/s (1 GB = 1e9 bytes)")
    ax.set_ylim(0, max(ferry + base) * 1.25)
    ax.set_title("Weight transfer: Ferry vs a baseline measured in the same run (label: ratio)")
    ax.legend(loc="upper left", fontsize=8)


STAGES = (  # (Ferry stage, tar stage or None, label)
    ("pack", "create", "pack\nvs tar create"),
    ("fetch_grpc", None, "fetch over gRPC\n(tar: no network hop)"),
    ("install", "extract", "install (verified)\nvs tar extract"),
    ("end_to_end", "create_plus_extract", "end to end\nvs tar create+extract"),
)


def plot_artifacts(doc: dict[str, Any], title: str, ax: Any) -> None:
    w = 0.38
    stages, tar = doc["stages"], doc["baseline_tar"]
    for x, (ours, theirs, _) in enumerate(STAGES):
        ax.bar(x - w / 2, stages[ours]["gbps"], w, color=FERRY, label="Ferry" if x == 0 else None)
        if theirs is not None:
            ax.bar(
                x + w / 2, tar[theirs]["gbps"], w, color=BASELINE, label="tar" if x == 0 else None
            )
            ratio = stages[ours]["gbps"] / tar[theirs]["gbps"] if tar[theirs]["gbps"] else 0
            ax.annotate(
                f"{ratio:.2f}x",
                (x - w / 2, stages[ours]["gbps"]),
                ha="center",
                va="bottom",
                xytext=(0, 2),
                textcoords="offset points",
                fontsize=9,
            )
    tree = doc.get("tree") or {}
    ax.set_xticks(range(len(STAGES)))
    ax.set_xticklabels([label for *_, label in STAGES], fontsize=8)
    ax.set_ylabel("GB/s of file payload")
    peak = max([s["gbps"] for s in stages.values()] + [t["gbps"] for t in tar.values()])
    ax.set_ylim(0, peak * 1.25)
    ax.set_title(
        f"Artifact cache {title}: {tree.get('files', '?')} files, "
        f"{tree.get('bytes', 0) / 1e9:.2f} GB (label: ratio to tar)",
        fontsize=10,
    )
    ax.legend(loc="upper right", fontsize=8)


def render(folder: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    found = runs(folder)
    written = []

    t = found["transfer"]
    fig, ax = plt.subplots(figsize=(max(6.0, 3.2 * len(t) + 2), 4.2))
    plot_transfer(t, ax)
    written.append(_save(fig, out / "transfer.png", [p for p, _ in t]))

    a = found["artifacts"]
    fig, axes = plt.subplots(max(1, len(a)), 1, figsize=(8, 4.2 * max(1, len(a))), squeeze=False)
    if not a:
        axes[0][0].text(0.5, 0.5, "no artifact runs committed yet", ha="center", va="center")
        axes[0][0].set_axis_off()
    for (path, doc), row in zip(a, axes, strict=False):
        plot_artifacts(doc, _label(path, "artifacts-"), row[0])
    written.append(_save(fig, out / "artifacts.png", [p for p, _ in a]))
    plt.close("all")
    return written


def _save(fig: Any, path: Path, inputs: list[Path]) -> Path:
    fig.tight_layout()
    fig.savefig(
        path,
        dpi=100,
        metadata={DIGEST_KEY: digest(inputs), RUNS_KEY: ",".join(p.name for p in sorted(inputs))},
    )
    return path


def stale(folder: Path = HERE) -> list[str]:
    """What is missing or out of date; empty when every plot matches its inputs."""
    found = runs(folder)
    problems = []
    for name, k in (("transfer.png", "transfer"), ("artifacts.png", "artifacts")):
        png = folder / name
        if not png.exists():
            problems.append(f"{name} is missing")
            continue
        have = png_text(png).get(DIGEST_KEY)
        if have != digest([p for p, _ in found[k]]):
            plotted = png_text(png).get(RUNS_KEY, "?")
            now = ",".join(p.name for p, _ in found[k])
            problems.append(
                f"{name} is stale (plotted: {plotted or 'none'}; now: {now or 'none'}, "
                "or the JSON or plot.py changed)"
            )
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--check", action="store_true", help="exit 1 when a plot is missing or stale")
    p.add_argument("--dir", type=Path, default=HERE, help="folder with the JSON (and the PNGs)")
    args = p.parse_args(argv)
    if args.check:
        problems = stale(args.dir)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("run: .venv/bin/python docs/bench/plot.py", file=sys.stderr)
        return 1 if problems else 0
    for path in render(args.dir, args.dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
