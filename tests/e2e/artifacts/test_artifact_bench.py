"""The benchmark runs end to end on a small tree (the numbers are not checked)."""

import pytest

from ferry_bench import artifacts as bench

pytestmark = pytest.mark.e2e


def test_bench_reports_every_stage_and_the_tar_baseline(tmp_path):
    report = bench.run(bytes_total=8 << 20, json=False, workdir=str(tmp_path))
    assert set(report["stages"]) == {"pack", "fetch_grpc", "install", "end_to_end"}
    assert set(report["baseline_tar"]) == {"create", "extract", "create_plus_extract"}
    assert all(v > 0 for v in report["ratios_vs_tar"].values())
    assert report["tree"]["bytes"] >= (8 << 20) - 16 and report["tree"]["files"] > 3
    assert list(tmp_path.iterdir()) == []  # cleaned up
