"""An agent's Lease: its liveness, and the RefitJob channel between it and the operator.

Each agent renews `ferry-agent-<pod>` (labelled LEASE_LABEL). The same object
carries, as annotations keyed by the RefitJob's uid:

- `assign.ferry.dev/<uid>` (written by the operator): the attempt this pod must
  run now — job name, attempt number, upstream pods, version, start time and the
  job's spec. Present while an attempt is in hand; removed once the operator has
  folded its outcome, or when the job ends or is deleted (the agent cancels).
- `report.ferry.dev/<uid>` (written by the agent): its progress on that job —
  attempt, phase, bytes, seconds, reason, message, endpoint. Once no assignment
  for the job is left the agent keeps it among its few newest (a downstream
  target reads its upstream's endpoint there) and then drops it.

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
from urllib.parse import quote

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


def count(value: Any) -> int | None:
    """A non-negative integer from an annotation anyone could edit (JSON `true` is not 1),
    else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def patch(api: Any, namespace: str, pod: str, annotations: dict[str, str | None], manager: str,
          timeout_s: float = 30.0) -> None:
    """Set (or, with None, remove) annotations on `pod`'s agent Lease with a merge patch:
    only these keys change, so the agent's renewals and the operator's assignments
    never overwrite each other. Raises ApiException (404: the Lease does not exist).

    A bare PATCH on the API client's connection pool: the operator assigns 1,000 targets
    with 1,000 of these, and the generated client spends ~3 ms of Python per call (1,000
    Lease patches from 16 threads: 3.2 s through it, 1.15 s bare; docs/benchmarks.md)."""
    from kubernetes import client

    cfg = api.configuration
    if cfg.refresh_api_key_hook is not None:
        cfg.refresh_api_key_hook(cfg)  # in-cluster: the projected token rotates
    headers = {"Content-Type": MERGE_PATCH, "Accept": "application/json"}
    token = cfg.get_api_key_with_prefix("authorization")
    if token:
        headers["Authorization"] = token
    url = (f"{cfg.host}/apis/coordination.k8s.io/v1/namespaces/{quote(namespace)}/leases/"
           f"{quote(lease_name(pod))}?fieldManager={quote(manager)}")
    body = json.dumps({"metadata": {"annotations": annotations}}).encode()
    resp = api.rest_client.pool_manager.request("PATCH", url, body=body, headers=headers,
                                                timeout=timeout_s)
    if not 200 <= resp.status < 300:
        raise client.ApiException(status=resp.status, reason=resp.reason)
