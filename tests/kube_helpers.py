"""Small helpers shared by tests that talk to the real apiserver."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kubernetes import client as k8s_client

GROUP, VERSION = "ferry.dev", "v1alpha1"


def wait_for(fn: Callable[[], Any], timeout: float = 30.0, what: str = "condition",
             every: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")


def get(api: k8s_client.ApiClient, plural: str, ns: str, name: str) -> dict:
    return k8s_client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, ns, plural, name)


def cond(obj: dict, type_: str) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), None)


def create(api: k8s_client.ApiClient, ns: str, plural: str, body: dict) -> dict:
    return k8s_client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, ns, plural, body)


def make_pod(api: k8s_client.ApiClient, ns: str, name: str, labels: dict[str, str]) -> None:
    k8s_client.CoreV1Api(api).create_namespaced_pod(ns, {
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "engine", "image": "example.invalid/engine:1"}]},
    })
