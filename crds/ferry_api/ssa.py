"""Server-side apply of a fragment of a Ferry object's status, the way every writer
(the operator and each agent, each under its own field manager) updates it."""

from __future__ import annotations

from typing import Any

from . import API_VERSION, GROUP, VERSION

APPLY = "application/apply-patch+yaml"


def agent_manager(pod: str) -> str:
    """The field manager of a pod's agent: it owns only that pod's entries."""
    return f"ferry-agent/{pod}"[:128]


def apply_status(api: Any, model: Any, namespace: str, name: str, status: dict[str, Any],
                 manager: str) -> dict:
    """Apply `status` (the fields `manager` owns) to `model`'s object `namespace/name`."""
    from kubernetes import client

    body = {"apiVersion": API_VERSION, "kind": model.KIND,
            "metadata": {"name": name, "namespace": namespace}, "status": status}
    return client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, model.PLURAL, name, body,
        field_manager=manager, force=True, _content_type=APPLY)
