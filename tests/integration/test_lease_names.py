"""Agent Lease names on the wire (ferry_api.leases), against the real apiserver."""

from __future__ import annotations

import pytest
from kubernetes import client as k8s_client

from ferry_api import leases


def _lease(api: k8s_client.ApiClient, ns: str, name: str) -> None:
    k8s_client.CoordinationV1Api(api).create_namespaced_lease(
        ns,
        {
            "metadata": {"name": name, "labels": {leases.LEASE_LABEL: "true"}},
            "spec": {"holderIdentity": name},
        },
    )


@pytest.mark.parametrize(
    "pod", ["x/../victim", "x%2F..%2Fvictim", "Upper", "a?b=c", "a..b", "trailing-", ""]
)
def test_leases_patch_quotes_and_refuses_invalid_names(
    api_client: k8s_client.ApiClient, namespace: str, pod: str
) -> None:
    """Issue 19 (small ones, b): a pod name taken from a Lease anyone in the namespace can
    write (holderIdentity) must not steer the operator's PATCH to another object: a name
    that is not a valid Lease name is refused before any request, naming it, and the
    Lease a path-traversing name points at is left alone."""
    _lease(api_client, namespace, "victim")
    with pytest.raises(ValueError, match="not a valid Lease name"):
        leases.patch(api_client, namespace, pod, {"assign.ferry.dev/x": "{}"}, "test")
    victim = k8s_client.CoordinationV1Api(api_client).read_namespaced_lease("victim", namespace)
    assert not (victim.metadata.annotations or {}), "the PATCH reached another Lease"


def test_leases_patch_still_writes_a_valid_name(
    api_client: k8s_client.ApiClient, namespace: str
) -> None:
    _lease(api_client, namespace, leases.lease_name("engine-0.a"))
    leases.patch(api_client, namespace, "engine-0.a", {"report.ferry.dev/u": "{}"}, "test")
    got = k8s_client.CoordinationV1Api(api_client).read_namespaced_lease(
        leases.lease_name("engine-0.a"), namespace
    )
    assert got.metadata.annotations == {"report.ferry.dev/u": "{}"}
