"""Every Kubernetes API permission Ferry needs, with the reason for each.

This table is the source of the chart's RBAC (charts/ferry/templates/rbac-*.yaml
must grant exactly these rules: tests/unit/test_rbac.py) and is checked
against the code: every client call found in operator/ and agent/, and every
resource a kopf handler in main.py watches, must be covered here.

`via` says what needs the permission:
- "code": a client call in operator/ or agent/ (the test finds it);
- "kopf": the framework itself (watch streams, annotation patches, events,
  peering).

Where a permission is granted (`placement`): a Role in the release namespace
(`namespaced`), a Role in every namespace Ferry serves (`served`: the chart's
`namespaced.namespaces` and agent.rbac.bindings namespaces), or the ClusterRole;
in the namespaced install (chart condition "namespaced") everything that is not
about a cluster-scoped object moves from the ClusterRole into the served Roles.
`when` names a chart condition; "!x": only without it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .servingcert import SECRET_NAME as WEBHOOK_SECRET
from .signer import AGENT_CA_SECRET, SIGNER

FERRY = "ferry.dev"
COORD = "coordination.k8s.io"
CERTS = "certificates.k8s.io"
KINDS = ("weightsources", "refitjobs", "artifactcaches")


@dataclass(frozen=True)
class Permission:
    group: str
    resource: str
    verbs: tuple[str, ...]
    reason: str
    via: str = "code"  # or "kopf", or "apiserver" (checked by the apiserver on another call)
    resource_names: tuple[str, ...] = ()
    # a chart condition: "peering", "webhook", "selfsigned", "namespaced" (or "!namespaced"),
    # "cluster" (agent: granted by the ClusterRole -agent-certs bound cluster-wide, for a
    # cluster-scoped resource); empty: always
    when: str = ""
    namespaced: bool = False  # granted by a Role in the release namespace, not the ClusterRole
    served: bool = False  # granted by a Role in each namespace Ferry serves
    cluster_scoped: bool = False  # about a cluster-scoped object: only a ClusterRole can grant it

    def enabled(self, conditions: frozenset[str]) -> bool:
        if self.when.startswith("!"):
            return self.when[1:] not in conditions
        return not self.when or self.when in conditions

    def placement(self, conditions: frozenset[str]) -> str:
        """ "release", "served" or "cluster"."""
        if self.namespaced:
            return "release"
        if self.served or ("namespaced" in conditions and not self.cluster_scoped):
            return "served"
        return "cluster"


OPERATOR: tuple[Permission, ...] = (
    *(
        Permission(
            FERRY,
            k,
            ("list", "watch", "patch"),
            "kopf watches each kind and keeps its progress and diff-base in ferry.dev annotations; "
            "a new RefitJob's finalizer is added on its ADDED event (main.job_added)",
            via="kopf",
        )
        for k in KINDS
    ),
    Permission(
        FERRY, "weightsources", ("get",), "a RefitJob reconcile reads its source (kube.get_object)"
    ),
    Permission(
        FERRY,
        "refitjobs",
        ("get",),
        "a target's final Lease report reconciles its job at once (main._reconcile_job)",
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
        "agent liveness (kube.live_agents), targets' reports waking their jobs "
        "(wakeups.AgentLeaseWatch) and the canary coming back through a watch",
    ),
    Permission(
        COORD,
        "leases",
        ("create", "patch", "delete"),
        "the operator's canary Lease in its own namespace: server-side apply creates and "
        "renews it, cleanup deletes it (health.py)",
        namespaced=True,
    ),
    Permission(
        COORD,
        "leases",
        ("patch",),
        "RefitJob assignments are merge-patched onto agent Leases (kube.annotate_leases), "
        "only in the namespaces Ferry serves",
        served=True,
    ),
    Permission("", "events", ("create",), "kopf.event on condition transitions", via="kopf"),
    Permission(
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        ("list", "watch"),
        "kopf notices CRDs installed after it started (cluster mode; the namespaced "
        "install turns kopf's scanning off)",
        via="kopf",
        when="!namespaced",
        cluster_scoped=True,
    ),
    Permission(
        "kopf.dev",
        "clusterkopfpeerings",
        ("get", "list", "watch", "patch"),
        "leader election between replicas (kopf peering, cluster-wide)",
        via="kopf",
        when="peering",
        cluster_scoped=True,
    ),
    Permission(
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
        ("patch",),
        "the chart renders the webhook configuration; with self-managed certificates the "
        "operator writes only its CA into the caBundle (webhook.patch_ca_bundle)",
        resource_names=(FERRY,),
        when="selfsigned",
        cluster_scoped=True,
    ),
    Permission(
        "",
        "secrets",
        ("create",),
        "the first replica creates the webhook's shared serving certificate when absent "
        "(webhook.SharedSecret; create cannot be limited by name)",
        when="selfsigned",
        namespaced=True,
    ),
    Permission(
        "",
        "secrets",
        ("get", "update"),
        "every replica reads the shared serving certificate and renews it near expiry "
        "(webhook.SharedSecret)",
        resource_names=(WEBHOOK_SECRET,),
        when="selfsigned",
        namespaced=True,
    ),
    # peer18: per-pod agent certificates (signer.py); CSRs and signers are cluster-scoped.
    Permission(
        CERTS,
        "certificatesigningrequests",
        ("list", "watch"),
        "the signer ferry.dev/agent watches CertificateSigningRequests",
        via="kopf",
        cluster_scoped=True,
    ),
    Permission(
        CERTS,
        "certificatesigningrequests/approval",
        ("update",),
        "approves or denies an agent's CSR after checking it names the requesting pod "
        "(signer.handle)",
        cluster_scoped=True,
    ),
    Permission(
        CERTS,
        "certificatesigningrequests/status",
        ("update",),
        "writes the signed certificate into the CSR's status (signer.handle)",
        cluster_scoped=True,
    ),
    Permission(
        CERTS,
        "signers",
        ("approve", "sign"),
        "the apiserver lets only an approver/signer of ferry.dev/agent decide and sign its CSRs",
        via="apiserver",
        resource_names=(SIGNER,),
        cluster_scoped=True,
    ),
    Permission(
        "",
        "pods",
        ("get",),
        "the signer reads the requesting pod (uid, service account, label) (signer.handle)",
    ),
    Permission(
        "",
        "secrets",
        ("get",),
        "the agent CA that signs pod certificates (signer.AgentCA)",
        resource_names=(AGENT_CA_SECRET,),
        namespaced=True,
    ),
    Permission(
        "",
        "secrets",
        ("create",),
        "the first replica that signs creates the agent CA Secret (signer.AgentCA; create "
        "cannot be limited by name)",
        namespaced=True,
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
    # peer18: per-pod certificates and the peer check.
    Permission(
        CERTS,
        "certificatesigningrequests",
        ("create", "get"),
        "the agent asks for its pod's certificate and reads the signed one "
        "(k8s/podcert.py); the operator signs only what names the requesting pod",
        when="cluster",
        cluster_scoped=True,
    ),
    Permission(
        FERRY,
        "refitjobs",
        ("list",),
        "whom the agent serves and dials: targets of RefitJobs on a WeightSource it "
        "shares (k8s/peerpolicy.py)",
    ),
)


def rules(
    table: tuple[Permission, ...], enabled: frozenset[str] = frozenset(), where: str | None = None
) -> set[tuple]:
    """(group, resource, verb, resourceName) tuples the table grants for these chart
    conditions; `where` ("release", "served", "cluster"): only what is granted there."""
    out = set()
    for p in table:
        if not p.enabled(enabled):
            continue
        if where is not None and p.placement(enabled) != where:
            continue
        for verb in p.verbs:
            for name in p.resource_names or ("",):
                out.add((p.group, p.resource, verb, name))
    return out


def role(
    kind: str,
    name: str,
    table: tuple[Permission, ...],
    namespace: str | None = None,
    enabled: frozenset[str] = frozenset(),
) -> dict:
    """A Role or ClusterRole granting exactly rules(table, enabled): what the dev cluster
    and tests bind (the chart renders the same table; tests/integration/test_chart.py)."""
    grouped: dict[tuple, set[str]] = {}
    for group, resource, verb, name_ in sorted(rules(table, enabled)):
        grouped.setdefault((group, resource, name_), set()).add(verb)
    out: list[dict] = []
    for (group, resource, name_), verbs in sorted(grouped.items()):
        rule: dict = {"apiGroups": [group], "resources": [resource], "verbs": sorted(verbs)}
        if name_:
            rule["resourceNames"] = [name_]
        out.append(rule)
    meta: dict = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": meta,
        "rules": out,
    }


# What `kubectl auth can-i --list -n <ns>` prints for a ServiceAccount, per kind of
# namespace: the release namespace, a served namespace, any other (docs/security.md).
PLACES = {"release": ("cluster", "release"), "served": ("cluster", "served"), "other": ("cluster",)}


def can_i(
    table: tuple[Permission, ...], enabled: frozenset[str], where: tuple[str, ...]
) -> set[tuple[str, str, str]]:
    """(resource as kubectl prints it, resource name or "", verbs joined by " ", sorted) for
    what `table` grants in those places; a resource's verbs are merged per name."""
    merged: dict[tuple[str, str], set[str]] = {}
    for place in where:
        for group, resource, verb, name in rules(table, enabled, where=place):
            base, _, sub = resource.partition("/")
            shown = (f"{base}.{group}" if group else base) + (f"/{sub}" if sub else "")
            merged.setdefault((shown, name), set()).add(verb)
    return {(r, n, " ".join(sorted(v))) for (r, n), v in merged.items()}


def can_i_markdown(enabled: frozenset[str] = frozenset({"webhook", "selfsigned"})) -> str:
    """The tables of docs/security.md (What each ServiceAccount may do)."""
    out = []
    # An agent account listed in agent.rbac.bindings gets the ClusterRole -agent too (its
    # namespaced rules, bound per namespace) and -agent-certs (its "cluster" rule).
    for who, table, places, conditions in (
        ("operator", OPERATOR, PLACES, enabled),
        ("agent", AGENT, {"served": ("cluster",)}, enabled | {"cluster"}),
    ):
        for place, where in places.items():
            ns = {
                "release": "its release namespace",
                "served": "a served namespace",
                "other": "any other namespace",
            }[place]
            out.append(f"**{who}**, in {ns}:\n")
            out.append("| resource | resource name | verbs |\n| --- | --- | --- |")
            for r, n, v in sorted(can_i(table, conditions, where)):
                out.append(f"| `{r}` | {f'`{n}`' if n else ''} | {v} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"
