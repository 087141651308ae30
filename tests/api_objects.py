"""Test fixtures as real objects: validated by the API models and shaped as the
apiserver serves them (apiVersion, kind, metadata, spec with its defaults, status)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ferry_api import API_VERSION, times

T0 = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)


def served(
    kind: Any,
    name: str,
    spec: dict[str, Any],
    status: dict[str, Any] | None = None,
    namespace: str = "ml",
    created: datetime = T0,
) -> dict[str, Any]:
    """`kind` (WeightSource, RefitJob, ArtifactCache) named `name`; raises ValidationError
    when spec or status is not one the apiserver would store."""
    body = kind.model_validate({"spec": spec, "status": status or None}).wire()
    meta = {"name": name, "namespace": namespace, "creationTimestamp": times.stamp(created)}
    return {"apiVersion": API_VERSION, "kind": kind.KIND, "metadata": meta, **body}


def cond(
    type_: str, status: str, reason: str, message: str = "", at: datetime = T0
) -> dict[str, Any]:
    """A condition in wire form."""
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": times.stamp(at),
    }


SELECTOR = {"matchLabels": {"app": "inference"}}
