"""Thin adapters over the Kubernetes API used by the handlers."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from typing import Any, cast

from kubernetes import client, config

from ferry_api import GROUP, VERSION, ssa, times
from ferry_api import leases as leases_

log = logging.getLogger(__name__)
OPERATOR_MANAGER = ssa.OPERATOR_MANAGER
LEASE_WRITERS = 16


@cache
def api() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    cfg = client.Configuration.get_default_copy()
    cfg.connection_pool_maxsize = LEASE_WRITERS  # annotate_leases writes from a pool
    return client.ApiClient(cfg)


def custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api())


def core() -> client.CoreV1Api:
    return client.CoreV1Api(api())


def apply_status(
    model: Any, namespace: str, name: str, status: dict[str, Any], manager: str = OPERATOR_MANAGER
) -> dict:
    """Server-side apply of the fields this manager owns in .status."""
    return ssa.apply_status(api(), model, namespace, name, status, manager)


def get_object(plural: str, namespace: str, name: str) -> dict | None:
    try:
        return custom().get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


class Conflict(Exception):
    """The object changed (409) or is gone (404) since it was read."""


def add_finalizer(
    plural: str,
    namespace: str,
    name: str,
    finalizer: str,
    finalizers: list[str],
    resource_version: str,
) -> dict:
    """`finalizer` appended to an object's finalizers as read at `resource_version`
    (a merge patch that fails with Conflict if the object changed since): the object."""
    body = {
        "metadata": {"finalizers": [*finalizers, finalizer], "resourceVersion": resource_version}
    }
    try:
        return cast(
            dict,
            custom().patch_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, body, _content_type=leases_.MERGE_PATCH
            ),
        )
    except client.ApiException as exc:
        if exc.status in (404, 409):
            raise Conflict(f"{plural} {namespace}/{name}: {exc.reason}") from exc
        raise


@dataclass(frozen=True)
class AgentLeases:
    """Every agent Lease in a namespace, read once per reconcile (ferry_api.leases)."""

    live: set[str]  # pods whose agent Lease is fresh
    expired: set[str]  # pods whose agent Lease expired
    annotations: dict[str, dict[str, str]]  # pod -> its Lease's annotations (fresh or not)
    # pod (expired) -> when an attempt it lost may be re-assigned: its expiry plus a
    # grace of one lease duration (longer than a renewal interval, WeightSource CEL rule).
    retry_at: dict[str, datetime] = field(default_factory=dict)


def _items(response: Any) -> list[dict[str, Any]]:
    """A list response as plain JSON. The typed client builds a model object per field:
    for 1,000 pods that took ~1 s of operator CPU per reconcile (measured with
    `ferry bench control-plane`), json.loads takes a few tens of ms."""
    return json.loads(response.data)["items"]


def agent_leases(namespace: str, now: datetime) -> AgentLeases:
    return agent_leases_of(
        _items(
            client.CoordinationV1Api(api()).list_namespaced_lease(
                namespace, label_selector=leases_.LEASE_LABEL, _preload_content=False
            )
        ),
        now,
    )


def agent_leases_of(items: list[dict[str, Any]], now: datetime) -> AgentLeases:
    """The agent Leases that are what they claim (pure): a Lease counts for pod P only
    when it is named `ferry-agent-P` and held by P. A Lease named for another pod, or
    one whose holder was rewritten, fakes neither liveness nor reports."""
    out = AgentLeases(set(), set(), {})
    for lease in items:
        spec, name = lease.get("spec") or {}, (lease.get("metadata") or {}).get("name")
        pod, renewed = spec.get("holderIdentity"), times.parse(spec.get("renewTime"))
        if (
            not isinstance(pod, str)
            or not pod
            or renewed is None
            or leases_.lease_name(pod) != name
        ):
            continue
        out.annotations[pod] = lease["metadata"].get("annotations") or {}
        duration = timedelta(seconds=leases_.count(spec.get("leaseDurationSeconds")) or 0)
        if renewed + duration > now:
            out.live.add(pod)
        else:
            out.expired.add(pod)
            out.retry_at[pod] = renewed + 2 * duration
    return out


def live_agents(namespace: str, now: datetime) -> set[str]:
    return agent_leases(namespace, now).live


def annotate_leases(namespace: str, changes: dict[str, dict[str, str | None]]) -> int:
    """Merge-patch annotations onto agent Leases (pod -> {key: value or None}), LEASE_WRITERS
    at a time: assigning 1,000 targets is 1,000 small writes. A Lease that is gone (its
    agent stopped) is skipped, and so is a pod whose name cannot be a Lease's (a
    holderIdentity anyone in the namespace could write). Returns writes made."""

    def one(item: tuple[str, dict[str, str | None]]) -> int:
        try:
            leases_.patch(api(), namespace, *item, OPERATOR_MANAGER)
            return 1
        except ValueError as exc:
            log.warning("not assigning in %s: %s", namespace, exc)
            return 0
        except client.ApiException as exc:
            if exc.status == 404:
                return 0
            raise

    if len(changes) <= 1:
        return sum(map(one, changes.items()))
    with ThreadPoolExecutor(
        min(LEASE_WRITERS, len(changes)), thread_name_prefix="ferry-lease"
    ) as pool:
        return sum(pool.map(one, changes.items()))


def list_objects(plural: str, namespace: str) -> list[dict]:
    return custom().list_namespaced_custom_object(GROUP, VERSION, namespace, plural)["items"]


def delete_object(plural: str, namespace: str, name: str) -> None:
    try:
        custom().delete_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, name, propagation_policy="Background"
        )
    except client.ApiException as exc:
        if exc.status != 404:
            raise


def list_pods(namespace: str, label_selector: str) -> list[dict[str, Any]]:
    """Pods matching the selector, as plain JSON."""
    return _items(
        core().list_namespaced_pod(namespace, label_selector=label_selector, _preload_content=False)
    )
