"""The sidecar the webhook adds (pure function)."""

from __future__ import annotations

from ferry_operator import injection
from ferry_operator.injection import AGENT_NAME, InjectSettings, inject

POD = {"containers": [{"name": "engine", "image": "vllm:1"}]}


def test_agent_is_a_native_sidecar_with_identity_and_shared_volumes() -> None:
    s = InjectSettings(image="agent:9", token_secret="tok", memory_mode="host", shm_size="8Gi")
    spec = inject(POD, s)
    agent = spec["initContainers"][0]
    assert agent["name"] == AGENT_NAME and agent["restartPolicy"] == "Always"
    assert agent["image"] == "agent:9"
    env = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in agent["env"] if "valueFrom" in e
    }
    assert env == {
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "POD_IP": "status.podIP",
        "NODE_NAME": "spec.nodeName",
    }
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
    pod = {
        "initContainers": [{"name": "fetch", "image": "x"}],
        "containers": [
            {"name": "e", "image": "y", "volumeMounts": [{"name": "mine", "mountPath": "/dev/shm"}]}
        ],
        "volumes": [{"name": "mine", "emptyDir": {"medium": "Memory"}}],
    }
    spec = inject(pod, InjectSettings())
    assert [c["name"] for c in spec["initContainers"]] == [AGENT_NAME, "fetch"]
    mounts = spec["containers"][0]["volumeMounts"]
    assert [m for m in mounts if m["mountPath"] == "/dev/shm"] == [
        {"name": "mine", "mountPath": "/dev/shm"}
    ]


def test_settings_from_env() -> None:
    s = InjectSettings.from_env(
        {"FERRY_AGENT_IMAGE": "a:1", "FERRY_WEBHOOK_FAILURE_POLICY": "Ignore"}
    )
    assert s.image == "a:1" and s.failure_policy == "Ignore"


def test_trust_secrets_mounted_signing_key_only_for_sources() -> None:
    from ferry_api.meta import selector_matches as _matches
    from ferry_operator.injection import inject, trust_mounts

    caches = [
        {
            "spec": {
                "trust": {"secretRef": "sig"},
                "sources": {"matchLabels": {"warm": "true"}},
                "targets": {"matchLabels": {"app": "inf"}},
            }
        },
        {
            "spec": {
                "sources": {"matchLabels": {"warm": "true"}},
                "targets": {"matchLabels": {"app": "inf"}},
            }
        },
    ]
    target = trust_mounts({"app": "inf"}, caches, _matches)
    source = trust_mounts({"app": "inf", "warm": "true"}, caches, _matches)
    assert [(m.secret, m.signer) for m in target] == [("sig", False)]
    assert [(m.secret, m.signer) for m in source] == [("sig", True)]
    vol = {v["name"]: v for v in inject(POD, InjectSettings(), target)["volumes"]}[
        "ferry-trust-sig"
    ]
    assert [i["key"] for i in vol["secret"]["items"]] == ["ed25519.pub"], (
        "targets never see the signing key"
    )
    spec = inject(POD, InjectSettings(), source)
    vol = {v["name"]: v for v in spec["volumes"]}["ferry-trust-sig"]
    assert {i["key"] for i in vol["secret"]["items"]} == {"ed25519.pub", "ed25519.key"}
    mounts = {m["mountPath"] for m in spec["initContainers"][0]["volumeMounts"]}
    assert "/etc/ferry/trust/sig" in mounts
    assert trust_mounts({"other": "x"}, caches, _matches) == []


def test_tp_rank_comes_from_the_sources_rank_label_through_the_downward_api() -> None:
    from ferry_api.meta import selector_matches
    from ferry_operator.injection import rank_label

    sources = [
        {
            "metadata": {"name": "b"},
            "spec": {
                "selector": {"matchLabels": {"app": "x"}},
                "layout": {"rankLabel": "example.com/rank"},
            },
        },
        {
            "metadata": {"name": "other"},
            "spec": {
                "selector": {"matchLabels": {"app": "y"}},
                "layout": {"rankLabel": "y.io/rank"},
            },
        },
    ]
    labels = {"app": "x", "example.com/rank": "1", "y.io/rank": "0"}
    assert rank_label(labels, sources, selector_matches) == "example.com/rank"
    assert rank_label({"app": "x"}, sources, selector_matches) is None
    assert (
        rank_label({"app": "z", "ferry.dev/tp-rank": "0"}, sources, selector_matches)
        == "ferry.dev/tp-rank"
    )
    agent = inject(POD, InjectSettings(), rank_label="example.com/rank")["initContainers"][0]
    env = {e["name"]: e for e in agent["env"]}
    assert (
        env["FERRY_TP_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
        == "metadata.labels['example.com/rank']"
    )
    assert "FERRY_TP_RANK" not in {
        e["name"] for e in inject(POD, InjectSettings())["initContainers"][0]["env"]
    }


def test_trust_volume_names_are_valid_unique_dns_labels() -> None:
    """Issue 19 (small ones, a): a Secret name with a `.` (valid for a Secret, not for a
    volume) and two long names sharing their first 51 characters must give valid,
    distinct volume names, each mounted under its own Secret's directory."""
    import re

    from ferry_operator.injection import TrustMount

    long_a, long_b = "signing-key-" + "x" * 50 + "-a", "signing-key-" + "x" * 50 + "-b"
    names = ["team.signing.v1", long_a, long_b, "sig"]
    trust = [TrustMount(n, "ed25519.pub", False) for n in names]
    spec = inject(POD, InjectSettings(), trust)
    vols = {
        v["secret"]["secretName"]: v["name"]
        for v in spec["volumes"]
        if "secret" in v and v["name"] != "ferry-token"
    }
    assert set(vols) == set(names)
    label = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    for secret, vol in vols.items():
        assert len(vol) <= 63 and label.match(vol), (
            f"{vol!r} (Secret {secret!r}) is no DNS-1123 label"
        )
    assert len(set(vols.values())) == len(names), f"volume names collide: {vols}"
    assert vols["sig"] == "ferry-trust-sig", "a short valid name stays readable"
    mounts = {m["name"]: m["mountPath"] for m in spec["initContainers"][0]["volumeMounts"]}
    assert {mounts[vols[n]] for n in names} == {f"/etc/ferry/trust/{n}" for n in names}


def test_liveness_probe_has_an_explicit_timeout() -> None:
    """Issue 19: the kubelet's default probe timeout (1 s) is shorter than a busy agent
    (a pull holding its cores) may take to answer /healthz; a restart mid-pull tears the
    weights. The probe says how long it waits."""
    agent = inject(POD, InjectSettings())["initContainers"][0]
    probe = agent["livenessProbe"]
    assert probe["httpGet"]["path"] == "/healthz"
    assert probe["timeoutSeconds"] >= 5
    assert probe["timeoutSeconds"] < probe["periodSeconds"]


def test_injected_agent_has_a_writable_artifact_store() -> None:
    """node17: the agent's root is read-only with no /tmp; its artifact store is an emptyDir
    of its own named by FERRY_ARTIFACT_STORE (tests/node found the crash without it)."""
    from ferry_operator.injection import ARTIFACT_DIR

    spec = inject(POD, InjectSettings())
    agent = spec["initContainers"][0]
    assert agent["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert env["FERRY_ARTIFACT_STORE"] == ARTIFACT_DIR
    mount = next(m for m in agent["volumeMounts"] if m["mountPath"] == ARTIFACT_DIR)
    assert not mount.get("readOnly")
    vols = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in vols[mount["name"]]
    assert all(
        m["mountPath"] != ARTIFACT_DIR for c in spec["containers"] for m in c["volumeMounts"]
    ), "the engine does not see the agent's archives"


def test_secrets_are_readable_by_a_non_root_agent_without_fs_group() -> None:
    """node17: with no pod fsGroup the Secret files are root:root; the agent (uid 65532)
    reads the token and trust keys only through the "other" bits (tests/node found
    PermissionError on /etc/ferry/token/token). No engine container mounts them."""
    from ferry_operator.injection import TrustMount

    spec = inject(POD, InjectSettings(), [TrustMount("sig", "ed25519.pub", signer=True)])
    secrets = {v["name"]: v["secret"] for v in spec["volumes"] if "secret" in v}
    assert set(secrets) == {"ferry-token", "ferry-trust-sig"}
    assert all(s["defaultMode"] & 0o004 for s in secrets.values())
    assert not any(m["name"] in secrets for c in spec["containers"] for m in c["volumeMounts"])


def test_a_pod_with_several_gpus_gets_an_agent_rank_per_gpu() -> None:
    """vLLM --tensor-parallel-size 2 in one pod: the agent serves local ranks 0 and 1."""
    pod = {
        "containers": [
            {"name": "vllm", "image": "vllm", "resources": {"limits": {"nvidia.com/gpu": "2"}}}
        ]
    }
    agent = inject(pod, InjectSettings())["initContainers"][0]
    assert {"name": "FERRY_DEVICES", "value": "0,1"} in agent["env"]
    one = {
        "containers": [{"name": "e", "image": "e", "resources": {"limits": {"nvidia.com/gpu": 1}}}]
    }
    assert not any(
        e["name"] == "FERRY_DEVICES"
        for e in inject(one, InjectSettings())["initContainers"][0]["env"]
    )
    assert not any(
        e["name"] == "FERRY_DEVICES"
        for e in inject(POD, InjectSettings())["initContainers"][0]["env"]
    )


def test_the_engine_loses_the_service_account_token_the_agent_gets_its_own() -> None:
    spec = {
        "containers": [
            {
                "name": "engine",
                "image": "e",
                "volumeMounts": [
                    {
                        "name": "kube-api-access-x1",
                        "mountPath": injection.KUBE_API_DIR,
                        "readOnly": True,
                    },
                    {"name": "vault", "mountPath": "/vault"},
                ],
            }
        ],
        "volumes": [
            {
                "name": "kube-api-access-x1",
                "projected": {
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}
                    ]
                },
            },
            {
                "name": "vault",
                "projected": {
                    "sources": [{"serviceAccountToken": {"audience": "vault", "path": "token"}}]
                },
            },
        ],
    }
    out = injection.inject(spec, injection.InjectSettings())
    assert out is not None and out["automountServiceAccountToken"] is False
    assert out["containers"][0]["volumeMounts"][0] == {"name": "vault", "mountPath": "/vault"}
    assert [
        m for m in out["containers"][0]["volumeMounts"] if m["mountPath"] == injection.KUBE_API_DIR
    ] == []
    names = {v["name"] for v in out["volumes"]}
    assert "kube-api-access-x1" not in names and {"vault", "ferry-kube-api"} <= names
    agent = out["initContainers"][0]
    assert {
        "name": "ferry-kube-api",
        "mountPath": injection.KUBE_API_DIR,
        "readOnly": True,
    } in agent["volumeMounts"]
