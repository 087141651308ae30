"""The RefitJob channel between the operator and an agent, against the real apiserver
and the real operator: the assignment on the agent's Lease, the agent's report on
the same Lease folded into the job (ferry_api.leases).

The writes on the agent's side are the real JobRunner's (`write_report`); no bytes move
here (the agent's pulls have their own process tests in tests/e2e).
"""

from __future__ import annotations

import threading
import time

from kubernetes import client as k8s_client

from ferry_agent.k8s.jobs import JobRunner
from ferry_agent.k8s.reporter import Identity, Reporter
from ferry_api import leases, ssa
from ferry_api.leases import Report
from ferry_operator import rbac
from tests.kube_helpers import (
    GROUP,
    VERSION,
    cond,
    create,
    get,
    grant,
    make_pod,
    pod_token,
    token_client,
    wait_for,
)

UID = "0b9d4c1e-0000-4000-8000-000000000002"

WS = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "WeightSource",
    "metadata": {"name": "src"},
    "spec": {"model": {"name": "llama"}, "selector": {"matchLabels": {"app": "trainer"}}},
}
JOB = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "RefitJob",
    "metadata": {"name": "rj"},
    "spec": {"sourceRef": {"name": "src"}, "targets": {"matchLabels": {"app": "inference"}}},
}
READY = {"state": "Ready", "version": "9", "fingerprint": "fp", "tensors": 2, "bytes": 4096}


def lease_annotations(api: k8s_client.ApiClient, ns: str, pod: str) -> dict[str, str]:
    lease = k8s_client.CoordinationV1Api(api).read_namespaced_lease(leases.lease_name(pod), ns)
    return dict(lease.metadata.annotations or {})


def assignment(api: k8s_client.ApiClient, ns: str, pod: str) -> dict | None:
    found = leases.read(lease_annotations(api, ns, pod), leases.ASSIGN)
    return next(iter(found.values()), None)


def entry(api: k8s_client.ApiClient, ns: str, pod: str) -> dict:
    targets = get(api, "refitjobs", ns, "rj").get("status", {}).get("targets") or []
    return next((e for e in targets if e["pod"] == pod), {})


def start_agents(api: k8s_client.ApiClient, ns: str) -> list[Reporter]:
    create(api, ns, "weightsources", WS)
    make_pod(api, ns, "trainer-0", {"app": "trainer"})
    make_pod(api, ns, "t-0", {"app": "inference"})
    return [
        Reporter(
            Identity("trainer-0", ns, None, "10.0.0.1:7470"), lambda: READY, api, renew_seconds=1
        ).start(),
        Reporter(
            Identity("t-0", ns, None, "10.0.0.2:7470"),
            lambda: {"state": "Empty"},
            api,
            renew_seconds=1,
        ).start(),
    ]


def test_assignment_on_the_lease_reports_folded_into_the_job(
    api_client: k8s_client.ApiClient, namespace: str, operator
) -> None:
    reporters = start_agents(api_client, namespace)
    job = create(api_client, namespace, "refitjobs", JOB)
    uid = job["metadata"]["uid"]
    got = wait_for(
        lambda: assignment(api_client, namespace, "t-0"), what="assignment on t-0's Lease"
    )
    assert got == {
        "job": "rj",
        "attempt": 1,
        "source": "trainer-0",
        "version": "9",
        "startTime": get(api_client, "refitjobs", namespace, "rj")["status"]["startTime"],
        "spec": get(api_client, "refitjobs", namespace, "rj")["spec"],
    }

    runner = JobRunner(None, Identity("t-0", namespace, None, "10.0.0.2:7470"), api_client)
    runner.write_report(
        uid,
        Report.model_validate(
            {"attempt": 1, "endpoint": "10.0.0.2:7470", "phase": "Pulling", "bytes": 1024}
        ),
    )
    wait_for(
        lambda: entry(api_client, namespace, "t-0").get("phase") == "Pulling", what="Pulling folded"
    )
    assert entry(api_client, namespace, "t-0")["bytes"] == 1024
    runner.write_report(
        uid,
        Report.model_validate(
            {
                "attempt": 1,
                "endpoint": "10.0.0.2:7470",
                "phase": "Done",
                "bytes": 4096,
                "seconds": 0.25,
            }
        ),
    )
    done = wait_for(
        lambda: (
            (o := get(api_client, "refitjobs", namespace, "rj"))["status"].get("phase")
            == "Succeeded"
            and o
        ),
        what="Succeeded",
    )
    assert cond(done, "Complete")["status"] == "True"
    assert entry(api_client, namespace, "t-0") == {
        "pod": "t-0",
        "source": "trainer-0",
        "attempts": 1,
        "phase": "Done",
        "bytes": 4096,
        "seconds": 0.25,
        "endpoint": "10.0.0.2:7470",
    }
    # The outcome is folded: the assignment comes off the Lease; the Done report stays there
    # (a downstream target of a chain reads its upstream's endpoint from it).
    wait_for(lambda: assignment(api_client, namespace, "t-0") is None, what="assignment removed")
    assert (
        leases.read(lease_annotations(api_client, namespace, "t-0"), leases.REPORT)[uid]["phase"]
        == "Done"
    )
    managers = {
        m["manager"] for m in done["metadata"]["managedFields"] if m.get("subresource") == "status"
    }
    assert managers == {ssa.OPERATOR_MANAGER}, "the job's status is the operator's alone"
    for r in reporters:
        r.stop()


def test_deleting_a_running_job_takes_the_assignment_off_and_waits_for_the_pull(
    api_client: k8s_client.ApiClient, namespace: str, operator
) -> None:
    reporters = start_agents(api_client, namespace)
    uid = create(api_client, namespace, "refitjobs", JOB)["metadata"]["uid"]
    wait_for(lambda: assignment(api_client, namespace, "t-0"), what="assignment on t-0's Lease")
    runner = JobRunner(None, Identity("t-0", namespace, None, "10.0.0.2:7470"), api_client)
    runner.write_report(
        uid,
        Report.model_validate(
            {"attempt": 1, "endpoint": "10.0.0.2:7470", "phase": "Pulling", "bytes": 1}
        ),
    )
    wait_for(
        lambda: entry(api_client, namespace, "t-0").get("phase") == "Pulling", what="Pulling folded"
    )

    k8s_client.CustomObjectsApi(api_client).delete_namespaced_custom_object(
        GROUP, VERSION, namespace, "refitjobs", "rj"
    )
    wait_for(lambda: assignment(api_client, namespace, "t-0") is None, what="assignment taken off")
    assert get(api_client, "refitjobs", namespace, "rj")["metadata"]["finalizers"], (
        "the finalizer waits while the target reports Pulling"
    )
    runner.write_report(
        uid,
        Report.model_validate(
            {
                "attempt": 1,
                "endpoint": "10.0.0.2:7470",
                "phase": "Failed",
                "reason": "Cancelled",
                "message": "the job was deleted",
            }
        ),
    )
    last: dict = {}

    def gone() -> bool:
        try:
            last.update(entry(api_client, namespace, "t-0"))
            return False
        except k8s_client.ApiException as exc:
            return exc.status == 404

    wait_for(gone, what="the job released once its pull ended")
    assert last["phase"] == "Failed" and last["reason"] == "Cancelled", (
        "the last word is seen on the job"
    )
    for r in reporters:
        r.stop()


def raw_report(api: k8s_client.ApiClient, ns: str, pod: str, uid: str, text: str) -> None:
    """Write a report annotation as given, bypassing the models' checks (what a bug or a
    compromised pod could put there: `Infinity` is no JSON, but json.loads reads it)."""
    leases.patch(api, ns, pod, {leases.REPORT + uid: text}, ssa.AGENT_MANAGER)


BAD_DONE = '{"attempt":1,"phase":"Done","seconds":Infinity,"bytes":' + str(2**70) + "}"


def test_one_bad_report_wedges_a_job_real_apiserver_the_job_still_completes(
    api_client: k8s_client.ApiClient, namespace: str, operator
) -> None:
    reporters = start_agents(api_client, namespace)
    uid = create(api_client, namespace, "refitjobs", JOB)["metadata"]["uid"]
    wait_for(lambda: assignment(api_client, namespace, "t-0"), what="assignment on t-0's Lease")
    raw_report(api_client, namespace, "t-0", uid, BAD_DONE)
    done = wait_for(
        lambda: (
            (o := get(api_client, "refitjobs", namespace, "rj"))["status"].get("phase")
            == "Succeeded"
            and o
        ),
        what="Succeeded despite the bad numbers",
    )
    assert entry(api_client, namespace, "t-0") == {
        "pod": "t-0",
        "source": "trainer-0",
        "attempts": 1,
        "phase": "Done",
    }
    assert done["status"]["bytesDone"] == done["status"]["bytesTotal"] == 4096
    for r in reporters:
        r.stop()


def test_one_bad_report_wedges_a_job_real_apiserver_its_finalizer_is_released(
    api_client: k8s_client.ApiClient, namespace: str, operator
) -> None:
    reporters = start_agents(api_client, namespace)
    uid = create(api_client, namespace, "refitjobs", JOB)["metadata"]["uid"]
    wait_for(lambda: assignment(api_client, namespace, "t-0"), what="assignment on t-0's Lease")
    raw_report(
        api_client,
        namespace,
        "t-0",
        uid,
        '{"attempt":1,"phase":"Failed","reason":"Cancelled","seconds":NaN,"bytes":'
        + str(2**64)
        + "}",
    )
    k8s_client.CustomObjectsApi(api_client).delete_namespaced_custom_object(
        GROUP, VERSION, namespace, "refitjobs", "rj"
    )

    def gone() -> bool:
        try:
            get(api_client, "refitjobs", namespace, "rj")
            return False
        except k8s_client.ApiException as exc:
            return exc.status == 404

    wait_for(gone, timeout=25, what="the deleted job released (well before the 30 s fallback)")
    for r in reporters:
        r.stop()


def test_a_forged_lease_holder_or_a_report_for_an_attempt_never_assigned_is_ignored(
    api_client: k8s_client.ApiClient, namespace: str, operator
) -> None:
    import time

    from ferry_api import times

    reporters = start_agents(api_client, namespace)
    uid = create(api_client, namespace, "refitjobs", JOB)["metadata"]["uid"]
    wait_for(lambda: assignment(api_client, namespace, "t-0"), what="assignment on t-0's Lease")
    # Another Lease claims to be t-0's (holder forged) and says Done for attempt 1; its name
    # sorts after t-0's, so a reader keyed by holder would take it.
    k8s_client.CoordinationV1Api(api_client).patch_namespaced_lease(
        "ferry-agent-zzz",
        namespace,
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": "ferry-agent-zzz",
                "labels": {leases.LEASE_LABEL: "true"},
                "annotations": {leases.REPORT + uid: '{"attempt":1,"phase":"Done","bytes":4096}'},
            },
            "spec": {
                "holderIdentity": "t-0",
                "leaseDurationSeconds": 60,
                "renewTime": times.stamp(times.now(), micro=True),
            },
        },
        field_manager="evil",
        force=True,
        _content_type=ssa.APPLY,
    )
    # And t-0's own Lease says Done for an attempt the operator never assigned.
    raw_report(api_client, namespace, "t-0", uid, '{"attempt":7,"phase":"Done","bytes":4096}')
    time.sleep(5)  # several reconciles (every second while the job runs)
    job = get(api_client, "refitjobs", namespace, "rj")
    assert job["status"]["phase"] == "Running", job["status"]
    assert entry(api_client, namespace, "t-0") == {
        "pod": "t-0",
        "source": "trainer-0",
        "attempts": 1,
    }
    # The real report on the assigned attempt completes it.
    raw_report(api_client, namespace, "t-0", uid, '{"attempt":1,"phase":"Done","bytes":4096}')
    wait_for(
        lambda: get(api_client, "refitjobs", namespace, "rj")["status"].get("phase") == "Succeeded",
        what="Succeeded on the real report",
    )
    for r in reporters:
        r.stop()


def test_a_deleted_target_pod_leaves_the_job_real_apiserver(
    api_client: k8s_client.ApiClient, namespace: str, operator
) -> None:
    reporters = start_agents(api_client, namespace)
    make_pod(api_client, namespace, "t-1", {"app": "inference"})
    reporters.append(
        Reporter(
            Identity("t-1", namespace, None, "10.0.0.3:7470"),
            lambda: {"state": "Empty"},
            api_client,
            renew_seconds=1,
        ).start()
    )
    uid = create(api_client, namespace, "refitjobs", JOB)["metadata"]["uid"]
    for pod in ("t-0", "t-1"):
        wait_for(
            lambda p=pod: assignment(api_client, namespace, p), what=f"assignment on {pod}'s Lease"
        )
    raw_report(api_client, namespace, "t-1", uid, '{"attempt":1,"phase":"Pulling","bytes":1}')
    wait_for(
        lambda: entry(api_client, namespace, "t-1").get("phase") == "Pulling", what="t-1 Pulling"
    )
    # t-1's agent stops cleanly (its Lease deleted, so it never expires) and its pod goes.
    reporters.pop().stop()
    k8s_client.CoreV1Api(api_client).delete_namespaced_pod("t-1", namespace, grace_period_seconds=0)
    raw_report(api_client, namespace, "t-0", uid, '{"attempt":1,"phase":"Done","bytes":4096}')
    done = wait_for(
        lambda: (
            (o := get(api_client, "refitjobs", namespace, "rj"))["status"].get("phase")
            == "Succeeded"
            and o
        ),
        what="Succeeded without t-1",
    )
    left = entry(api_client, namespace, "t-1")
    assert left["phase"] == "Left" and left["reason"] in ("PodGone", "PodDeleted"), left
    assert (
        done["status"]["targetsSummary"] == "1/1" and "1 left" in cond(done, "Complete")["message"]
    )
    for r in reporters:
        r.stop()


def test_a_final_report_refused_for_a_while_is_written_once_the_apiserver_allows_it(
    api_client: k8s_client.ApiClient, namespace: str
) -> None:
    """A kube-apiserver that has just restarted refuses the agent's writes (401, 403) until
    its token and RBAC caches are filled. The refusal here is real RBAC on the agent's own
    pod token: its RoleBinding taken away while the Done report is written, then given
    back. The report is retried through the refusal and lands; it is not dropped, which
    would leave the target Pulling on the job until its deadline."""
    grant(api_client, namespace, "default", "ferry-agent", rbac.AGENT)
    make_pod(api_client, namespace, "t-0", {"app": "inference"})
    pod = token_client(api_client, pod_token(api_client, namespace, "t-0"))
    ident = Identity("t-0", namespace, None, "10.0.0.2:7470")
    reporter = Reporter(ident, lambda: {"state": "Empty"}, pod, renew_seconds=3600).start()
    try:
        runner = JobRunner(None, ident, pod)
        probe = Report.model_validate({"attempt": 1, "phase": "Pulling", "bytes": 1})
        runner.write_report(UID, probe)
        rbac_api = k8s_client.RbacAuthorizationV1Api(api_client)
        binding = rbac_api.read_namespaced_role_binding("ferry-agent", namespace)
        rbac_api.delete_namespaced_role_binding("ferry-agent", namespace)

        def refused() -> bool:
            try:
                runner.write_report(UID, probe)
                return False
            except k8s_client.ApiException as exc:
                return exc.status == 403

        wait_for(refused, what="the agent's writes refused")
        done = Report.model_validate({"attempt": 1, "phase": "Done", "bytes": 4096, "seconds": 1.0})
        writer = threading.Thread(target=runner.write_final, args=(UID, done), daemon=True)
        writer.start()
        time.sleep(1.0)
        assert writer.is_alive(), "the refused report is being retried"
        ours = leases.read(lease_annotations(api_client, namespace, "t-0"), leases.REPORT)
        assert ours[UID]["phase"] == "Pulling"

        binding.metadata = k8s_client.V1ObjectMeta(name="ferry-agent", namespace=namespace)
        rbac_api.create_namespaced_role_binding(namespace, binding)
        writer.join(30)
        assert not writer.is_alive(), "the report was written once allowed"
        ours = leases.read(lease_annotations(api_client, namespace, "t-0"), leases.REPORT)
        assert ours[UID] == {"attempt": 1, "phase": "Done", "bytes": 4096, "seconds": 1.0}
    finally:
        reporter.stop()
