"""The real apiserver calls the operator's mutating webhook over TLS and stores the sidecar."""

from __future__ import annotations

from kubernetes import client as k8s_client

from ferry_dev.operatorproc import OperatorProcess
from ferry_operator.injection import KUBE_API_DIR


def pod(name: str, labels: dict[str, str]) -> dict:
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "engine", "image": "example.invalid/vllm:1"}]},
    }


def test_labelled_pod_gets_the_agent_sidecar(
    operator: OperatorProcess, api_client: k8s_client.ApiClient, namespace: str
) -> None:
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


def test_unlabelled_pod_is_left_alone(
    operator: OperatorProcess, api_client: k8s_client.ApiClient, namespace: str
) -> None:
    core = k8s_client.CoreV1Api(api_client)
    core.create_namespaced_pod(namespace, pod("plain", {"app": "x"}))
    stored = core.read_namespaced_pod("plain", namespace)
    assert not stored.spec.init_containers


def test_injection_is_idempotent(
    operator: OperatorProcess, api_client: k8s_client.ApiClient, namespace: str
) -> None:
    core = k8s_client.CoreV1Api(api_client)
    body = pod("again", {"ferry.dev/inject": "true"})
    body["spec"]["initContainers"] = [
        {"name": "ferry-agent", "image": "mine:1", "restartPolicy": "Always"}
    ]
    core.create_namespaced_pod(namespace, body)
    stored = core.read_namespaced_pod("again", namespace)
    assert [c.image for c in stored.spec.init_containers] == ["mine:1"]


def test_trust_volume_names_are_valid_unique_dns_labels(
    operator: OperatorProcess, api_client: k8s_client.ApiClient, namespace: str
) -> None:
    """Issue 19 (small ones, a): ArtifactCaches trusting a Secret whose name holds a `.`, and
    two whose long names share a prefix, select a pod: the apiserver stores the injected pod
    (an invalid or duplicate volume name made it refuse the pod)."""
    custom = k8s_client.CustomObjectsApi(api_client)
    secrets = [
        "team.signing.v1",
        "signing-key-" + "x" * 50 + "-a",
        "signing-key-" + "x" * 50 + "-b",
    ]
    for i, secret in enumerate(secrets):
        custom.create_namespaced_custom_object(
            "ferry.dev",
            "v1alpha1",
            namespace,
            "artifactcaches",
            {
                "apiVersion": "ferry.dev/v1alpha1",
                "kind": "ArtifactCache",
                "metadata": {"name": f"ac{i}"},
                "spec": {
                    "kinds": ["triton"],
                    "identity": {"triton": "3.7.1", "cuda": "13.0", "gpuArch": "sm_90"},
                    "sources": {"matchLabels": {"warm": "true"}},
                    "targets": {"matchLabels": {"app": "inf"}},
                    "trust": {"secretRef": secret},
                },
            },
        )
    core = k8s_client.CoreV1Api(api_client)
    core.create_namespaced_pod(
        namespace, pod("trusting", {"ferry.dev/inject": "true", "app": "inf"})
    )
    stored = core.read_namespaced_pod("trusting", namespace)
    trusted = {v.secret.secret_name for v in stored.spec.volumes if v.secret} - {
        "ferry-agent-token"
    }
    assert trusted == set(secrets)


def test_only_the_agent_gets_the_pods_kubernetes_credentials(
    operator: OperatorProcess, api_client: k8s_client.ApiClient, namespace: str
) -> None:
    """The apiserver's ServiceAccount plugin (before the webhook) mounts a token into every
    container; what the apiserver stores has it in the agent alone, at the in-cluster path."""
    core = k8s_client.CoreV1Api(api_client)
    body = pod("engine-1", {"ferry.dev/inject": "true"})
    body["spec"]["initContainers"] = [{"name": "setup", "image": "example.invalid/setup:1"}]
    core.create_namespaced_pod(namespace, body)
    plain = pod("plain", {})
    core.create_namespaced_pod(namespace, plain)
    assert any(
        m.mount_path == KUBE_API_DIR
        for m in core.read_namespaced_pod("plain", namespace).spec.containers[0].volume_mounts
    ), "this apiserver's ServiceAccount plugin mounts a token (else the test proves nothing)"
    stored = core.read_namespaced_pod("engine-1", namespace).spec
    assert stored.automount_service_account_token is False
    by_name = {v.name: v for v in stored.volumes}
    for c in [*stored.containers, *stored.init_containers]:
        tokens = [
            m
            for m in c.volume_mounts or []
            if m.mount_path == KUBE_API_DIR
            or any(
                s.service_account_token
                for s in (by_name[m.name].projected.sources if by_name[m.name].projected else [])
            )
        ]
        if c.name == "ferry-agent":
            assert [(m.name, m.mount_path, m.read_only) for m in tokens] == [
                ("ferry-kube-api", KUBE_API_DIR, True)
            ]
        else:
            assert tokens == [], f"{c.name} still mounts {tokens}"
    assert not [v for v in by_name if v.startswith("kube-api-access-")]
