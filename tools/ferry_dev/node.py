"""A real node next to a `ControlPlane`: containerd, runc and CNI from Debian's
packages, kubelet and kube-proxy built from the apiserver's Kubernetes version
(`hack/node.sh`). Ferry's pods run as real containers.

What this machine needs, set explicitly (the machine is itself a container:
cgroup v1, no systemd, no registry access):
- kubelet `cgroupDriver: cgroupfs` (no systemd to delegate to) and
  `failCgroupV1: false` (kubelet >= 1.35 refuses cgroup v1 otherwise);
  containerd's runc `SystemdCgroup = false` to match.
- containerd `restrict_oom_score_adj = true`: the CRI asks for a negative
  oom_score_adj for the sandbox (-998) and this container may not lower it
  (runc fails with "can't get final child's PID from pipe").
- `failSwapOn: false`, no node-allocatable enforcement, no local-storage
  isolation, no eviction and image GC at 99/100 %: the host is shared and
  these would evict or refuse the tests' pods for the host's state.
- A local sandbox ("pause") image (`images.build("pause")`) and
  `imagePullPolicy: Never` images imported into containerd: no registry.
- Pod network: a bridge (`ferry0`, BRIDGE_CIDR) with host-local IPAM; pods get
  addresses only inside their own network namespaces on it. The node's address
  is the bridge's gateway, so `kubectl logs/exec` reach the kubelet there, and the
  apiserver advertises it: kube-proxy (iptables mode) maps the `kubernetes`
  Service's ClusterIP to it for in-cluster clients (the agent, the operator).
- Webhooks: the apiserver dials Service endpoints (pod IPs on the bridge)
  directly (`--enable-aggregator-routing=true`); it does not need kube-proxy.

`stop()` deletes nothing it did not make: it stops kube-proxy, kubelet and
containerd by PID (each in its own session), then unmounts what is left under the
kubelet's root, deletes the bridge and removes the iptables chains kube-proxy made.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from . import images
from .controlplane import REPO_ROOT, ControlPlane, ControlPlaneError, free_port, stop_all

BINARIES = ("kubelet", "kube-proxy")
HOST_TOOLS = {
    "containerd": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "iptables": "iptables",
    "ip": "iproute2",
}
CNI_BIN_DIR = Path("/usr/lib/cni")
BRIDGE = "ferry0"
BRIDGE_CIDR = "10.250.0.0/24"
GATEWAY = "10.250.0.1"
NODE_NAME = "ferry-node"
SERVICE_CIDR = "10.96.0.0/16"  # ControlPlane's --service-cluster-ip-range
NAMESPACE_K8S = "k8s.io"  # containerd namespace the CRI uses


def node_dir() -> Path:
    """Directory holding BINARIES: FERRY_NODE_DIR, KUBEBUILDER_ASSETS, or hack/node.sh."""
    for var in ("FERRY_NODE_DIR", "KUBEBUILDER_ASSETS"):
        value = os.environ.get(var)
        if value and all((Path(value) / b).exists() for b in BINARIES):
            return Path(value)
    out = subprocess.run(
        [str(REPO_ROOT / "hack" / "node.sh")], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def host_problems() -> list[str]:
    """Why this host cannot run a real node (empty when it can): the skip reason."""
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root (containerd, network namespaces, mounts)")
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        problems.append(f"missing Debian packages: apt-get install {' '.join(missing)}")
    if not (CNI_BIN_DIR / "bridge").exists():
        problems.append("missing CNI plugins: apt-get install containernetworking-plugins")
    if not Path("/sys/fs/cgroup").exists():
        problems.append("no /sys/fs/cgroup")
    return problems


def apiserver_args() -> list[str]:
    """What the ControlPlane needs for pods to reach it and for it to reach pods."""
    return [
        "--bind-address",
        "0.0.0.0",
        "--advertise-address",
        GATEWAY,
        "--enable-aggregator-routing=true",
        # Reach the kubelet (logs, exec) at the node's InternalIP, not its unresolvable name.
        "--kubelet-preferred-address-types=InternalIP",
    ]


def containerd_config(work: Path, cache: Path, pause_ref: str) -> str:
    return f"""\
version = 2
root = "{cache}/containerd-root"
state = "{work}/containerd-state"
[grpc]
  address = "{work}/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_ref}"
  restrict_oom_score_adj = true
  enable_unprivileged_ports = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{work}/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
"""


def cni_conflist() -> dict:
    return {
        "cniVersion": "0.4.0",
        "name": "ferry",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": BRIDGE_CIDR, "gateway": GATEWAY}]],
                    # Only Service ClusterIPs are routed (via the bridge, where
                    # kube-proxy's DNAT applies): no default route off this host.
                    "routes": [{"dst": SERVICE_CIDR, "gw": GATEWAY}],
                    "dataDir": "/var/lib/cni/ferry-networks",
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(work: Path) -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{work}/containerd.sock",
        "address": GATEWAY,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzPort": 0,
        # The apiserver calls the kubelet (logs, exec) without a client certificate; the
        # kubelet listens only on the bridge address, reachable from this host alone.
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "enforceNodeAllocatable": [],
        "localStorageCapacityIsolation": False,
        "evictionHard": {},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "resolvConf": "",
        "serializeImagePulls": False,
        "podLogsDir": str(work / "pod-logs"),
        "syncFrequency": "5s",
        "fileCheckFrequency": "5s",
        "nodeStatusUpdateFrequency": "5s",
    }


def kube_proxy_config(kubeconfig: Path) -> dict:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": NODE_NAME,
        "clusterCIDR": BRIDGE_CIDR,
        "bindAddress": "127.0.0.1",
        "healthzBindAddress": f"127.0.0.1:{free_port()}",
        "metricsBindAddress": f"127.0.0.1:{free_port()}",
        # This machine is a container: leave the host's conntrack sysctls alone.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }


@dataclass
class Node:
    """Owns containerd, kubelet and kube-proxy for `cp`; `stop()` ends exactly those."""

    cp: ControlPlane
    bin_dir: Path | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)
    imported: list[str] = field(default_factory=list)

    @property
    def work(self) -> Path:
        return self.cp.workdir / "node"

    @property
    def socket(self) -> Path:
        return self.work / "containerd.sock"

    def start(self, timeout: float = 120.0) -> Node:
        problems = host_problems()
        if problems:
            raise ControlPlaneError("cannot run a real node here: " + "; ".join(problems))
        bins = self.bin_dir = self.bin_dir or node_dir()
        work = self.work
        logs = self.cp.workdir / "logs"
        for d in (work / "cni", work / "kubelet", work / "pod-logs"):
            d.mkdir(parents=True, exist_ok=True)
        cache = images.cache_dir().parent
        pause = images.build("pause")
        self._bridge()
        (work / "containerd.toml").write_text(containerd_config(work, cache, pause.ref))
        (work / "cni" / "10-ferry.conflist").write_text(json.dumps(cni_conflist(), indent=1))
        self._spawn(
            ["containerd", "--config", str(work / "containerd.toml")], logs / "containerd.log"
        )
        self._wait(
            lambda: self.socket.exists() and self._ctr("version").returncode == 0,
            timeout,
            "containerd",
        )
        self.import_image(pause)
        (work / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_config(work)))
        self._spawn(
            [
                str(bins / "kubelet"),
                "--kubeconfig",
                str(self.cp.kubeconfig),
                "--config",
                str(work / "kubelet.yaml"),
                "--root-dir",
                str(work / "kubelet"),
                "--hostname-override",
                NODE_NAME,
                "--node-ip",
                GATEWAY,
                "--v=1",
            ],
            logs / "kubelet.log",
        )
        (work / "kube-proxy.yaml").write_text(yaml.safe_dump(kube_proxy_config(self.cp.kubeconfig)))
        self._spawn(
            [str(bins / "kube-proxy"), "--config", str(work / "kube-proxy.yaml"), "--v=1"],
            logs / "kube-proxy.log",
        )
        self._wait(self._node_ready, timeout, f"node {NODE_NAME} Ready")
        return self

    # -- images -----------------------------------------------------------------
    def _ctr(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ctr", "--address", str(self.socket), "-n", NAMESPACE_K8S, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def has_image(self, ref: str) -> bool:
        return ref in self._ctr("images", "ls", "-q").stdout.split()

    def import_image(self, image: images.Image) -> str:
        """Import (unless containerd has the tag already: its root is cached) and return the ref."""
        if not self.has_image(image.ref):
            done = self._ctr("images", "import", "--no-unpack=false", str(image.tarball))
            if done.returncode != 0:
                raise ControlPlaneError(f"ctr images import {image.tarball}: {done.stderr.strip()}")
        self.imported.append(image.ref)
        return image.ref

    # -- network ------------------------------------------------------------------
    def _bridge(self) -> None:
        """The pods' bridge with the gateway address, made before the apiserver advertises it."""
        if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0:
            subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
        subprocess.run(["ip", "addr", "replace", f"{GATEWAY}/24", "dev", BRIDGE], check=True)
        subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)

    # -- lifecycle ----------------------------------------------------------------
    def _spawn(self, argv: list[str], log: Path) -> None:
        out = open(log, "ab")  # noqa: SIM115 - lives as long as the process
        self.procs.append(
            subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def _check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                name = Path(proc.args[0]).name
                self.stop()
                raise ControlPlaneError(
                    f"{name} exited with {proc.returncode}; logs in {self.cp.workdir / 'logs'}"
                )

    def _wait(self, ready, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if ready():
                    return
            except Exception:  # not up yet
                pass
            time.sleep(0.5)
        self.stop()
        raise ControlPlaneError(
            f"{what}: not up in {timeout:.0f}s; logs in {self.cp.workdir / 'logs'}"
        )

    def _node_ready(self) -> bool:
        core = k8s_client.CoreV1Api(
            k8s_config.new_client_from_config(config_file=str(self.cp.kubeconfig))
        )
        node = core.read_node(NODE_NAME)
        return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])

    def _remove_containers(self) -> None:
        """Kill and delete every task and container this containerd runs (its root is
        cached between runs, so it holds only what this node started)."""
        for cid in self._ctr("tasks", "ls", "-q").stdout.split():
            self._ctr("tasks", "kill", "-s", "SIGKILL", cid, timeout=30)
            self._ctr("tasks", "delete", "-f", cid, timeout=30)
        for cid in self._ctr("containers", "ls", "-q").stdout.split():
            self._ctr("containers", "delete", cid, timeout=30)

    def _shim_pids(self) -> list[int]:
        """containerd-shim-runc-v2 processes serving this node's containerd (by its socket)."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                argv
                and argv[0].endswith(b"containerd-shim-runc-v2")
                and str(self.socket).encode() in argv
            ):
                pids.append(int(proc.name))
        return pids

    def stop(self) -> None:
        # kube-proxy and kubelet first (last started first), then the containers, then containerd.
        containerd = [p for p in self.procs if Path(p.args[0]).name == "containerd"]
        rest = [p for p in self.procs if p not in containerd]
        stop_all(rest, grace_s=10)
        if containerd and containerd[0].poll() is None:
            self._remove_containers()
        stop_all(containerd, grace_s=10)
        self.procs.clear()
        self.release_host()

    def release_host(self) -> None:
        """After containerd stopped: its shims, the mounts under the node's directory, the
        bridge and kube-proxy's iptables chains (`ferry dev down` calls this too)."""
        for pid in self._shim_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.work.exists():
            mounts = [
                line.split()[1]
                for line in Path("/proc/mounts").read_text().splitlines()
                if line.split()[1].startswith(str(self.work))
            ]
            for m in sorted(mounts, key=len, reverse=True):
                subprocess.run(["umount", "-l", m], capture_output=True)
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
        if self.bin_dir is not None:  # the KUBE-* iptables chains kube-proxy made
            subprocess.run([str(self.bin_dir / "kube-proxy"), "--cleanup"], capture_output=True)
