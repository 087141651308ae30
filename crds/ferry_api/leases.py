"""An agent's Lease: its liveness, and the RefitJob channel between it and the operator.

Each agent renews `ferry-agent-<pod>` (labelled LEASE_LABEL). The same object
carries, as annotations keyed by the RefitJob's uid:

- `assign.ferry.dev/<uid>` (written by the operator): the attempt this pod must
  run now — job name, attempt number, upstream pods, version, start time and the
  job's spec. Present while an attempt is in hand; removed once the operator has
  folded its outcome, or when the job ends or is deleted (the agent cancels).
- `report.ferry.dev/<uid>` (written by the agent): its progress on that job —
  attempt, phase, bytes, seconds, reason, message, endpoint. The agent drops it
  once no assignment for the job is left.

Why not the RefitJob itself: with every agent writing its entry into one object,
each write cost the apiserver work proportional to the object (1,000 entries:
~300 kB decoded, validated, diffed for managedFields and re-encoded per write), so
a job's reports cost O(N²) and a 1,000-target job did not finish in 10 minutes
(docs/benchmarks.md). A Lease write is O(1); the operator folds every report
into the job in one write per reconcile, and an agent watches only its own Lease
instead of every RefitJob.
"""

from __future__ import annotations

import json
from typing import Any

LEASE_LABEL = "ferry.dev/agent-lease"
ASSIGN = "assign.ferry.dev/"
REPORT = "report.ferry.dev/"
MERGE_PATCH = "application/merge-patch+json"


def lease_name(pod: str) -> str:
    return f"ferry-agent-{pod}"[:253]


def encode(value: dict[str, Any]) -> str:
    """Canonical JSON, so that equal values compare equal as annotation strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def read(annotations: dict[str, str] | None, prefix: str) -> dict[str, dict[str, Any]]:
    """uid -> decoded value of every `prefix<uid>` annotation; malformed ones are skipped
    (an annotation anyone could edit must not crash the reader)."""
    out: dict[str, dict[str, Any]] = {}
    for key, raw in (annotations or {}).items():
        if not key.startswith(prefix):
            continue
        try:
            value = json.loads(raw)
        except ValueError:
            continue
        if isinstance(value, dict):
            out[key[len(prefix):]] = value
    return out


def patch(api: Any, namespace: str, pod: str, annotations: dict[str, str | None], manager: str) -> None:
    """Set (or, with None, remove) annotations on `pod`'s agent Lease with a merge patch:
    only these keys change, so the agent's renewals and the operator's assignments
    never overwrite each other. Raises ApiException 404 if the Lease does not exist."""
    from kubernetes import client

    client.CoordinationV1Api(api).patch_namespaced_lease(
        lease_name(pod), namespace, {"metadata": {"annotations": annotations}},
        field_manager=manager, _content_type=MERGE_PATCH, _preload_content=False)
