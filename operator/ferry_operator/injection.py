"""The agent sidecar added to pods labelled `ferry.dev/inject: "true"` (pure).

The agent runs as a native sidecar: an init container with restartPolicy
Always, so it starts before the engine, keeps running beside it, and stops
after it. It shares with every app container:
- /dev/shm (host-memory slabs are POSIX shared memory the engine maps), and
- /var/run/ferry (the Unix socket the engine's client library talks to).

Only the agent holds the pod's Kubernetes credentials: the pod gets
`automountServiceAccountToken: false`, the token volume the ServiceAccount admission
plugin may already have added (it runs before webhooks) is taken out of every other
container, and the agent alone mounts a projected token at the standard in-cluster
path, so its client (`load_incluster_config`) reads it unchanged. The apiserver
confines what that token may write to the pod's own entries (ferry_operator.admission).

A pod carrying the tensor-parallel rank label of a WeightSource that selects it
(spec.layout.rankLabel, `ferry.dev/tp-rank` by default) gets FERRY_TP_RANK from
that label through the downward API; its agent reports it as its `rank`.

A pod whose engine container asks for G > 1 GPUs (`nvidia.com/gpu` limit; vLLM
`--tensor-parallel-size G` in one pod) gets FERRY_DEVICES=0,...,G-1: its agent serves
one local rank per GPU (ferry_api.ranks; the WeightSource's spec.layout.ranksPerPod
and a RefitJob's spec.targetRanksPerPod say the same count).
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any

INJECT_LABEL = "ferry.dev/inject"
GPU_RESOURCE = "nvidia.com/gpu"
AGENT_NAME = "ferry-agent"
SOCKET_DIR = "/var/run/ferry"
TOKEN_DIR = "/etc/ferry/token"
TRUST_DIR = "/etc/ferry/trust"
# node17: Secret files are root-owned unless the pod sets fsGroup (most engine pods do
# not, and setting one would chown the user's volumes), so a non-root agent reads them
# only through "other": 0444. They are mounted into the agent container alone, so no
# other uid sees them either way.
SECRET_MODE = 0o444
# node17: the agent's root filesystem is read-only and it has no /tmp; packed
# artifact archives go to an emptyDir of its own (FERRY_ARTIFACT_STORE).
ARTIFACT_DIR = "/var/lib/ferry/artifacts"
PRIVATE_KEY = "ed25519.key"
# Where client libraries look for in-cluster credentials (token, ca.crt, namespace).
KUBE_API_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
KUBE_API_VOLUME = "ferry-kube-api"
# How long the kubelet's own projected token lives (kube-api-access-*: 3607 s, rotated at 80%).
TOKEN_SECONDS = 3607
DEFAULT_RANK_LABEL = "ferry.dev/tp-rank"
GRPC_PORT = 50051
METRICS_PORT = 9400


@dataclass(frozen=True)
class InjectSettings:
    image: str = "ghcr.io/ferry-dev/ferry-agent:0.1.0"
    token_secret: str = "ferry-agent-token"
    memory_mode: str = "cuda"
    rails: str = "auto"
    requests: dict[str, str] = field(default_factory=lambda: {"cpu": "500m", "memory": "1Gi"})
    limits: dict[str, str] = field(default_factory=lambda: {"memory": "4Gi"})
    shm_size: str | None = None  # emptyDir sizeLimit for /dev/shm; None: node default
    failure_policy: str = "Fail"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> InjectSettings:
        env = dict(os.environ if env is None else env)
        d = cls()
        return cls(
            image=env.get("FERRY_AGENT_IMAGE", d.image),
            token_secret=env.get("FERRY_AGENT_TOKEN_SECRET", d.token_secret),
            memory_mode=env.get("FERRY_AGENT_MEMORY", d.memory_mode),
            rails=env.get("FERRY_AGENT_RAILS", d.rails),
            requests={
                "cpu": env.get("FERRY_AGENT_CPU_REQUEST", "500m"),
                "memory": env.get("FERRY_AGENT_MEMORY_REQUEST", "1Gi"),
            },
            limits={"memory": env.get("FERRY_AGENT_MEMORY_LIMIT", "4Gi")},
            shm_size=env.get("FERRY_AGENT_SHM_SIZE") or None,
            failure_policy=env.get("FERRY_WEBHOOK_FAILURE_POLICY", d.failure_policy),
        )


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def agent_container(s: InjectSettings) -> dict[str, Any]:
    return {
        "name": AGENT_NAME,
        "image": s.image,
        "restartPolicy": "Always",
        "args": [
            "agent",
            "run",
            "--memory",
            s.memory_mode,
            "--rails",
            s.rails,
            "--grpc-port",
            str(GRPC_PORT),
            "--metrics-port",
            str(METRICS_PORT),
            "--control-socket",
            f"{SOCKET_DIR}/agent.sock",
            "--token-file",
            f"{TOKEN_DIR}/token",
        ],
        "env": [
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
            _field_env("POD_IP", "status.podIP"),
            _field_env("NODE_NAME", "spec.nodeName"),
            {"name": "FERRY_ARTIFACT_STORE", "value": ARTIFACT_DIR},  # node17
        ],
        "ports": [
            {"name": "ferry-grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "ferry-metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "resources": {"requests": dict(s.requests), "limits": dict(s.limits)},
        "volumeMounts": [
            {"name": "ferry-shm", "mountPath": "/dev/shm"},
            {"name": "ferry-socket", "mountPath": SOCKET_DIR},
            {"name": "ferry-token", "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": "ferry-artifacts", "mountPath": ARTIFACT_DIR},  # node17
            {"name": KUBE_API_VOLUME, "mountPath": KUBE_API_DIR, "readOnly": True},
        ],
        # Native sidecars must pass their startup probe before the app containers
        # start: /startupz turns 200 once caches are installed (or given up on).
        "startupProbe": {
            "httpGet": {"path": "/startupz", "port": "ferry-metrics"},
            "periodSeconds": 2,
            "failureThreshold": 900,
        },
        # 5 s, not the kubelet's 1 s default: an agent whose cores a pull keeps busy may
        # answer late, and a restart mid-pull leaves its slabs holding no version.
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "ferry-metrics"},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }


@dataclass(frozen=True)
class TrustMount:
    """An ArtifactCache trust Secret for this pod: sources get the signing key, targets only the public key."""

    secret: str
    public_key: str
    signer: bool


_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def trust_volume_name(secret: str) -> str:
    """A DNS-1123 label (what the apiserver requires of a volume name) unique per Secret.
    A Secret name is a DNS subdomain: it may hold dots and run to 253 characters, so
    `ferry-trust-<secret>` is kept only when it already is a label; otherwise the
    name is cleaned, cut, and given a hash of the whole Secret name, so that two
    names equal after cleaning or cutting still get different volumes."""
    plain = f"ferry-trust-{secret}"
    if len(plain) <= 63 and _LABEL.match(plain):
        return plain
    digest = hashlib.sha256(secret.encode()).hexdigest()[:10]
    stem = re.sub(r"[^a-z0-9-]+", "-", plain.lower())[: 63 - len(digest) - 1].strip("-")
    return f"{stem}-{digest}"


def trust_volume(m: TrustMount) -> dict[str, Any]:
    items = [{"key": m.public_key, "path": m.public_key}]
    if m.signer:
        items.append({"key": PRIVATE_KEY, "path": PRIVATE_KEY})
    return {
        "name": trust_volume_name(m.secret),
        "secret": {"secretName": m.secret, "items": items, "defaultMode": SECRET_MODE},
    }  # node17


def kube_api_volume() -> dict[str, Any]:
    """The agent's credentials: what the ServiceAccount admission plugin would mount
    (a bound token the kubelet rotates, the cluster CA, the namespace)."""
    return {
        "name": KUBE_API_VOLUME,
        "projected": {
            "defaultMode": SECRET_MODE,
            "sources": [
                {"serviceAccountToken": {"expirationSeconds": TOKEN_SECONDS, "path": "token"}},
                {
                    "configMap": {
                        "name": "kube-root-ca.crt",
                        "items": [{"key": "ca.crt", "path": "ca.crt"}],
                    }
                },
                {
                    "downwardAPI": {
                        "items": [
                            {
                                "path": "namespace",
                                "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                            }
                        ]
                    }
                },
            ],
        },
    }


def _token_volumes(volumes: list[dict[str, Any]]) -> set[str]:
    """Volumes that carry a service-account token for the apiserver (the admission plugin's
    kube-api-access-*). A token for another audience (e.g. a Vault role) stays: the
    apiserver does not accept it."""
    return {
        v["name"]
        for v in volumes
        if any(
            "serviceAccountToken" in src and not (src["serviceAccountToken"] or {}).get("audience")
            for src in (v.get("projected") or {}).get("sources") or []
        )
    }


def strip_credentials(spec: dict[str, Any]) -> None:
    """No container of `spec` mounts a service-account token any more; token volumes
    nobody mounts then are dropped. The pod stops automounting one."""
    spec["automountServiceAccountToken"] = False
    tokens = _token_volumes(spec.get("volumes") or [])
    for key in ("containers", "initContainers", "ephemeralContainers"):
        for c in spec.get(key) or []:
            if c.get("volumeMounts"):
                c["volumeMounts"] = [
                    m
                    for m in c["volumeMounts"]
                    if m.get("name") not in tokens and m.get("mountPath") != KUBE_API_DIR
                ]
    used = {
        m.get("name")
        for key in ("containers", "initContainers", "ephemeralContainers")
        for c in spec.get(key) or []
        for m in c.get("volumeMounts") or []
    }
    spec["volumes"] = [v for v in spec.get("volumes") or [] if v["name"] not in tokens - used]


def inject(
    pod_spec: dict[str, Any],
    s: InjectSettings,
    trust: list[TrustMount] | None = None,
    rank_label: str | None = None,
) -> dict[str, Any] | None:
    """The pod spec with the sidecar added, or None when it is already there (idempotent)."""
    if any(c.get("name") == AGENT_NAME for c in pod_spec.get("initContainers") or []):
        return None
    spec = copy.deepcopy(pod_spec)
    strip_credentials(spec)
    volumes = spec.setdefault("volumes", [])
    have = {v["name"] for v in volumes}
    shm: dict[str, Any] = {"medium": "Memory"}
    if s.shm_size:
        shm["sizeLimit"] = s.shm_size
    for vol in (
        {"name": "ferry-shm", "emptyDir": shm},
        {"name": "ferry-socket", "emptyDir": {}},
        {
            "name": "ferry-token",
            "secret": {"secretName": s.token_secret, "defaultMode": SECRET_MODE},
        },  # node17
        {"name": "ferry-artifacts", "emptyDir": {}},  # node17: the agent's only writable dir
        kube_api_volume(),
    ):
        if vol["name"] not in have:
            volumes.append(vol)
    for container in spec.get("containers") or []:
        mounts = container.setdefault("volumeMounts", [])
        paths = {m.get("mountPath") for m in mounts}
        if "/dev/shm" not in paths:
            mounts.append({"name": "ferry-shm", "mountPath": "/dev/shm"})
        if SOCKET_DIR not in paths:
            mounts.append({"name": "ferry-socket", "mountPath": SOCKET_DIR})
        env = container.setdefault("env", [])
        if not any(e.get("name") == "FERRY_AGENT_SOCKET" for e in env):
            env.append({"name": "FERRY_AGENT_SOCKET", "value": f"{SOCKET_DIR}/agent.sock"})
    agent = agent_container(s)
    agent["env"].append({"name": "FERRY_TRUST_DIR", "value": TRUST_DIR})
    gpus = pod_gpus(spec)
    if gpus > 1:
        agent["env"].append({"name": "FERRY_DEVICES", "value": ",".join(map(str, range(gpus)))})
    if rank_label:
        agent["env"].append(_field_env("FERRY_TP_RANK", f"metadata.labels['{rank_label}']"))
    for m in sorted(trust or [], key=lambda m: m.secret):
        vol = trust_volume(m)
        if vol["name"] not in have:
            volumes.append(vol)
        agent["volumeMounts"].append(
            {"name": vol["name"], "mountPath": f"{TRUST_DIR}/{m.secret}", "readOnly": True}
        )
    # The agent goes first so it is up before any other init container or the engine.
    spec["initContainers"] = [agent, *(spec.get("initContainers") or [])]
    return spec


def pod_gpus(pod_spec: dict[str, Any]) -> int:
    """The most GPUs (`nvidia.com/gpu` limit) one app container of the pod asks for."""
    most = 0
    for c in pod_spec.get("containers") or []:
        value = str(((c.get("resources") or {}).get("limits") or {}).get(GPU_RESOURCE, "0"))
        most = max(most, int(value) if value.isdigit() else 0)
    return most


def trust_mounts(
    pod_labels: dict[str, str], caches: list[dict[str, Any]], matches: Any
) -> list[TrustMount]:
    """Trust Secrets of the ArtifactCaches that select this pod (`matches(selector, labels)`)."""
    out: dict[str, TrustMount] = {}
    for ac in caches:
        spec = ac.get("spec") or {}
        trust = spec.get("trust")
        if not trust or not trust.get("secretRef"):  # allowUnsigned alone: no Secret to mount
            continue
        signer = matches(spec.get("sources") or {}, pod_labels)
        if not signer and not matches(spec.get("targets") or {}, pod_labels):
            continue
        name, key = trust["secretRef"], trust.get("key", "ed25519.pub")
        prev = out.get(name)
        out[name] = TrustMount(name, key, signer or bool(prev and prev.signer))
    return list(out.values())


def rank_label(
    pod_labels: dict[str, str], sources: list[dict[str, Any]], matches: Any
) -> str | None:
    """The rank label this pod carries: the spec.layout.rankLabel of the first
    WeightSource (by name) that selects it and whose label it has, else the default
    label if present; None when it carries none (FERRY_TP_RANK is then not set)."""
    for ws in sorted(sources, key=lambda w: (w.get("metadata") or {}).get("name", "")):
        spec = ws.get("spec") or {}
        label = (spec.get("layout") or {}).get("rankLabel") or DEFAULT_RANK_LABEL
        if label in pod_labels and matches(spec.get("selector") or {}, pod_labels):
            return label
    return DEFAULT_RANK_LABEL if DEFAULT_RANK_LABEL in pod_labels else None
