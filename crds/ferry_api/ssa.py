"""Server-side apply of a fragment of a Ferry object's status, the way every writer
(the operator and each agent, each under its own field manager) updates it."""

from __future__ import annotations

import json
from typing import Any, cast

from . import API_VERSION, GROUP, VERSION

APPLY = "application/apply-patch+yaml"


OPERATOR_MANAGER = "ferry-operator"


def agent_manager(pod: str) -> str:
    """The field manager of a pod's agent: it owns only that pod's entries."""
    return f"ferry-agent/{pod}"[:128]


def apply_status(api: Any, model: Any, namespace: str, name: str, status: dict[str, Any],
                 manager: str) -> dict:
    """Apply `status` (the fields `manager` owns) to `model`'s object `namespace/name`."""
    from kubernetes import client

    body = {"apiVersion": API_VERSION, "kind": model.KIND,
            "metadata": {"name": name, "namespace": namespace}, "status": status}
    return cast(dict, client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, model.PLURAL, name, body,
        field_manager=manager, force=True, _content_type=APPLY))


def manages(obj: dict[str, Any], manager: str, subresource: str = "status") -> bool:
    """Whether `manager` still has a managedFields entry for `subresource` of `obj`."""
    return any(m.get("manager") == manager and m.get("subresource", "") == subresource
               for m in obj.get("metadata", {}).get("managedFields") or [])


def owned_entry_fields(obj: dict[str, Any], manager: str, list_field: str, key: dict[str, str]) -> set[str]:
    """Fields `manager` owns (by apply) in the entry of the list-map `status.<list_field>`
    whose keys are `key`, e.g. owned_entry_fields(job, OPERATOR_MANAGER, "targets", {"pod": "p"})."""
    path_key = "k:" + json.dumps(key, separators=(",", ":"))
    out: set[str] = set()
    for m in obj.get("metadata", {}).get("managedFields") or []:
        if m.get("manager") != manager or m.get("subresource", "") != "status":
            continue
        entry = ((m.get("fieldsV1") or {}).get("f:status") or {}).get(f"f:{list_field}", {}).get(path_key)
        out |= {f[2:] for f in entry or {} if f.startswith("f:")}
    return out


def release_status(api: Any, model: Any, namespace: str, name: str, manager: str) -> dict:
    """Apply an empty configuration: `manager` gives up every status field it owned.
    Fields another manager also owns stay (with that manager); the rest are removed,
    and `manager`'s managedFields entry disappears."""
    from kubernetes import client

    body = {"apiVersion": API_VERSION, "kind": model.KIND,
            "metadata": {"name": name, "namespace": namespace}}
    return cast(dict, client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, model.PLURAL, name, body,
        field_manager=manager, force=True, _content_type=APPLY))
