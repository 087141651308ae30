"""Attacks with the credentials a compromised pod really has: a service-account token
bound to pod A (TokenRequest, what the kubelet mounts), the agent's RBAC bound to its
ServiceAccount. Each attack on pod B's Lease or entries, and on the operator's keys of
A's own Lease, is refused by the apiserver (ferry_operator.admission) with nothing
changed; what A's real agent code writes for itself still goes through.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client as k8s_client

from ferry_agent.k8s.jobs import JobRunner
from ferry_agent.k8s.reporter import Identity, Reporter
from ferry_api import leases, ssa, times
from ferry_api.artifactcache import ArtifactCache
from ferry_api.leases import Report
from ferry_api.weightsource import WeightSource
from ferry_operator import rbac
from tests.kube_helpers import GROUP, VERSION, create, get, grant, make_pod, pod_token, token_client

WS = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "WeightSource",
    "metadata": {"name": "src"},
    "spec": {"model": {"name": "llama"}, "selector": {"matchLabels": {"app": "llm"}}},
}
AC = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "ArtifactCache",
    "metadata": {"name": "cc"},
    "spec": {
        "identity": {"triton": "3.7.1", "cuda": "13.0", "gpuArch": "sm_90"},
        "kinds": ["triton"],
        "sources": {"matchLabels": {"app": "llm"}},
        "targets": {"matchLabels": {"app": "llm"}},
        "trust": {"allowUnsigned": True},
    },
}
READY = {"state": "Ready", "version": "9", "fingerprint": "fp", "tensors": 2, "bytes": 4096}
UID = "0b9d4c1e-0000-4000-8000-000000000001"


class Pods:
    """Pods a and b, each with its agent's Lease and WeightSource entry written by its
    own token; `a` is pod a's API client (its token only)."""

    def __init__(self, admin: k8s_client.ApiClient, ns: str) -> None:
        self.admin, self.ns = admin, ns
        grant(admin, ns, "default", "ferry-agent", rbac.AGENT)
        create(admin, ns, "weightsources", WS)
        create(admin, ns, "artifactcaches", AC)
        self.clients: dict[str, k8s_client.ApiClient] = {}
        self.reporters: list[Reporter] = []
        for pod in ("a", "b"):
            make_pod(admin, ns, pod, {"app": "llm"})
            self.clients[pod] = token_client(admin, pod_token(admin, ns, pod))
            self.reporters.append(
                Reporter(
                    Identity(pod, ns, None, f"10.0.0.{len(self.clients)}:7470"),
                    lambda: READY,
                    self.clients[pod],
                    renew_seconds=3600,
                ).start()
            )
        self.a = self.clients["a"]
        for pod in ("a", "b"):
            ssa.apply_status(
                self.clients[pod],
                ArtifactCache,
                ns,
                "cc",
                {
                    "members": [
                        {
                            "pod": pod,
                            "role": "source",
                            "state": "Packed",
                            "endpoint": "10.0.0.9:7470",
                        }
                    ]
                },
                ssa.agent_manager(pod),
            )

    def lease(self, pod: str) -> dict[str, Any]:
        return (
            k8s_client.CoordinationV1Api(self.admin)
            .read_namespaced_lease(leases.lease_name(pod), self.ns)
            .to_dict()
        )

    def world(self) -> list[Any]:
        """Everything an attack could change."""
        lease_list = (
            k8s_client.CoordinationV1Api(self.admin).list_namespaced_lease(self.ns).to_dict()
        )
        return [
            sorted(
                (i["metadata"]["name"], i["metadata"]["resource_version"])
                for i in lease_list["items"]
            ),
            get(self.admin, "weightsources", self.ns, "src")["metadata"]["resourceVersion"],
            get(self.admin, "artifactcaches", self.ns, "cc")["metadata"]["resourceVersion"],
        ]

    def stop(self) -> None:
        for r in self.reporters:
            r.stop()


@pytest.fixture()
def pods(api_client: k8s_client.ApiClient, namespace: str) -> Any:
    p = Pods(api_client, namespace)
    yield p
    p.stop()


def refused(pods: Pods, attack: Callable[[], Any], says: str) -> None:
    """`attack` is refused by the apiserver (403, the policy's message) and nothing changed."""
    before = pods.world()
    with pytest.raises(k8s_client.ApiException) as err:
        attack()
    assert err.value.status == 403, err.value.body
    assert says in (err.value.body or ""), err.value.body
    assert pods.world() == before


def annotate(api: k8s_client.ApiClient, ns: str, pod: str, key: str, value: str | None) -> None:
    leases.patch(api, ns, pod, {key: value}, ssa.AGENT_MANAGER)


def apply_lease(api: k8s_client.ApiClient, ns: str, name: str, holder: str) -> None:
    k8s_client.CoordinationV1Api(api).patch_namespaced_lease(
        name,
        ns,
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": ns, "labels": {leases.LEASE_LABEL: "true"}},
            "spec": {
                "holderIdentity": holder,
                "leaseDurationSeconds": 3600,
                "renewTime": times.stamp(times.now(), micro=True),
            },
        },
        field_manager=ssa.agent_manager("a"),
        force=True,
        _content_type=ssa.APPLY,
    )


ASSIGNMENT = '{"job":"rj","attempt":1,"source":"evil-0","version":"9"}'
DONE = '{"attempt":1,"phase":"Done","bytes":4096}'


def test_pod_a_cannot_write_pod_b_lease(pods: Pods, namespace: str) -> None:
    a = pods.a
    refused(
        pods,
        lambda: annotate(a, namespace, "b", leases.ASSIGN + UID, ASSIGNMENT),
        "may write only its own agent Lease ferry-agent-a, not ferry-agent-b",
    )
    refused(
        pods, lambda: annotate(a, namespace, "b", leases.REPORT + UID, DONE), "its own agent Lease"
    )
    refused(
        pods,
        lambda: annotate(a, namespace, "b", leases.FOLLOW_REPORT + UID, "{}"),
        "its own agent Lease",
    )
    refused(pods, lambda: apply_lease(a, namespace, "ferry-agent-b", "b"), "its own agent Lease")
    refused(
        pods,
        lambda: k8s_client.CoordinationV1Api(a).delete_namespaced_lease("ferry-agent-b", namespace),
        "its own agent Lease",
    )
    # A Lease of another name that claims to be an agent's (the label) or is named like one.
    refused(pods, lambda: apply_lease(a, namespace, "decoy", "a"), "its own agent Lease")
    refused(pods, lambda: apply_lease(a, namespace, "ferry-agent-c", "c"), "its own agent Lease")


def test_pod_a_cannot_forge_its_own_lease(pods: Pods, namespace: str) -> None:
    a = pods.a
    refused(
        pods,
        lambda: annotate(a, namespace, "a", leases.ASSIGN + UID, ASSIGNMENT),
        "may change only the report.ferry.dev/*, followreport.ferry.dev/* annotations",
    )
    refused(pods, lambda: annotate(a, namespace, "a", leases.FOLLOW + UID, "{}"), "may change only")
    refused(pods, lambda: annotate(a, namespace, "a", "other.example/key", "x"), "may change only")
    refused(
        pods,
        lambda: apply_lease(a, namespace, "ferry-agent-a", "b"),
        "spec.holderIdentity must be a",
    )
    refused(
        pods,
        lambda: k8s_client.CoordinationV1Api(a).patch_namespaced_lease(
            "ferry-agent-a", namespace, {"metadata": {"labels": {leases.LEASE_LABEL: None}}}
        ),
        "may not change the labels",
    )
    # The operator's assignment on a's Lease stays: a cannot take it off either.
    annotate(pods.admin, namespace, "a", leases.ASSIGN + UID, ASSIGNMENT)
    refused(pods, lambda: annotate(a, namespace, "a", leases.ASSIGN + UID, None), "may change only")


def test_pod_a_cannot_write_pod_b_entries(pods: Pods, namespace: str) -> None:
    a = pods.a
    refused(
        pods,
        lambda: ssa.apply_status(
            a,
            WeightSource,
            namespace,
            "src",
            {
                "members": [
                    {"pod": "b", "state": "Ready", "endpoint": "6.6.6.6:7470", "version": "9"}
                ]
            },
            ssa.agent_manager("a"),
        ),
        "may write only its own entry (pod: a) of status.members",
    )
    refused(
        pods,
        lambda: ssa.apply_status(
            a,
            WeightSource,
            namespace,
            "src",
            {"members": [{"pod": "b", "state": "Ready", "endpoint": "6.6.6.6:7470"}]},
            ssa.agent_manager("b"),
        ),
        "its own entry",
    )
    refused(
        pods,
        lambda: ssa.apply_status(
            a,
            ArtifactCache,
            namespace,
            "cc",
            {
                "members": [
                    {"pod": "b", "role": "source", "state": "Packed", "endpoint": "6.6.6.6:7470"}
                ]
            },
            ssa.agent_manager("a"),
        ),
        "its own entry",
    )
    # Other status fields are the operator's.
    refused(
        pods,
        lambda: ssa.apply_status(
            a, WeightSource, namespace, "src", {"version": "666"}, ssa.agent_manager("a")
        ),
        "no other status field",
    )
    refused(
        pods,
        lambda: k8s_client.CustomObjectsApi(a).patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            "weightsources",
            "src",
            [{"op": "remove", "path": "/status/members/1"}],
            _content_type="application/json-patch+json",
        ),
        "its own entry",
    )
    members = get(pods.admin, "weightsources", namespace, "src")["status"]["members"]
    assert {m["pod"]: m["endpoint"] for m in members} == {
        "a": "10.0.0.1:7470",
        "b": "10.0.0.2:7470",
    }


def test_pod_a_still_writes_what_is_its_own(pods: Pods, namespace: str) -> None:
    a = pods.a
    before = pods.lease("a")["spec"]["renew_time"]
    pods.reporters[0].poke()  # renewal: server-side apply of its own Lease and entry
    pods.reporters[0]._beat()
    assert pods.lease("a")["spec"]["renew_time"] > before
    runner = JobRunner(None, Identity("a", namespace, None, "10.0.0.1:7470"), a)
    runner.write_report(UID, Report.model_validate({"attempt": 1, "phase": "Pulling", "bytes": 1}))
    annotate(a, namespace, "a", leases.FOLLOW_REPORT + UID, '{"version":"9"}')
    ann = pods.lease("a")["metadata"]["annotations"]
    assert leases.read(ann, leases.REPORT)[UID]["phase"] == "Pulling"
    annotate(a, namespace, "a", leases.REPORT + UID, None)  # pruning its own report
    assert leases.REPORT + UID not in (pods.lease("a")["metadata"]["annotations"] or {})
    ssa.apply_status(
        a,
        WeightSource,
        namespace,
        "src",
        {"members": [{"pod": "a", "state": "Ready", "endpoint": "10.0.0.1:7471", "version": "10"}]},
        ssa.agent_manager("a"),
    )
    ssa.apply_status(
        a,
        ArtifactCache,
        namespace,
        "cc",
        {
            "members": [
                {"pod": "a", "role": "target", "state": "Installed", "endpoint": "10.0.0.1:7471"}
            ]
        },
        ssa.agent_manager("a"),
    )
    ws = get(pods.admin, "weightsources", namespace, "src")["status"]["members"]
    assert {m["pod"]: m["endpoint"] for m in ws} == {"a": "10.0.0.1:7471", "b": "10.0.0.2:7470"}
    ac = get(pods.admin, "artifactcaches", namespace, "cc")["status"]["members"]
    assert {m["pod"]: m["state"] for m in ac} == {"a": "Installed", "b": "Packed"}
    # Shutdown: Stale, then its own Lease deleted.
    pods.reporters[0].stop()
    with pytest.raises(k8s_client.ApiException) as gone:
        pods.lease("a")
    assert gone.value.status == 404


def test_a_token_of_another_namespace_pod_with_the_same_name_is_refused(
    pods: Pods, api_client: k8s_client.ApiClient, namespace: str
) -> None:
    """A pod named `b` elsewhere, its ServiceAccount bound here, cannot pass for this `b`."""
    core = k8s_client.CoreV1Api(api_client)
    other = namespace[:50] + "-x"
    core.create_namespace({"metadata": {"name": other}})
    core.create_namespaced_service_account(other, {"metadata": {"name": "default"}})
    make_pod(api_client, other, "b", {"app": "llm"})
    k8s_client.RbacAuthorizationV1Api(api_client).create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "foreign-agent"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "ferry-agent",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": other}],
        },
    )
    foreign = token_client(api_client, pod_token(api_client, other, "b"))
    refused(
        pods,
        lambda: annotate(foreign, namespace, "b", leases.REPORT + UID, DONE),
        "its own agent Lease",
    )


def test_broader_rbac_does_not_widen_what_a_pod_token_writes(
    pods: Pods, api_client: k8s_client.ApiClient, namespace: str
) -> None:
    """The policy holds whatever the ServiceAccount is granted (here: every verb on Ferry
    status and Leases, as a careless binding might give): RefitJob status stays the operator's."""
    create(
        api_client,
        namespace,
        "refitjobs",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "RefitJob",
            "metadata": {"name": "rj"},
            "spec": {"sourceRef": {"name": "src"}, "targets": {"matchLabels": {"app": "llm"}}},
        },
    )
    rbac_api = k8s_client.RbacAuthorizationV1Api(api_client)
    rbac_api.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "broad"},
            "rules": [
                {"apiGroups": [GROUP], "resources": ["*/status"], "verbs": ["*"]},
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["*"]},
            ],
        },
    )
    rbac_api.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "broad"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "broad"},
            "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": namespace}],
        },
    )
    a = pods.a

    def forge_job() -> None:
        k8s_client.CustomObjectsApi(a).patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            "refitjobs",
            "rj",
            {
                "status": {
                    "phase": "Succeeded",
                    "targets": [{"pod": "b", "phase": "Done", "attempts": 1}],
                }
            },
        )

    time.sleep(1)  # RBAC's authorizer cache follows the new binding
    refused(pods, forge_job, "may not write RefitJob status")
    assert (
        get(api_client, "refitjobs", namespace, "rj").get("status", {}).get("phase") != "Succeeded"
    )
    refused(
        pods, lambda: annotate(a, namespace, "b", leases.REPORT + UID, DONE), "its own agent Lease"
    )
