"""kube-controller-manager, kube-scheduler and kwok next to a `ControlPlane`: pods
are scheduled onto fake GPU nodes and marked Running without any container.

Binaries come from `hack/kwok.sh` (KUBEBUILDER_ASSETS, the cache, or a Go
build of the same Kubernetes version as the apiserver, and kwok at a pinned
release). The fake nodes advertise `nvidia.com/gpu` and carry the labels GPU
feature discovery and node feature discovery would put on a real GPU node, so a
pod asking for `nvidia.com/gpu: 1` lands on one the way it would in a cluster.

Pods that a harness runs itself (a real agent process stands in for the kubelet,
as in `DevCluster`) carry `HARNESS_ANNOTATION`; kwok leaves their status alone.
"""

from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from .controlplane import REPO_ROOT, ControlPlane, ControlPlaneError, stop_all

BINARIES = ("kube-controller-manager", "kube-scheduler", "kwok", "etcdctl")
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
HARNESS_ANNOTATION = "ferry.dev/kubelet"  # value: "harness"; kwok does not touch such pods
GPU_RESOURCE = "nvidia.com/gpu"
POD_CIDR = "10.244.0.0/16"
# An H100 SXM node: 8 GPUs, one 400 Gb/s RDMA NIC per GPU.
GPU_NODE_LABELS = {
    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
    "nvidia.com/gpu.count": "8",
    "nvidia.com/gpu.memory": "81559",
    "feature.node.kubernetes.io/rdma.available": "true",
    "ferry.dev/rdma-nics": "8",
    "ferry.dev/nic-speed-gbps": "400",
}

# kwok's behaviour, as Stage objects (kwok.x-k8s.io/v1alpha1): a managed node turns
# Ready with its GPUs allocatable; a scheduled pod turns Running with an IP from
# POD_CIDR; a pod being deleted is removed, as a kubelet would once its containers stop.
STAGES = """\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {name: ferry-node-ready}
spec:
  resourceRef: {apiGroup: v1, kind: Node}
  selector:
    matchExpressions:
    - {key: '.status.conditions.[] | select( .type == "Ready" ) | .status', operator: NotIn, values: ['True']}
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      {{ range NodeConditions }}
      - {type: {{ .type | Quote }}, status: {{ .status | Quote }}, reason: {{ .reason | Quote }},
         message: {{ .message | Quote }}, lastHeartbeatTime: {{ $now | Quote }}, lastTransitionTime: {{ $now | Quote }}}
      {{ end }}
      addresses:
      - {type: InternalIP, address: {{ NodeIP | Quote }}}
      - {type: Hostname, address: {{ .metadata.name | Quote }}}
      {{ $gpus := or (index .metadata.labels "nvidia.com/gpu.count") "0" }}
      capacity: {cpu: "192", memory: 2Ti, pods: "110", nvidia.com/gpu: {{ $gpus | Quote }}}
      allocatable: {cpu: "192", memory: 2Ti, pods: "110", nvidia.com/gpu: {{ $gpus | Quote }}}
      nodeInfo: {architecture: amd64, operatingSystem: linux, kubeletVersion: {{ printf "kwok-%s" Version | Quote }},
                 kubeProxyVersion: "", containerRuntimeVersion: kwok, kernelVersion: kwok, osImage: kwok,
                 machineID: "", bootID: "", systemUUID: ""}
      phase: Running
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {name: ferry-pod-running}
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - {key: '.metadata.deletionTimestamp', operator: DoesNotExist}
    - {key: '.metadata.annotations."ferry.dev/kubelet"', operator: DoesNotExist}
    - {key: '.status.phase', operator: In, values: [Pending]}
  next:
    statusTemplate: |
      {{ $now := Now }}
      phase: Running
      startTime: {{ $now | Quote }}
      hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
      {{ $ip := PodIPWith .spec.nodeName false .metadata.uid .metadata.name .metadata.namespace }}
      podIP: {{ $ip | Quote }}
      podIPs: [{ip: {{ $ip | Quote }}}]
      conditions:
      {{ range list "PodScheduled" "Initialized" "ContainersReady" "Ready" }}
      - {type: {{ . }}, status: "True", lastTransitionTime: {{ $now | Quote }}}
      {{ end }}
      containerStatuses:
      {{ range .spec.containers }}
      - {name: {{ .name | Quote }}, image: {{ .image | Quote }}, ready: true, started: true, restartCount: 0,
         state: {running: {startedAt: {{ $now | Quote }}}}}
      {{ end }}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {name: ferry-pod-delete}
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - {key: '.metadata.deletionTimestamp', operator: Exists}
  next:
    delete: true
"""


def kwok_dir() -> Path:
    """Directory holding BINARIES: FERRY_KWOK_DIR, KUBEBUILDER_ASSETS, or hack/kwok.sh."""
    for var in ("FERRY_KWOK_DIR", "KUBEBUILDER_ASSETS"):
        value = os.environ.get(var)
        if value and all((Path(value) / b).exists() for b in BINARIES):
            return Path(value)
    out = subprocess.run(
        [str(REPO_ROOT / "hack" / "kwok.sh")], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def gpu_node(name: str, labels: dict[str, str] | None = None) -> dict:
    return {
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "type": "kwok",
                **GPU_NODE_LABELS,
                **(labels or {}),
            },
            "annotations": {KWOK_NODE_ANNOTATION: "fake"},
        }
    }


@dataclass
class Kwok:
    """Owns kube-controller-manager, kube-scheduler and kwok for `cp`; `stop()` ends exactly those."""

    cp: ControlPlane
    bin_dir: Path | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self, timeout: float = 60.0) -> Kwok:
        bins = self.bin_dir = self.bin_dir or kwok_dir()
        work = self.cp.workdir
        pki = work / "pki"
        logs = work / "logs"
        (work / "kwok-stages.yaml").write_text(STAGES)
        kubeconfig = str(self.cp.kubeconfig)
        # Service-account tokens are signed with the apiserver's key; the default
        # ServiceAccount of every namespace comes from here, as in a cluster.
        self._spawn(
            [
                str(bins / "kube-controller-manager"),
                "--kubeconfig",
                kubeconfig,
                "--leader-elect=false",
                "--secure-port=0",
                "--use-service-account-credentials=false",
                "--service-account-private-key-file",
                str(pki / "sa.key"),
                "--root-ca-file",
                str(pki / "ca.crt"),
                "--controllers=*,-bootstrap-signer-controller,-token-cleaner-controller",
                "--kube-api-qps=500",
                "--kube-api-burst=1000",
                "--v=1",
            ],
            logs / "kube-controller-manager.log",
        )
        self._spawn(
            [
                str(bins / "kube-scheduler"),
                "--kubeconfig",
                kubeconfig,
                "--authentication-kubeconfig",
                kubeconfig,
                "--authorization-kubeconfig",
                kubeconfig,
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                "--kube-api-qps=500",
                "--kube-api-burst=1000",
                "--v=1",
            ],
            logs / "kube-scheduler.log",
        )
        self._spawn(
            [
                str(bins / "kwok"),
                "--kubeconfig",
                kubeconfig,
                "--config",
                str(work / "kwok-stages.yaml"),
                "--manage-nodes-with-annotation-selector",
                f"{KWOK_NODE_ANNOTATION}=fake",
                "--cidr",
                POD_CIDR,
                "--node-ip",
                "10.0.0.1",
                # Node Leases renewed by kwok keep kube-controller-manager from
                # marking the fake nodes unreachable.
                "--node-lease-duration-seconds",
                "40",
                "--server-address",
                "127.0.0.1:0",
            ],
            logs / "kwok.log",
        )
        self._wait_default_service_account(timeout)
        return self

    def _spawn(self, argv: list[str], log: Path) -> None:
        out = open(log, "ab")  # noqa: SIM115 - lives as long as the process
        self.procs.append(
            subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def api(self) -> k8s_client.ApiClient:
        return k8s_config.new_client_from_config(config_file=str(self.cp.kubeconfig))

    def _check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                name = Path(proc.args[0]).name
                self.stop()
                raise ControlPlaneError(
                    f"{name} exited with {proc.returncode}; logs in {self.cp.workdir / 'logs'}"
                )

    def _wait_default_service_account(self, timeout: float) -> None:
        """kube-controller-manager is up once it has made `default`'s ServiceAccount."""
        core = k8s_client.CoreV1Api(self.api())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if core.list_namespaced_service_account("default").items:
                return
            time.sleep(0.3)
        self.stop()
        raise ControlPlaneError(f"kube-controller-manager made no ServiceAccount in {timeout:.0f}s")

    def add_gpu_nodes(
        self, prefix: str, count: int, labels: dict[str, str] | None = None, timeout: float = 60.0
    ) -> list[str]:
        """Create `count` fake 8-GPU nodes and wait until kwok has made them Ready."""
        api = self.api()
        core = k8s_client.CoreV1Api(api)
        names = [f"{prefix}{i:03d}" for i in range(count)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: core.create_node(gpu_node(n, labels)), names))
        want = set(names)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            ready = {
                n.metadata.name
                for n in core.list_node().items
                if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])
                and (n.status.allocatable or {}).get(GPU_RESOURCE)
            }
            if want <= ready:
                return names
            time.sleep(0.3)
        raise ControlPlaneError(
            f"{len(want - ready)} of {count} kwok nodes not Ready in {timeout:.0f}s"
        )

    def stop(self) -> None:
        stop_all(self.procs, grace_s=5)
