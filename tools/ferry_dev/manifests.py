"""WeightSource and RefitJob manifests as the tests, the demos and the benchmarks apply
them: host memory and a 6 s Lease by default, every other field as the caller names it
(validated by the apiserver and the CRDs' schema, not here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

GROUP, VERSION = "ferry.dev", "v1alpha1"


def weightsource(
    name: str,
    selector: Mapping[str, str],
    model: str = "tiny",
    *,
    memory: str = "host",
    lease_s: int = 6,
    layout: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"name": model},
        "selector": {"matchLabels": dict(selector)},
        "memory": memory,
        "heartbeat": {"leaseDurationSeconds": lease_s, "renewIntervalSeconds": 1},
    }
    if layout:
        spec["layout"] = dict(layout)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "WeightSource",
        "metadata": {"name": name},
        "spec": spec,
    }


def refitjob(name: str, source: str, targets: Mapping[str, str], **spec: Any) -> dict[str, Any]:
    """`spec`: the RefitJob's other fields in their wire names (timeoutSeconds=120, ...)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RefitJob",
        "metadata": {"name": name},
        "spec": {"sourceRef": {"name": source}, "targets": {"matchLabels": dict(targets)}, **spec},
    }
