"""The generated CRDs install on an empty apiserver and kubectl shows the documented columns."""

from __future__ import annotations

from pathlib import Path

import yaml

from ferry_api.generate import CRD_DIR
from tests.conftest import kubectl

COLUMNS = {
    "ws": ["NAME", "MODEL", "VERSION", "READY", "SIZE", "AGE"],
    "rj": ["NAME", "SOURCE", "VERSION", "TARGETS", "PHASE", "THROUGHPUT", "AGE"],
    "ac": ["NAME", "KINDS", "INSTALLED", "TRUST", "AGE"],
}


def test_server_side_apply_of_crds_succeeds(kubeconfig: Path) -> None:
    done = kubectl(kubeconfig, "apply", "--server-side", "-f", str(CRD_DIR))
    assert done.returncode == 0, done.stderr
    for plural in ("weightsources", "refitjobs", "artifactcaches"):
        assert f"{plural}.ferry.dev serverside-applied" in done.stdout


def test_printer_columns_and_short_names(kubeconfig: Path, namespace: str) -> None:
    samples = Path(__file__).resolve().parents[2] / "examples"
    done = kubectl(kubeconfig, "apply", "-n", namespace, "-f", str(samples))
    assert done.returncode == 0, done.stderr
    for short, columns in COLUMNS.items():
        out = kubectl(kubeconfig, "get", short, "-n", namespace, check=True).stdout
        header = out.splitlines()[0].split()
        assert header == columns, f"kubectl get {short}: {header}"
        assert len(out.splitlines()) == 2, out


def test_ferry_category_lists_all_kinds(kubeconfig: Path, namespace: str) -> None:
    samples = Path(__file__).resolve().parents[2] / "examples"
    kubectl(kubeconfig, "apply", "-n", namespace, "-f", str(samples), check=True)
    out = kubectl(kubeconfig, "get", "ferry", "-n", namespace, "-o", "name", check=True).stdout
    kinds = {line.split("/")[0] for line in out.split()}
    assert kinds == {"weightsource.ferry.dev", "refitjob.ferry.dev", "artifactcache.ferry.dev"}


def test_list_maps_for_concurrent_writers(kubeconfig: Path) -> None:
    """conditions are keyed by type and per-pod entries by pod, so SSA writers merge."""
    for path in CRD_DIR.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        cond = status["properties"]["conditions"]
        assert cond["x-kubernetes-list-type"] == "map"
        assert cond["x-kubernetes-list-map-keys"] == ["type"]
        per_pod = [
            p
            for p in status["properties"].values()
            if p.get("x-kubernetes-list-map-keys") == ["pod"]
        ]
        assert per_pod, f"{path.name} has no per-pod list-map"
        assert crd["spec"]["versions"][0]["subresources"] == {"status": {}}
        assert "ferry" in crd["spec"]["names"]["categories"]
