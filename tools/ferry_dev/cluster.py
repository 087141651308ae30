"""A local cluster that behaves like the real thing for Ferry: a real control plane,
the operator with its webhook, pods bound to (fake) nodes and marked Running,
and for each pod its agent as a local process with that pod's identity — this
harness stands in for the kubelet. Source engines load deterministic weights
through the engine client, the way a trainer would.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from ferry_api import times

from .controlplane import ControlPlane, free_port
from .kwok import HARNESS_ANNOTATION, KWOK_NODE_ANNOTATION, Kwok
from .operatorproc import OperatorProcess, start_operator

NODE_PREFIX = "dev-node-"
CACHE_KINDS = ("torch-compile", "triton", "deepgemm")


@dataclass
class AgentProc:
    pod: str
    role: str  # source | target
    proc: subprocess.Popen
    endpoint: str
    socket: str
    log: Path
    metrics_port: int | None = None
    cache_dir: Path | None = None  # per-kind subdirectories: FERRY_CACHE_DIRS


@dataclass
class DevCluster:
    workdir: Path
    sources: int = 1
    targets: int = 3
    namespace: str = "default"
    memory: str = "host"
    nodes: int = 2
    lease_seconds: int = 6
    renew_seconds: float = 1.0
    kwok_nodes: int = (
        0  # >0: kube-controller-manager, kube-scheduler, kwok and this many fake GPU nodes
    )
    cp: ControlPlane | None = None
    kwok: Kwok | None = None
    operator: OperatorProcess | None = None
    agents: dict[str, AgentProc] = field(default_factory=dict)
    token_file: Path = Path()
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every agent
    operator_env: dict[str, str] = field(default_factory=dict)  # e.g. FERRY_JOB_CHECK_SECONDS
    # The harness's agents hold their pod's bound token (agent_kubeconfig), but the peer
    # mTLS that the operator's signer enables is left to the tests that try it
    # (tests/e2e/agent/test_agent_peer_identity.py): these run in the explicit dev mode
    # (shared token, plaintext gRPC).
    peer_auth: str = "token"

    # -- lifecycle ----------------------------------------------------------------
    def up(self) -> DevCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cp = ControlPlane(workdir=self.workdir / "controlplane").start()
        self.cp.install_crds()
        self.cp.install_admission_policy()
        if self.kwok_nodes:
            self.kwok = Kwok(self.cp).start()
            self.kwok.add_gpu_nodes("gpu-node-", self.kwok_nodes)
        self.token_file = self.workdir / "token"
        self.token_file.write_text(hashlib.sha256(os.urandom(32)).hexdigest())
        self.token_file.chmod(0o600)
        self.start_operator()
        api = self.api()
        core = k8s_client.CoreV1Api(api)
        if self.namespace != "default":
            core.create_namespace({"metadata": {"name": self.namespace}})
        for sa in core.list_namespaced_service_account(self.namespace).items:
            if sa.metadata.name == "default":
                break
        else:
            try:
                core.create_namespaced_service_account(
                    self.namespace, {"metadata": {"name": "default"}}
                )
            except k8s_client.ApiException as exc:
                if exc.status != 409:  # kube-controller-manager (with kwok) made it meanwhile
                    raise
        self._grant_agents()
        for i in range(self.nodes):
            # With kwok these nodes are kept Ready by it too (so kube-controller-manager
            # does not evict their pods); their pods' status stays the harness's.
            annotations = {KWOK_NODE_ANNOTATION: "fake"} if self.kwok else {}
            core.create_node(
                {
                    "metadata": {
                        "name": f"{NODE_PREFIX}{i}",
                        "annotations": annotations,
                        "labels": {"kubernetes.io/hostname": f"{NODE_PREFIX}{i}"},
                    }
                }
            )
        # Agents start in parallel (each imports torch and NIXL): spawn all, then wait.
        pending = [
            self.add_pod(f"trainer-{i}", "source", {"app": "trainer"}, wait=False)
            for i in range(self.sources)
        ]
        pending += [
            self.add_pod(f"inference-{i}", "target", {"app": "inference"}, wait=False)
            for i in range(self.targets)
        ]
        for start in pending:
            if start is not None:
                start()
        return self

    def _grant_agents(self) -> None:
        """The chart's agent permissions (ferry_operator.rbac.AGENT) for the pods' ServiceAccount:
        each agent runs with its own pod's bound token (agent_kubeconfig)."""
        from ferry_operator import rbac

        api = k8s_client.RbacAuthorizationV1Api(self.api())
        api.create_namespaced_role(
            self.namespace, rbac.role("Role", "ferry-agent", rbac.AGENT, self.namespace)
        )
        api.create_namespaced_role_binding(
            self.namespace,
            {
                "metadata": {"name": "ferry-agent"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": "ferry-agent",
                },
                "subjects": [
                    {"kind": "ServiceAccount", "name": "default", "namespace": self.namespace}
                ],
            },
        )

    def agent_kubeconfig(self, pod: str, path: Path) -> Path:
        """A kubeconfig holding a token bound to `pod` (TokenRequest): what the kubelet
        projects into the agent container, so the apiserver's per-pod admission applies."""
        assert self.cp is not None
        core = k8s_client.CoreV1Api(self.api())
        obj = core.read_namespaced_pod(pod, self.namespace)
        token = core.create_namespaced_service_account_token(
            obj.spec.service_account_name or "default",
            self.namespace,
            {
                "spec": {
                    "audiences": [],
                    "expirationSeconds": 86400,
                    "boundObjectRef": {
                        "kind": "Pod",
                        "apiVersion": "v1",
                        "name": pod,
                        "uid": obj.metadata.uid,
                    },
                }
            },
        ).status.token
        config = yaml.safe_load(self.cp.kubeconfig.read_text())
        config["users"] = [{"name": pod, "user": {"token": token}}]
        config["contexts"][0]["context"]["user"] = pod
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def start_operator(self) -> None:
        assert self.cp is not None
        port = free_port()
        self.operator = start_operator(
            self.cp.kubeconfig,
            self.workdir / "operator.log",
            "--resync-seconds",
            "2",
            "--webhook-port",
            str(port),
            "--webhook-host",
            "127.0.0.1",
            env=self.operator_env,
        )
        self._wait_for_webhook(port)

    def _wait_for_webhook(self, port: int, timeout: float = 60.0) -> None:
        """Until the injection webhook points at this operator with a CA: healthz comes
        first, and the webhook's certificate (a Secret read, webhook.SharedSecret) and
        kopf's configuration write follow; a pod created before would get no sidecar."""
        adm = k8s_client.AdmissionregistrationV1Api(self.api())
        deadline = time.monotonic() + timeout
        while True:
            configs = [
                c
                for c in adm.list_mutating_webhook_configuration().items
                if c.metadata.name == "ferry.dev"
            ]
            hooks = [w for c in configs for w in c.webhooks or []]
            if any(
                w.client_config
                and w.client_config.ca_bundle
                and w.client_config.url
                and f":{port}/" in w.client_config.url
                for w in hooks
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the operator's webhook on port {port} was not configured "
                    f"within {timeout:.0f}s"
                )
            time.sleep(0.2)

    def stop_operator(self, kill: bool = False) -> None:
        if self.operator is not None:
            self.operator.stop(kill)
        self.operator = None

    def down(self) -> None:
        # Every agent says goodbye (Stale, Lease released) at once, then we wait.
        for a in self.agents.values():
            if a.proc.poll() is None:
                os.killpg(a.proc.pid, signal.SIGTERM)
        for a in list(self.agents.values()):
            self.stop_agent(a.pod)
        self.stop_operator()
        if self.kwok is not None:
            self.kwok.stop()
        if self.cp is not None:
            self.cp.stop()

    def api(self) -> k8s_client.ApiClient:
        assert self.cp is not None
        return k8s_config.new_client_from_config(config_file=str(self.cp.kubeconfig))

    # -- pods and agents ----------------------------------------------------------
    def add_pod(
        self,
        name: str,
        role: str,
        labels: dict[str, str],
        node: int | None = None,
        start_agent: bool = True,
        wait: bool = True,
        ranks: int = 1,
        env: dict[str, str] | None = None,
    ) -> Callable[[], AgentProc] | None:
        """Create a Running pod bound to a node and (unless told not to) start its agent;
        with wait=False, returns a function that waits for the agent to serve. `ranks`:
        the pod's GPUs (its agent's local ranks, FERRY_DEVICES=0,1,...; simulated in
        host memory); `env`: more environment for its agent."""
        core = k8s_client.CoreV1Api(self.api())
        node_name = f"{NODE_PREFIX}{(node if node is not None else len(self.agents)) % self.nodes}"
        core.create_namespaced_pod(
            self.namespace,
            {
                "metadata": {
                    "name": name,
                    "labels": {**labels, "ferry.dev/inject": "true"},
                    "annotations": {HARNESS_ANNOTATION: "harness"},
                },
                "spec": {
                    "nodeName": node_name,
                    "containers": [{"name": "engine", "image": "example.invalid/engine:dev"}],
                },
            },
        )
        now = times.stamp(times.now())
        core.patch_namespaced_pod_status(
            name,
            self.namespace,
            {
                "status": {
                    "phase": "Running",
                    "podIP": "127.0.0.1",
                    "hostIP": "127.0.0.1",
                    "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
                }
            },
        )
        if start_agent:
            finish = self.start_agent(name, role, node_name, wait=False, ranks=ranks, env=env)
            if wait:
                finish()
                return None
            return finish
        return None

    def start_agent(
        self,
        pod: str,
        role: str,
        node: str,
        wait: bool = True,
        ranks: int = 1,
        env: dict[str, str] | None = None,
    ) -> Any:
        assert self.cp is not None
        adir = self.workdir / "agents" / pod
        adir.mkdir(parents=True, exist_ok=True)
        ready = adir / "ready.json"
        ready.unlink(missing_ok=True)
        sock = str(adir / "agent.sock")
        extra = env or {}
        kubeconfig = self.agent_kubeconfig(pod, adir / "kubeconfig")
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "POD_NAME": pod,
            "POD_NAMESPACE": self.namespace,
            "POD_IP": "127.0.0.1",
            "NODE_NAME": node,
            "PYTHONUNBUFFERED": "1",
            "FERRY_LEASE_SECONDS": str(self.lease_seconds),
            "FERRY_RENEW_SECONDS": str(self.renew_seconds),
            # JIT caches per pod; trust keys in one folder (the stand-in for mounted Secrets)
            "FERRY_CACHE_DIRS": ";".join(f"{k}={adir / 'cache' / k}" for k in CACHE_KINDS),
            "FERRY_ARTIFACT_STORE": str(adir / "store"),
            "FERRY_TRUST_DIR": str(self.workdir / "trust"),
            **self.label_env(pod),
            **self.env,
            **extra,
        }
        if ranks > 1:
            env["FERRY_DEVICES"] = ",".join(map(str, range(ranks)))
        log = adir / "agent.log"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ferry_api.cli",
                "agent",
                "run",
                "--memory",
                self.memory,
                "--grpc-port",
                "0",
                "--grpc-host",
                "127.0.0.1",
                "--metrics-port",
                "0",
                "--control-socket",
                sock,
                "--token-file",
                str(self.token_file),
                "--slab-bytes",
                "256Mi",
                "--rails",
                "off",
                "--ready-file",
                str(ready),
                "--peer-auth",
                self.peer_auth,
            ],
            env=env,
            stdout=open(log, "ab"),
            stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True,
        )
        deadline = time.monotonic() + 60

        def finish() -> AgentProc:
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"agent {pod} did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.05)
            info = json.loads(ready.read_text())
            agent = AgentProc(
                pod,
                role,
                proc,
                info["endpoint"],
                sock,
                log,
                info.get("metrics_port"),
                adir / "cache",
            )
            self.agents[pod] = agent
            return agent

        return finish() if wait else finish

    def label_env(self, pod: str) -> dict[str, str]:
        """What the kubelet gives the injected agent from the pod's labels through the
        downward API (FERRY_TP_RANK from the rank label); without an injected agent,
        FERRY_TP_RANK from the default rank label."""
        obj = k8s_client.CoreV1Api(self.api()).read_namespaced_pod(pod, self.namespace)
        labels = obj.metadata.labels or {}
        agent = next((c for c in obj.spec.init_containers or [] if c.name == "ferry-agent"), None)
        if agent is None:
            rank = labels.get("ferry.dev/tp-rank")
            return {} if rank is None else {"FERRY_TP_RANK": rank}
        out = {}
        for e in agent.env or []:
            path = (
                e.value_from.field_ref.field_path if e.value_from and e.value_from.field_ref else ""
            )
            if path.startswith("metadata.labels['") and path.endswith("']"):
                out[e.name] = labels.get(path[len("metadata.labels['") : -2], "")
        return out

    def stop_agent(self, pod: str, kill: bool = False) -> None:
        a = self.agents.pop(pod, None)
        if a is None or a.proc.poll() is not None:
            return
        try:
            os.killpg(a.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            a.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(a.proc.pid, signal.SIGKILL)
            a.proc.wait()

    # -- weights --------------------------------------------------------------------
    def load_weights(self, pod: str, version: str, layout: list[dict[str, Any]], seed: int) -> str:
        """Declare `layout` on the pod's agent, write deterministic bytes, publish; returns their digest."""
        from ferry_agent.client import EngineClient

        with EngineClient.connect(self.agents[pod].socket) as c:
            views = c.declare({t["name"]: (t["dtype"], tuple(t["shape"])) for t in layout})
            with c.writing(version):
                fill(views, seed)
            return digest(views)

    def weights_digest(self, pod: str) -> str:
        from ferry_agent.client import EngineClient

        with EngineClient.connect(self.agents[pod].socket) as c:
            return digest(c.attach())


def demo_layout(tensors: int, total_bytes: int) -> list[dict[str, Any]]:
    """A transformer-like mix: big bf16 matrices, small fp32 norms, one int8 table."""
    out: list[dict[str, Any]] = []
    small = max(1, tensors // 3)
    big = tensors - small - 1
    per = max(4096, (total_bytes - 64 * 1024 * small) // max(1, big) // 2 * 2)
    cols = 1024
    for i in range(big):
        out.append(
            {
                "name": f"layers.{i}.weight",
                "dtype": "bfloat16",
                "shape": [max(1, per // 2 // cols), cols],
            }
        )
    for i in range(small):
        out.append({"name": f"layers.{i}.norm", "dtype": "float32", "shape": [4096 + 8 * i]})
    out.append({"name": "embed.codes", "dtype": "int8", "shape": [333, 77]})
    return out


def fill(views: dict[str, Any], seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    for name in sorted(views):
        t = views[name]
        raw = t.view(-1).view(torch.uint8) if t.dtype != torch.uint8 else t.view(-1)
        raw.copy_(torch.randint(0, 256, (raw.numel(),), dtype=torch.uint8, generator=gen))


def digest(views: dict[str, Any]) -> str:
    import torch

    h = hashlib.sha256()
    for name in sorted(views):
        t = views[name].contiguous().view(-1)
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
