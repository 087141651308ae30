"""The real apiserver calls the operator's mutating webhook over TLS and stores the sidecar."""

from __future__ import annotations

from kubernetes import client as k8s_client

from ferry_operator.dev.operatorproc import OperatorProcess


def pod(name: str, labels: dict[str, str]) -> dict:
    return {"metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "engine", "image": "example.invalid/vllm:1"}]}}


def test_labelled_pod_gets_the_agent_sidecar(operator: OperatorProcess,
                                             api_client: k8s_client.ApiClient, namespace: str) -> None:
    core = k8s_client.CoreV1Api(api_client)
    core.create_namespaced_pod(namespace, pod("engine-0", {"ferry.dev/inject": "true"}))
    stored = core.read_namespaced_pod("engine-0", namespace)
    agents = [c for c in stored.spec.init_containers or [] if c.name == "ferry-agent"]
    assert len(agents) == 1
    agent = agents[0]
    assert agent.restart_policy == "Always", "the agent must be a native sidecar"
    assert {e.name for e in agent.env} >= {"POD_NAME", "POD_NAMESPACE", "POD_IP"}
    assert {v.name for v in stored.spec.volumes} >= {"ferry-shm", "ferry-socket", "ferry-token"}
    engine = stored.spec.containers[0]
    assert "/var/run/ferry" in {m.mount_path for m in engine.volume_mounts}


def test_unlabelled_pod_is_left_alone(operator: OperatorProcess,
                                      api_client: k8s_client.ApiClient, namespace: str) -> None:
    core = k8s_client.CoreV1Api(api_client)
    core.create_namespaced_pod(namespace, pod("plain", {"app": "x"}))
    stored = core.read_namespaced_pod("plain", namespace)
    assert not stored.spec.init_containers


def test_injection_is_idempotent(operator: OperatorProcess, api_client: k8s_client.ApiClient,
                                 namespace: str) -> None:
    core = k8s_client.CoreV1Api(api_client)
    body = pod("again", {"ferry.dev/inject": "true"})
    body["spec"]["initContainers"] = [{"name": "ferry-agent", "image": "mine:1", "restartPolicy": "Always"}]
    core.create_namespaced_pod(namespace, body)
    stored = core.read_namespaced_pod("again", namespace)
    assert [c.image for c in stored.spec.init_containers] == ["mine:1"]
