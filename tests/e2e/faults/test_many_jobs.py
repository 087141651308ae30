"""200 RefitJobs applied at once across 20 sources, with real agents moving real bytes.

Sizing for a 2-core machine (what this test chose, and why): 20 source pods, each
its own WeightSource (`model-<i>`, its own seed and version), and 10 target pods:
30 agent processes (~140 MB each). Job j copies source j % 20 into target j % 10,
so each target receives 20 jobs from two sources, one after another (an agent
runs one attempt at a time). The weights are tiny (1 MiB: 8 tensors) so that the
test measures the control plane and the agents' job handling, not the copy.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from kubernetes import client as k8s_client

from ferry_dev.cluster import DevCluster, demo_layout
from tests.e2e.faults.faults_helpers import (
    delete_jobs_and_check_finalizers,
    entries,
    poll,
    refitjob,
    weightsource,
)
from tests.kube_helpers import GROUP, VERSION, create, get

pytestmark = pytest.mark.e2e
SOURCES, TARGETS, JOBS = 20, 10, 200
SMALL = demo_layout(8, 1 << 20)


# Alone on 2 cores the jobs finish in about a minute; the generous limits are for
# a machine shared with other work (each attempt then takes seconds, not 0.1 s).
@pytest.mark.timeout(900)
@pytest.mark.cluster(sources=SOURCES, targets=TARGETS, nodes=4)
def test_200_jobs_across_20_sources(cluster: DevCluster) -> None:
    api, ns = cluster.api(), cluster.namespace
    core = k8s_client.CoreV1Api(api)
    sources = [f"trainer-{i}" for i in range(SOURCES)]
    tgts = [f"inference-{i}" for i in range(TARGETS)]
    for pod in sources + tgts:
        core.patch_namespaced_pod(pod, ns, {"metadata": {"labels": {"slot": pod}}})
    digests: dict[str, str] = {}
    for i, pod in enumerate(sources):
        body = weightsource(f"model-{i}")
        body["spec"]["selector"] = {"matchLabels": {"slot": pod}}
        create(api, ns, "weightsources", body)
        digests[f"v{i}"] = cluster.load_weights(pod, f"v{i}", SMALL, seed=100 + i)
    poll(
        lambda: all(
            get(api, "weightsources", ns, f"model-{i}").get("status", {}).get("readyReplicas") == 1
            for i in range(SOURCES)
        ),
        timeout=60,
        what="every source Ready",
    )

    names = [f"job-{j:03d}" for j in range(JOBS)]
    applied = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda j: create(
                    api,
                    ns,
                    "refitjobs",
                    refitjob(
                        names[j],
                        source=f"model-{j % SOURCES}",
                        targets={"slot": tgts[j % TARGETS]},
                        timeoutSeconds=600,
                    ),
                ),
                range(JOBS),
            )
        )

    co = k8s_client.CustomObjectsApi(api)

    def all_finished() -> list[dict[str, Any]] | None:
        items = co.list_namespaced_custom_object(GROUP, VERSION, ns, "refitjobs")["items"]
        done = [i for i in items if (i.get("status") or {}).get("phase") in ("Succeeded", "Failed")]
        return items if len(done) == JOBS else None

    items = poll(all_finished, timeout=600, what=f"{JOBS} jobs finished", every=1.0)
    took = time.monotonic() - applied
    failed = [
        (i["metadata"]["name"], i["status"].get("conditions"))
        for i in items
        if i["status"]["phase"] != "Succeeded"
    ]
    assert not failed, f"{len(failed)} jobs failed: {failed[:3]}"
    layout_bytes = next(iter(items))["status"]["bytesTotal"]
    for i in items:
        (entry,) = entries(i).values()
        assert entry["phase"] == "Done" and entry.get("bytes") == layout_bytes, (
            i["metadata"]["name"],
            entry,
        )
    # Each target holds the version of one of its two sources, byte for byte.
    from ferry_agent.client import EngineClient

    for t, pod in enumerate(tgts):
        with EngineClient.connect(cluster.agents[pod].socket) as c:
            version = c.status()["version"]
        assert version in (f"v{t}", f"v{t + TARGETS}"), (pod, version)
        assert cluster.weights_digest(pod) == digests[version], (
            f"{pod} holds different bytes than {version}"
        )
    print(f"\n{JOBS} jobs over {SOURCES} sources and {TARGETS} targets finished in {took:.1f}s")
    delete_jobs_and_check_finalizers(cluster, names, timeout=120)
