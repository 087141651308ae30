"""What the fault tests share: resources, deadlines, byte checks and the finalizer check.

Every wait polls with a deadline (these tests run on 2 busy cores); nothing
asserts on a fixed sleep.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubernetes import client as k8s_client

from ferry_agent.layout import DTYPE_SIZES
from ferry_api import leases
from ferry_dev import manifests
from ferry_dev.cluster import DevCluster, demo_layout
from tests.kube_helpers import GROUP, VERSION, create, get, wait_for

# 24 MiB: at FERRY_PULL_MAX_GBPS=0.01 one pull takes ~2.4 s, long enough to land a fault in.
LAYOUT = demo_layout(60, 24 << 20)
LAYOUT_BYTES = sum(DTYPE_SIZES[t["dtype"]] * math.prod(t["shape"]) for t in LAYOUT)
FINALIZER = "ferry.dev/finalizer"


def weightsource(name: str = "policy", app: str = "trainer", lease: int = 6) -> dict[str, Any]:
    return manifests.weightsource(name, {"app": app}, "tiny-llama", lease_s=lease)


def refitjob(
    name: str, source: str = "policy", targets: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    return manifests.refitjob(
        name, source, targets or {"app": "inference"}, **{"timeoutSeconds": 120, **spec}
    )


def poll(fn: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    return wait_for(fn, timeout, what, every)


def job_or_none(api: k8s_client.ApiClient, ns: str, name: str) -> dict[str, Any] | None:
    try:
        return get(api, "refitjobs", ns, name)
    except k8s_client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def entries(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["pod"]: e for e in (job.get("status") or {}).get("targets") or []}


def lease_report(api: k8s_client.ApiClient, ns: str, pod: str, uid: str) -> dict[str, Any]:
    """`pod`'s agent's report on job `uid`, from its Lease ({} if none)."""
    lease = k8s_client.CoordinationV1Api(api).read_namespaced_lease(leases.lease_name(pod), ns)
    return leases.read(lease.metadata.annotations, leases.REPORT).get(uid) or {}


def ready_source(
    c: DevCluster,
    version: str = "1",
    seed: int = 1,
    name: str = "policy",
    layout: list[dict[str, Any]] | None = None,
) -> str:
    """Create the WeightSource over every source pod, load `version` into each; its digest."""
    api = c.api()
    create(api, c.namespace, "weightsources", weightsource(name))
    want = ""
    for pod, a in c.agents.items():
        if a.role == "source":
            want = c.load_weights(pod, version, layout or LAYOUT, seed)
    poll(
        lambda: (
            (get(api, "weightsources", c.namespace, name).get("status") or {}).get("readyReplicas")
            == sum(a.role == "source" for a in c.agents.values())
        ),
        timeout=60,
        what=f"{name}: every replica serving {version}",
    )
    return want


def finished(c: DevCluster, name: str, timeout: float = 120) -> dict[str, Any]:
    api = c.api()
    return poll(
        lambda: (
            (o := get(api, "refitjobs", c.namespace, name)).get("status", {}).get("phase")
            in ("Succeeded", "Failed")
            and o
        ),
        timeout=timeout,
        what=f"{name} finished",
        every=0.3,
    )


def targets(c: DevCluster) -> list[str]:
    return sorted(p for p, a in c.agents.items() if a.role == "target")


def assert_bytes(c: DevCluster, pods: Iterable[str], want: str) -> None:
    """Every pod's slabs hash (through the engine client) to `want`, the source's digest."""
    for pod in pods:
        assert c.weights_digest(pod) == want, f"{pod} holds different bytes than the source"


def delete_jobs_and_check_finalizers(
    c: DevCluster, names: Iterable[str], timeout: float = 60
) -> None:
    """Delete every job; each must disappear (its finalizer released by the operator)."""
    api = c.api()
    co = k8s_client.CustomObjectsApi(api)
    names = list(names)

    def delete(name: str) -> None:
        try:
            co.delete_namespaced_custom_object(GROUP, VERSION, c.namespace, "refitjobs", name)
        except k8s_client.ApiException as exc:
            if exc.status != 404:
                raise

    with ThreadPoolExecutor(8) as pool:  # as `kubectl delete` of many jobs would, at once
        list(pool.map(delete, names))

    def left() -> list[str]:
        items = co.list_namespaced_custom_object(GROUP, VERSION, c.namespace, "refitjobs")["items"]
        wanted = set(names)
        return [
            f"{i['metadata']['name']} finalizers={i['metadata'].get('finalizers')}"
            for i in items
            if i["metadata"]["name"] in wanted
        ]

    deadline = time.monotonic() + timeout
    while remaining := left():
        assert time.monotonic() < deadline, (
            f"jobs not deleted after {timeout:.0f}s: {remaining[:5]}"
        )
        time.sleep(0.3)
