"""End to end: a warm pod's agent packs its JIT cache, the operator picks it, and
new pods' agents install it before their engine may start (startup gate)."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ferry_agent.artifacts.trust import generate_keypair
from ferry_dev.cluster import DevCluster
from tests.kube_helpers import GROUP, VERSION, cond, create, get, wait_for

pytestmark = pytest.mark.e2e
IDENTITY = {"triton": "3.7.1", "cuda": "13.0", "gpuArch": "sm_90"}


def cache_tree(root: Path) -> dict[str, bytes]:
    files = {
        f"{i:02x}/kernel_{j}.cubin": os.urandom(1000 + 37 * j) for i in range(6) for j in range(5)
    }
    files["index.json"] = b'{"entries": 30}'
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".ferry" not in p.parts
    }


def startupz(c: DevCluster, pod: str) -> int:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{c.agents[pod].metrics_port}/startupz", timeout=3
        ) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def artifactcache(name: str, **spec: object) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ArtifactCache",
        "metadata": {"name": name},
        "spec": {
            "kinds": ["triton"],
            "identity": IDENTITY,
            "sources": {"matchLabels": {"app": "inference", "ferry.dev/warm": "true"}},
            "targets": {"matchLabels": {"app": "inference"}},
            "installTimeoutSeconds": 60,
            **spec,
        },
    }


def add_warm_pod(c: DevCluster) -> dict[str, bytes]:
    c.add_pod(
        "inference-warm",
        "source",
        {"app": "inference", "ferry.dev/warm": "true"},
        start_agent=False,
    )
    files = cache_tree(c.workdir / "agents" / "inference-warm" / "cache" / "triton")
    c.start_agent("inference-warm", "source", "dev-node-0")
    return files


@pytest.mark.cluster(sources=0, targets=0)
def test_targets_install_the_warm_cache_before_their_engine_starts(cluster: DevCluster) -> None:
    api = cluster.api()
    create(
        api,
        cluster.namespace,
        "artifactcaches",
        artifactcache("triton-cache", trust={"allowUnsigned": True}),
    )
    # New pods while no warm pod exists: their sidecars hold the engines back.
    for i in range(2):
        cluster.add_pod(f"inference-{i}", "target", {"app": "inference"})

    def waiting() -> bool:
        members = (
            get(api, "artifactcaches", cluster.namespace, "triton-cache")
            .get("status", {})
            .get("members", [])
        )
        return {m["pod"] for m in members if m.get("state") == "Waiting"} == {
            "inference-0",
            "inference-1",
        }

    wait_for(waiting, what="targets waiting for a source")
    time.sleep(2)
    assert startupz(cluster, "inference-0") == 503
    assert startupz(cluster, "inference-1") == 503
    files = add_warm_pod(cluster)
    ac = wait_for(
        lambda: (
            (o := get(api, "artifactcaches", cluster.namespace, "triton-cache"))
            .get("status", {})
            .get("installed")
            == 2
            and o
        ),
        timeout=60,
        what="installed=2",
    )
    st = ac["status"]
    assert st["source"] == "inference-warm" and st["files"] == len(files)
    assert st["bytes"] == sum(len(d) for d in files.values()) and len(st["manifestId"]) == 64
    assert cond(ac, "Ready")["status"] == "True" and st["trust"] == "Unverified"
    assert (
        cond(ac, "Trusted")["status"] == "False"
        and cond(ac, "Trusted")["reason"] == "UnsignedAllowed"
    )
    members = {m["pod"]: m for m in st["members"]}
    for pod in ("inference-0", "inference-1"):
        assert tree(cluster.agents[pod].cache_dir / "triton") == files
        assert startupz(cluster, pod) == 200
        assert members[pod]["trusted"] is False  # it accepted an unsigned archive


@pytest.mark.cluster(sources=0, targets=1)
def test_unsigned_cache_without_the_opt_in_is_refused_and_names_the_field(
    cluster: DevCluster,
) -> None:
    api = cluster.api()
    create(api, cluster.namespace, "artifactcaches", artifactcache("no-trust"))
    add_warm_pod(cluster)

    def failed() -> dict | None:
        members = (
            get(api, "artifactcaches", cluster.namespace, "no-trust")
            .get("status", {})
            .get("members", [])
        )
        return next(
            (m for m in members if m["pod"] == "inference-0" and m.get("state") == "Failed"), None
        )

    entry = wait_for(failed, timeout=60, what="inference-0 refused the unsigned cache")
    assert (
        entry["reason"] == "UnsignedNotAllowed" and "spec.trust.allowUnsigned" in entry["message"]
    )
    ac = get(api, "artifactcaches", cluster.namespace, "no-trust")
    assert ac["status"]["trust"] == "Refused" and cond(ac, "Trusted")["reason"] == "UnsignedRefused"
    assert tree(cluster.agents["inference-0"].cache_dir / "triton") == {}  # nothing installed
    assert startupz(cluster, "inference-0") == 200  # gave up: the engine starts cold


@pytest.mark.cluster(sources=0, targets=2)
def test_signed_cache_installs_and_a_wrong_key_is_refused(cluster: DevCluster) -> None:
    trust = cluster.workdir / "trust"
    (trust / "signing").mkdir(parents=True)
    generate_keypair(trust / "signing" / "ed25519.key", trust / "signing" / "ed25519.pub")
    (trust / "other").mkdir()
    generate_keypair(trust / "other" / "ed25519.key", trust / "other" / "wrong.pub")
    # the signing Secret mounted into targets carries a public key that does not match
    (trust / "other" / "ed25519.key").write_bytes((trust / "signing" / "ed25519.key").read_bytes())
    files = add_warm_pod(cluster)
    api = cluster.api()
    create(
        api,
        cluster.namespace,
        "artifactcaches",
        artifactcache("signed", trust={"secretRef": "signing", "key": "ed25519.pub"}),
    )
    ac = wait_for(
        lambda: (
            (o := get(api, "artifactcaches", cluster.namespace, "signed"))
            .get("status", {})
            .get("installed")
            == 2
            and o
        ),
        timeout=60,
        what="signed installed=2",
    )
    assert ac["status"]["trust"] == "Signed" and cond(ac, "Trusted")["status"] == "True"
    assert all(m["trusted"] is True for m in ac["status"]["members"] if m.get("role") == "target")
    assert tree(cluster.agents["inference-1"].cache_dir / "triton") == files

    create(
        api,
        cluster.namespace,
        "artifactcaches",
        artifactcache(
            "forged",
            kinds=["deepgemm"],
            identity={"cuda": "13.0", "gpuArch": "sm_90"},
            trust={"secretRef": "other", "key": "wrong.pub"},
        ),
    )
    deep = cluster.workdir / "agents" / "inference-warm" / "cache" / "deepgemm"
    cache_tree(deep)
    ac = wait_for(
        lambda: (
            (o := get(api, "artifactcaches", cluster.namespace, "forged"))
            .get("status", {})
            .get("failures")
            and o
        ),
        timeout=60,
        what="failures",
    )
    reasons = {f["reason"] for f in ac["status"]["failures"]}
    assert (
        len(ac["status"]["failures"]) == 2 and reasons and all("Signature" in r for r in reasons)
    ), reasons
    assert cond(ac, "Degraded")["reason"] == "InstallFailures" and ac["status"]["installed"] == 0
    for pod in ("inference-0", "inference-1"):
        assert (
            not (cluster.agents[pod].cache_dir / "deepgemm").exists()
            or tree(cluster.agents[pod].cache_dir / "deepgemm") == {}
        ), "a refused cache must write nothing"
        assert startupz(cluster, pod) == 200, "giving up still lets the engine start (cold)"
