"""Small helpers shared by tests that talk to the real apiserver."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client as k8s_client

GROUP, VERSION = "ferry.dev", "v1alpha1"


def wait_for(
    fn: Callable[[], Any], timeout: float = 30.0, what: str = "condition", every: float = 0.3
) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")


def get(api: k8s_client.ApiClient, plural: str, ns: str, name: str) -> dict:
    return k8s_client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, ns, plural, name
    )


def cond(obj: dict, type_: str) -> dict | None:
    return next(
        (c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), None
    )


def create(api: k8s_client.ApiClient, ns: str, plural: str, body: dict) -> dict:
    return k8s_client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, ns, plural, body
    )


def make_pod(api: k8s_client.ApiClient, ns: str, name: str, labels: dict[str, str]) -> None:
    k8s_client.CoreV1Api(api).create_namespaced_pod(
        ns,
        {
            "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "engine", "image": "example.invalid/engine:1"}]},
        },
    )


def pod_token(
    api: k8s_client.ApiClient,
    namespace: str,
    pod: str,
    service_account: str = "default",
    seconds: int = 3600,
) -> str:
    """A service-account token bound to `pod` (TokenRequest with boundObjectRef): what the
    kubelet projects into that pod's containers. Requests made with it carry the
    `authentication.kubernetes.io/pod-name` extra claim, and it dies with the pod."""
    core = k8s_client.CoreV1Api(api)
    uid = core.read_namespaced_pod(pod, namespace).metadata.uid
    req = core.create_namespaced_service_account_token(
        service_account,
        namespace,
        {
            "spec": {
                "audiences": [],
                "expirationSeconds": seconds,
                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod, "uid": uid},
            }
        },
    )
    return req.status.token


def token_client(api: k8s_client.ApiClient, token: str) -> k8s_client.ApiClient:
    """A client of the same apiserver authenticating with `token` alone (no client cert)."""
    cfg = copy.deepcopy(api.configuration)
    cfg.cert_file = cfg.key_file = None
    cfg.api_key = {"BearerToken": f"Bearer {token}"}
    cfg.api_key_prefix = {}
    cfg.refresh_api_key_hook = None
    return k8s_client.ApiClient(cfg)


def grant(
    api: k8s_client.ApiClient, namespace: str, service_account: str, name: str, table: tuple
) -> None:
    """A Role of exactly `table` (ferry_operator.rbac) in `namespace`, bound to the ServiceAccount."""
    from ferry_operator import rbac

    rbac_api = k8s_client.RbacAuthorizationV1Api(api)
    rbac_api.create_namespaced_role(namespace, rbac.role("Role", name, table, namespace))
    rbac_api.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": name, "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [
                {"kind": "ServiceAccount", "name": service_account, "namespace": namespace}
            ],
        },
    )


def job_finished(cluster: Any, name: str, timeout: float = 90) -> dict[str, Any]:
    """The RefitJob once its phase is Succeeded or Failed (`cluster`: a DevCluster)."""
    return wait_for(
        lambda: (
            (o := get(cluster.api(), "refitjobs", cluster.namespace, name))
            .get("status", {})
            .get("phase")
            in ("Succeeded", "Failed")
            and o
        ),
        timeout=timeout,
        what=f"{name} finished",
    )


def source_serving(cluster: Any, ws: str, version: str) -> dict[str, Any]:
    """The WeightSource once its status says it serves `version`."""
    return wait_for(
        lambda: (
            (o := get(cluster.api(), "weightsources", cluster.namespace, ws))
            .get("status", {})
            .get("version")
            == version
            and o
        ),
        timeout=30,
        what=f"{ws} serving {version}",
    )
