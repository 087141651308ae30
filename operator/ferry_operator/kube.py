"""Thin adapters over the Kubernetes API used by the handlers."""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import cache
from typing import Any

from kubernetes import client, config

from ferry_api import GROUP, VERSION, ssa

OPERATOR_MANAGER = "ferry-operator"


@cache
def api() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api())


def core() -> client.CoreV1Api:
    return client.CoreV1Api(api())


def apply_status(model: Any, namespace: str, name: str, status: dict[str, Any],
                 manager: str = OPERATOR_MANAGER) -> dict:
    """Server-side apply of the fields this manager owns in .status."""
    return ssa.apply_status(api(), model, namespace, name, status, manager)


def get_object(plural: str, namespace: str, name: str) -> dict | None:
    try:
        return custom().get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


AGENT_LEASE_LABEL = "ferry.dev/agent-lease"


def agent_leases(namespace: str, now: datetime) -> tuple[set[str], set[str]]:
    """(pods whose agent Lease is fresh, pods whose agent Lease expired)."""
    leases = client.CoordinationV1Api(api()).list_namespaced_lease(
        namespace, label_selector=AGENT_LEASE_LABEL).items
    live, expired = set(), set()
    for lease in leases:
        spec = lease.spec
        if spec is None or spec.renew_time is None or not spec.holder_identity:
            continue
        if spec.renew_time + timedelta(seconds=spec.lease_duration_seconds or 0) > now:
            live.add(spec.holder_identity)
        else:
            expired.add(spec.holder_identity)
    return live, expired


def live_agents(namespace: str, now: datetime) -> set[str]:
    return agent_leases(namespace, now)[0]


def list_objects(plural: str, namespace: str) -> list[dict]:
    return custom().list_namespaced_custom_object(GROUP, VERSION, namespace, plural)["items"]


def delete_object(plural: str, namespace: str, name: str) -> None:
    try:
        custom().delete_namespaced_custom_object(GROUP, VERSION, namespace, plural, name,
                                                 propagation_policy="Background")
    except client.ApiException as exc:
        if exc.status != 404:
            raise


def list_pods(namespace: str, label_selector: str) -> list[Any]:
    return core().list_namespaced_pod(namespace, label_selector=label_selector).items
