"""Every page in docs/ builds from current code: plots match the committed
benchmark JSON, and every relative link and image points at something that exists."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [REPO / "README.md"]

# [text](target) and ![alt](target "title"); <img src="target">; [ref]: target
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML = re.compile(r"<(?:img|a)\s[^>]*(?:src|href)=\"([^\"]+)\"", re.I)
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s+<?(\S+?)>?(?:\s|$)", re.M)


def plot_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ferry_docs_plot", DOCS / "bench" / "plot.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def prose(text: str) -> str:
    """The page without fenced code blocks, indented code blocks and inline code."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.M | re.S)
    text = re.sub(r"^(?: {4}|\t).*$", "", text, flags=re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(page.read_text()), re.M)}


def links(page: Path) -> list[str]:
    text = prose(page.read_text())
    return [*INLINE.findall(text), *HTML.findall(text), *REFERENCE.findall(text)]


def test_link_parser_sees_links_images_and_skips_code(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text(
        'See [api](api.md#x) and ![plot](bench/t.png "T").\n<img src="a.png">\n'
        "[ref]: ops.md\n```\n[not](code.md)\n```\n`[nor](inline.md)`\n"
    )
    assert links(page) == ["api.md#x", "bench/t.png", "a.png", "ops.md"]
    assert (
        slug("Host memory transfer (agent data plane)") == "host-memory-transfer-agent-data-plane"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_and_image_exists(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # http:, https:, mailto:
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(
                f"{target} (no {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest})"
            )
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target} (no heading #{fragment} in {dest.name})")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {broken}"


def test_benchmark_plots_are_current() -> None:
    problems = plot_module().stale()
    assert not problems, f"{problems}: run .venv/bin/python docs/bench/plot.py and commit the PNGs"


def test_benchmarks_page_shows_every_plot() -> None:
    shown = set(links(DOCS / "benchmarks.md"))
    assert {"bench/transfer.png", "bench/artifacts.png"} <= shown


def test_plots_render_from_the_json_and_go_stale_when_it_changes(tmp_path: Path) -> None:
    plot = plot_module()
    for src in (DOCS / "bench").glob("*.json"):
        shutil.copy(src, tmp_path / src.name)
    assert plot.stale(tmp_path) == ["transfer.png is missing", "artifacts.png is missing"]
    written = plot.render(tmp_path, tmp_path)
    assert [p.name for p in written] == ["transfer.png", "artifacts.png"]
    assert plot.stale(tmp_path) == []
    meta = plot.png_text(tmp_path / "transfer.png")
    assert meta["ferry-runs"] == ",".join(sorted(p.name for p in tmp_path.glob("transfer-*.json")))
    # A new run committed without re-plotting makes the plot stale.
    new = tmp_path / "transfer-zz-new.json"
    new.write_text((tmp_path / sorted(meta["ferry-runs"].split(","))[0]).read_text())
    (problem,) = plot.stale(tmp_path)
    assert problem.startswith("transfer.png is stale") and "transfer-zz-new.json" in problem
