"""The agent sidecar added to pods labelled `ferry.dev/inject: "true"` (pure).

The agent runs as a native sidecar: an init container with restartPolicy
Always, so it starts before the engine, keeps running beside it, and stops
after it. It shares with every app container:
- /dev/shm (host-memory slabs are POSIX shared memory the engine maps), and
- /var/run/ferry (the Unix socket the engine's client library talks to).

A pod carrying the tensor-parallel rank label of a WeightSource that selects it
(spec.layout.rankLabel, `ferry.dev/tp-rank` by default) gets FERRY_TP_RANK from
that label through the downward API; its agent reports it as its `rank`.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

INJECT_LABEL = "ferry.dev/inject"
AGENT_NAME = "ferry-agent"
SOCKET_DIR = "/var/run/ferry"
TOKEN_DIR = "/etc/ferry/token"
TRUST_DIR = "/etc/ferry/trust"
PRIVATE_KEY = "ed25519.key"
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
            requests={"cpu": env.get("FERRY_AGENT_CPU_REQUEST", "500m"),
                      "memory": env.get("FERRY_AGENT_MEMORY_REQUEST", "1Gi")},
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
        "args": ["agent", "run", "--memory", s.memory_mode, "--rails", s.rails,
                 "--grpc-port", str(GRPC_PORT), "--metrics-port", str(METRICS_PORT),
                 "--control-socket", f"{SOCKET_DIR}/agent.sock", "--token-file", f"{TOKEN_DIR}/token"],
        "env": [
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
            _field_env("POD_IP", "status.podIP"),
            _field_env("NODE_NAME", "spec.nodeName"),
        ],
        "ports": [{"name": "ferry-grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
                  {"name": "ferry-metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "resources": {"requests": dict(s.requests), "limits": dict(s.limits)},
        "volumeMounts": [
            {"name": "ferry-shm", "mountPath": "/dev/shm"},
            {"name": "ferry-socket", "mountPath": SOCKET_DIR},
            {"name": "ferry-token", "mountPath": TOKEN_DIR, "readOnly": True},
        ],
        # Native sidecars must pass their startup probe before the app containers
        # start: /startupz turns 200 once caches are installed (or given up on).
        "startupProbe": {"httpGet": {"path": "/startupz", "port": "ferry-metrics"},
                         "periodSeconds": 2, "failureThreshold": 900},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "ferry-metrics"},
                          "periodSeconds": 10, "failureThreshold": 3},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
    }


@dataclass(frozen=True)
class TrustMount:
    """An ArtifactCache trust Secret for this pod: sources get the signing key, targets only the public key."""

    secret: str
    public_key: str
    signer: bool


def trust_volume(m: TrustMount) -> dict[str, Any]:
    items = [{"key": m.public_key, "path": m.public_key}]
    if m.signer:
        items.append({"key": PRIVATE_KEY, "path": PRIVATE_KEY})
    return {"name": f"ferry-trust-{m.secret}"[:63],
            "secret": {"secretName": m.secret, "items": items, "defaultMode": 0o440}}


def inject(pod_spec: dict[str, Any], s: InjectSettings,
           trust: list[TrustMount] | None = None, rank_label: str | None = None) -> dict[str, Any] | None:
    """The pod spec with the sidecar added, or None when it is already there (idempotent)."""
    if any(c.get("name") == AGENT_NAME for c in pod_spec.get("initContainers") or []):
        return None
    spec = copy.deepcopy(pod_spec)
    volumes = spec.setdefault("volumes", [])
    have = {v["name"] for v in volumes}
    shm: dict[str, Any] = {"medium": "Memory"}
    if s.shm_size:
        shm["sizeLimit"] = s.shm_size
    for vol in ({"name": "ferry-shm", "emptyDir": shm},
                {"name": "ferry-socket", "emptyDir": {}},
                {"name": "ferry-token", "secret": {"secretName": s.token_secret, "defaultMode": 0o440}}):
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
    if rank_label:
        agent["env"].append(_field_env("FERRY_TP_RANK", f"metadata.labels['{rank_label}']"))
    for m in sorted(trust or [], key=lambda m: m.secret):
        vol = trust_volume(m)
        if vol["name"] not in have:
            volumes.append(vol)
        agent["volumeMounts"].append({"name": vol["name"], "mountPath": f"{TRUST_DIR}/{m.secret}",
                                      "readOnly": True})
    # The agent goes first so it is up before any other init container or the engine.
    spec["initContainers"] = [agent, *(spec.get("initContainers") or [])]
    return spec


def trust_mounts(pod_labels: dict[str, str], caches: list[dict[str, Any]],
                 matches: Any) -> list[TrustMount]:
    """Trust Secrets of the ArtifactCaches that select this pod (`matches(selector, labels)`)."""
    out: dict[str, TrustMount] = {}
    for ac in caches:
        spec = ac.get("spec") or {}
        trust = spec.get("trust")
        if not trust:
            continue
        signer = matches(spec.get("sources") or {}, pod_labels)
        if not signer and not matches(spec.get("targets") or {}, pod_labels):
            continue
        name, key = trust["secretRef"], trust.get("key", "ed25519.pub")
        prev = out.get(name)
        out[name] = TrustMount(name, key, signer or bool(prev and prev.signer))
    return list(out.values())


def rank_label(pod_labels: dict[str, str], sources: list[dict[str, Any]], matches: Any) -> str | None:
    """The rank label this pod carries: the spec.layout.rankLabel of the first
    WeightSource (by name) that selects it and whose label it has, else the default
    label if present; None when it carries none (FERRY_TP_RANK is then not set)."""
    for ws in sorted(sources, key=lambda w: (w.get("metadata") or {}).get("name", "")):
        spec = ws.get("spec") or {}
        label = (spec.get("layout") or {}).get("rankLabel") or DEFAULT_RANK_LABEL
        if label in pod_labels and matches(spec.get("selector") or {}, pod_labels):
            return label
    return DEFAULT_RANK_LABEL if DEFAULT_RANK_LABEL in pod_labels else None
