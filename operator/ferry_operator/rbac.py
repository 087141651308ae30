"""Every Kubernetes API permission Ferry needs, with the reason for each.

This table is the source of the chart's RBAC (charts/ferry/templates/rbac-*.yaml
must grant exactly these rules: tests/unit/test_rbac.py) and is checked
against the code: every client call found in operator/ and agent/, and every
resource a kopf handler in main.py watches, must be covered here.

`via` says what needs the permission:
- "code": a client call in operator/ or agent/ (the test finds it);
- "kopf": the framework itself (watch streams, annotation patches, events,
  peering, the managed webhook configuration).
"""

from __future__ import annotations

from dataclasses import dataclass

FERRY = "ferry.dev"
COORD = "coordination.k8s.io"
KINDS = ("weightsources", "refitjobs", "artifactcaches")


@dataclass(frozen=True)
class Permission:
    group: str
    resource: str
    verbs: tuple[str, ...]
    reason: str
    via: str = "code"  # or "kopf"
    resource_names: tuple[str, ...] = ()
    when: str = ""  # a chart condition: "peering" or "webhook"; empty: always


OPERATOR: tuple[Permission, ...] = (
    *(
        Permission(
            FERRY,
            k,
            ("list", "watch", "patch"),
            "kopf watches each kind and keeps its progress and diff-base in ferry.dev annotations",
            via="kopf",
        )
        for k in KINDS
    ),
    Permission(
        FERRY, "weightsources", ("get",), "a RefitJob reconcile reads its source (kube.get_object)"
    ),
    *(
        Permission(
            FERRY, f"{k}/status", ("patch",), "server-side apply of .status (kube.apply_status)"
        )
        for k in KINDS
    ),
    Permission(
        FERRY,
        "refitjobs",
        ("delete",),
        "finished RefitJobs past ttlSecondsAfterFinished are deleted (kube.delete_object)",
    ),
    Permission("", "pods", ("list",), "selectors resolve to pods (kube.list_pods)"),
    Permission(
        COORD,
        "leases",
        ("list", "watch"),
        "agent liveness (kube.live_agents) and the canary coming back through a watch",
    ),
    Permission(
        COORD,
        "leases",
        ("create", "patch", "delete"),
        "the operator's canary Lease: server-side apply creates and renews it, "
        "cleanup deletes it (health.py); RefitJob assignments are merge-patched onto "
        "agent Leases (kube.annotate_leases)",
    ),
    Permission("", "events", ("create",), "kopf.event on condition transitions", via="kopf"),
    Permission(
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        ("list", "watch"),
        "kopf notices CRDs installed after it started",
        via="kopf",
    ),
    Permission(
        "kopf.dev",
        "clusterkopfpeerings",
        ("get", "list", "watch", "patch"),
        "leader election between replicas (kopf peering, cluster-wide)",
        via="kopf",
        when="peering",
    ),
    Permission(
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
        ("create",),
        "kopf creates the managed webhook configuration when absent",
        via="kopf",
        when="webhook",
    ),
    Permission(
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
        ("patch",),
        "kopf writes its webhooks and caBundle into it",
        via="kopf",
        resource_names=(FERRY,),
        when="webhook",
    ),
)

AGENT: tuple[Permission, ...] = (
    Permission(
        COORD,
        "leases",
        ("create", "patch", "delete"),
        "each agent's Lease (labelled ferry.dev/agent-lease): server-side apply creates and "
        "renews it, its RefitJob reports are merge-patched onto it, shutdown deletes it",
    ),
    Permission(
        COORD,
        "leases",
        ("get", "list", "watch"),
        "an agent watches its own Lease for RefitJob assignments and reads an upstream "
        "target's report there (k8s/jobs.py)",
    ),
    Permission(
        FERRY,
        "weightsources/status",
        ("patch",),
        "server-side apply of the agent's own member entry, one field manager per pod",
    ),
    Permission(
        FERRY,
        "artifactcaches/status",
        ("patch",),
        "server-side apply of the agent's own cache entry: packed or installed (k8s/artifacts.py)",
    ),
    Permission(FERRY, "weightsources", ("list",), "which WeightSources select this pod"),
    Permission(
        FERRY,
        "weightsources",
        ("get",),
        "a target resolves its upstream pods to endpoints (k8s/jobs.py)",
    ),
    Permission(
        FERRY,
        "artifactcaches",
        ("list",),
        "which ArtifactCaches this pod packs for or installs (k8s/artifacts.py)",
    ),
    Permission("", "pods", ("get",), "the agent reads its own pod's labels"),
)


def rules(table: tuple[Permission, ...], enabled: frozenset[str] = frozenset()) -> set[tuple]:
    """(group, resource, verb, resourceName) tuples the table grants for these chart conditions."""
    out = set()
    for p in table:
        if p.when and p.when not in enabled:
            continue
        for verb in p.verbs:
            for name in p.resource_names or ("",):
                out.add((p.group, p.resource, verb, name))
    return out
