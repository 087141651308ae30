"""Server-side apply of a fragment of a Ferry object's status, the way the operator
and each agent (for its own WeightSource / ArtifactCache entry, under its own field
manager) update it. RefitJob entries are the exception: agents JSON-patch their
part under one shared manager (ferry_agent.k8s.jobs)."""

from __future__ import annotations

from typing import Any, cast

from . import API_VERSION, GROUP, VERSION

APPLY = "application/apply-patch+yaml"


OPERATOR_MANAGER = "ferry-operator"
# Every agent's merge patches of its own Lease's RefitJob reports (ferry_api.leases).
AGENT_MANAGER = "ferry-agent"


def agent_manager(pod: str) -> str:
    """The field manager of a pod's agent: it owns only that pod's entries."""
    return f"ferry-agent/{pod}"[:128]


def apply_status(
    api: Any, model: Any, namespace: str, name: str, status: dict[str, Any], manager: str
) -> dict:
    """Apply `status` (the fields `manager` owns) to `model`'s object `namespace/name`."""
    from kubernetes import client

    body = {
        "apiVersion": API_VERSION,
        "kind": model.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "status": status,
    }
    return cast(
        dict,
        client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            model.PLURAL,
            name,
            body,
            field_manager=manager,
            force=True,
            _content_type=APPLY,
        ),
    )
