"""The sidecar the webhook adds (pure function)."""

from __future__ import annotations

from ferry_operator.injection import AGENT_NAME, InjectSettings, inject

POD = {"containers": [{"name": "engine", "image": "vllm:1"}]}


def test_agent_is_a_native_sidecar_with_identity_and_shared_volumes() -> None:
    s = InjectSettings(image="agent:9", token_secret="tok", memory_mode="host", shm_size="8Gi")
    spec = inject(POD, s)
    agent = spec["initContainers"][0]
    assert agent["name"] == AGENT_NAME and agent["restartPolicy"] == "Always"
    assert agent["image"] == "agent:9"
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in agent["env"] if "valueFrom" in e}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace",
                   "POD_IP": "status.podIP", "NODE_NAME": "spec.nodeName"}
    assert {"name": "ferry-grpc", "containerPort": 50051, "protocol": "TCP"} in agent["ports"]
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["ferry-shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert vols["ferry-token"]["secret"]["secretName"] == "tok"
    engine = spec["containers"][0]
    assert {m["mountPath"] for m in engine["volumeMounts"]} == {"/dev/shm", "/var/run/ferry"}
    assert "--memory" in agent["args"] and "host" in agent["args"]
    assert agent["securityContext"]["runAsNonRoot"] is True


def test_idempotent_and_input_untouched() -> None:
    spec = inject(POD, InjectSettings())
    assert inject(spec, InjectSettings()) is None
    assert "initContainers" not in POD and "volumeMounts" not in POD["containers"][0]


def test_existing_init_containers_and_shm_kept() -> None:
    pod = {"initContainers": [{"name": "fetch", "image": "x"}],
           "containers": [{"name": "e", "image": "y", "volumeMounts": [{"name": "mine", "mountPath": "/dev/shm"}]}],
           "volumes": [{"name": "mine", "emptyDir": {"medium": "Memory"}}]}
    spec = inject(pod, InjectSettings())
    assert [c["name"] for c in spec["initContainers"]] == [AGENT_NAME, "fetch"]
    mounts = spec["containers"][0]["volumeMounts"]
    assert [m for m in mounts if m["mountPath"] == "/dev/shm"] == [{"name": "mine", "mountPath": "/dev/shm"}]


def test_settings_from_env() -> None:
    s = InjectSettings.from_env({"FERRY_AGENT_IMAGE": "a:1", "FERRY_WEBHOOK_FAILURE_POLICY": "Ignore"})
    assert s.image == "a:1" and s.failure_policy == "Ignore"


def test_trust_secrets_mounted_signing_key_only_for_sources() -> None:
    from ferry_api.meta import selector_matches as _matches
    from ferry_operator.injection import inject, trust_mounts

    caches = [
        {"spec": {"trust": {"secretRef": "sig"}, "sources": {"matchLabels": {"warm": "true"}},
                  "targets": {"matchLabels": {"app": "inf"}}}},
        {"spec": {"sources": {"matchLabels": {"warm": "true"}}, "targets": {"matchLabels": {"app": "inf"}}}},
    ]
    target = trust_mounts({"app": "inf"}, caches, _matches)
    source = trust_mounts({"app": "inf", "warm": "true"}, caches, _matches)
    assert [(m.secret, m.signer) for m in target] == [("sig", False)]
    assert [(m.secret, m.signer) for m in source] == [("sig", True)]
    vol = {v["name"]: v for v in inject(POD, InjectSettings(), target)["volumes"]}["ferry-trust-sig"]
    assert [i["key"] for i in vol["secret"]["items"]] == ["ed25519.pub"], "targets never see the signing key"
    spec = inject(POD, InjectSettings(), source)
    vol = {v["name"]: v for v in spec["volumes"]}["ferry-trust-sig"]
    assert {i["key"] for i in vol["secret"]["items"]} == {"ed25519.pub", "ed25519.key"}
    mounts = {m["mountPath"] for m in spec["initContainers"][0]["volumeMounts"]}
    assert "/etc/ferry/trust/sig" in mounts
    assert trust_mounts({"other": "x"}, caches, _matches) == []


def test_tp_rank_comes_from_the_sources_rank_label_through_the_downward_api() -> None:
    from ferry_api.meta import selector_matches
    from ferry_operator.injection import rank_label

    sources = [{"metadata": {"name": "b"}, "spec": {"selector": {"matchLabels": {"app": "x"}},
                                                    "layout": {"rankLabel": "example.com/rank"}}},
               {"metadata": {"name": "other"}, "spec": {"selector": {"matchLabels": {"app": "y"}},
                                                        "layout": {"rankLabel": "y.io/rank"}}}]
    labels = {"app": "x", "example.com/rank": "1", "y.io/rank": "0"}
    assert rank_label(labels, sources, selector_matches) == "example.com/rank"
    assert rank_label({"app": "x"}, sources, selector_matches) is None
    assert rank_label({"app": "z", "ferry.dev/tp-rank": "0"}, sources, selector_matches) == "ferry.dev/tp-rank"
    agent = inject(POD, InjectSettings(), rank_label="example.com/rank")["initContainers"][0]
    env = {e["name"]: e for e in agent["env"]}
    assert env["FERRY_TP_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['example.com/rank']"
    assert "FERRY_TP_RANK" not in {e["name"] for e in inject(POD, InjectSettings())["initContainers"][0]["env"]}
