"""An agent's writes into its RefitJob entry, against the real apiserver: a guarded
JSON patch under the agents' shared field manager (ferry_agent.k8s.jobs._write).

The test applies the operator's part (pod, source, attempts) itself, under the
operator's field manager; if the session's operator runs, it keeps exactly those
entries (the job's WeightSource does not exist, so it assigns nothing).
"""

from __future__ import annotations

from kubernetes import client as k8s_client

from ferry_agent.k8s.jobs import JobRunner
from ferry_agent.k8s.reporter import Identity
from ferry_api import ssa
from ferry_api.refitjob import RefitJob
from tests.kube_helpers import GROUP, VERSION, create, get

JOB = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RefitJob", "metadata": {"name": "rj"},
       "spec": {"sourceRef": {"name": "src"}, "targets": {"matchLabels": {"app": "inference"}}}}


def assign(api: k8s_client.ApiClient, ns: str, pods: list[str]) -> None:
    ssa.apply_status(api, RefitJob, ns, "rj",
                     {"targets": [{"pod": p, "source": "src-0", "attempts": 1} for p in pods]},
                     ssa.OPERATOR_MANAGER)


def entries(api: k8s_client.ApiClient, ns: str) -> dict[str, dict]:
    return {e["pod"]: e for e in get(api, "refitjobs", ns, "rj")["status"]["targets"]}


def test_agent_patches_only_its_entry_finds_it_again_when_the_list_moves_and_drops_stale_fields(
        api_client: k8s_client.ApiClient, namespace: str) -> None:
    create(api_client, namespace, "refitjobs", JOB)
    assign(api_client, namespace, ["t-b"])
    runner = JobRunner(None, Identity("t-b", namespace, "node-a", "10.0.0.2:7470"), api_client)
    runner._write("rj", {"observedAttempt": 1, "phase": "Failed", "reason": "TransferFailed",
                         "message": "boom", "bytes": 7})
    # The operator adds a target that sorts first: t-b's entry moves from index 0 to 1,
    # and the runner's remembered index is now t-a's.
    assign(api_client, namespace, ["t-a", "t-b"])
    assert list(entries(api_client, namespace)) == ["t-a", "t-b"]
    runner._write("rj", {"observedAttempt": 1, "phase": "Done", "bytes": 9, "seconds": 0.5})

    got = entries(api_client, namespace)
    assert got["t-a"] == {"pod": "t-a", "source": "src-0", "attempts": 1}
    # Done replaces the whole agent part: the failed attempt's reason and message are gone.
    assert got["t-b"] == {"pod": "t-b", "source": "src-0", "attempts": 1, "observedAttempt": 1,
                          "phase": "Done", "bytes": 9, "seconds": 0.5}
    managers = {m["manager"] for m in get(api_client, "refitjobs", namespace, "rj")
                ["metadata"]["managedFields"] if m.get("subresource") == "status"}
    assert managers == {ssa.OPERATOR_MANAGER, ssa.AGENT_MANAGER}
