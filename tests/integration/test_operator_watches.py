"""What the operator watches, measured at the real apiserver (its watch event counter)."""

from __future__ import annotations

import re
import time

from kubernetes import client as k8s_client

from ferry_dev.operatorproc import OperatorProcess

LEASE_EVENTS = re.compile(
    r'^apiserver_watch_events_total\{[^}]*group="coordination.k8s.io"[^}]*resource="leases"[^}]*\}\s+(\S+)$',
    re.M,
)


def lease_watch_events(api: k8s_client.ApiClient) -> float:
    """Lease watch events the apiserver has sent to every watcher so far."""
    cfg = api.configuration
    token = cfg.get_api_key_with_prefix("authorization")
    resp = api.rest_client.pool_manager.request(
        "GET", f"{cfg.host}/metrics", headers={"Authorization": token} if token else {}
    )
    assert resp.status == 200, resp.data[:200]
    return sum(float(v) for v in LEASE_EVENTS.findall(resp.data.decode()))


def test_operator_does_not_watch_every_lease(
    operator: OperatorProcess, api_client: k8s_client.ApiClient, namespace: str
) -> None:
    """Issue 19 (small ones, c): node heartbeats and other components' Leases (here 40
    unlabelled ones) must not stream to the operator: its Lease watch is filtered by
    label at the apiserver, so it gets only its canary's renewals."""
    coord = k8s_client.CoordinationV1Api(api_client)
    time.sleep(1)
    before = lease_watch_events(api_client)
    for i in range(40):
        coord.create_namespaced_lease(
            namespace, {"metadata": {"name": f"node-{i}"}, "spec": {"holderIdentity": f"node-{i}"}}
        )
    time.sleep(3)
    sent = lease_watch_events(api_client) - before
    assert sent < 20, f"the apiserver sent {sent:.0f} Lease watch events for 40 foreign Leases"
    assert operator.healthz() == 200, "the canary must still be seen through the filtered watch"
