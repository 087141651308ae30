"""A real etcd + kube-apiserver on loopback, for tests, `ferry dev up` and `make demo`.

Binaries come from `hack/envtest.sh` (KUBEBUILDER_ASSETS, the cache, or a Go
build). RBAC is on; the admin credential is a client certificate in
system:masters, written into a kubeconfig.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ferry_operator import pki

from .paths import REPO_ROOT


def stop_all(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM each process group (last started first), SIGKILL what is still running
    after `grace_s`; empties `procs`. Each was started in its own session."""
    for proc in reversed(procs):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    procs.clear()


# Whose requests the admission policy leaves alone here: no operator runs under this
# ServiceAccount (local operators use the admin certificate, which has no pod claim).
TEST_OPERATOR_USER = "system:serviceaccount:ferry-system:ferry"


class ControlPlaneError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def envtest_dir() -> Path:
    """Directory with etcd and kube-apiserver: FERRY_ENVTEST_DIR, KUBEBUILDER_ASSETS, or hack/envtest.sh."""
    for var in ("FERRY_ENVTEST_DIR", "KUBEBUILDER_ASSETS"):
        value = os.environ.get(var)
        if value and (Path(value) / "kube-apiserver").exists() and (Path(value) / "etcd").exists():
            return Path(value)
    out = subprocess.run(
        [str(REPO_ROOT / "hack" / "envtest.sh")], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class ControlPlane:
    """Owns one etcd and one kube-apiserver; `stop()` ends exactly what `start()` began."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ferry-cp-")))
    bin_dir: Path | None = None
    extra_apiserver_args: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    apiserver_argv: list[str] = field(default_factory=list)
    port: int = 0
    kubeconfig: Path = Path()
    ca: pki.KeyPair | None = None

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> ControlPlane:
        bins = self.bin_dir or envtest_dir()
        self.workdir.mkdir(parents=True, exist_ok=True)
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        etcd_port, etcd_peer, self.port = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._spawn(
            [
                str(bins / "etcd"),
                "--data-dir",
                str(self.workdir / "etcd"),
                "--listen-client-urls",
                etcd_url,
                "--advertise-client-urls",
                etcd_url,
                "--listen-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-cluster",
                f"default=http://127.0.0.1:{etcd_peer}",
                "--unsafe-no-fsync",  # test data; durability is not the point
                "--log-level",
                "warn",
            ],
            logs / "etcd.log",
        )
        self._write_pki()
        pki_dir = self.workdir / "pki"
        self.apiserver_argv = [
            str(bins / "kube-apiserver"),
            "--etcd-servers",
            etcd_url,
            "--bind-address",
            "127.0.0.1",
            "--advertise-address",
            "127.0.0.1",
            "--secure-port",
            str(self.port),
            "--tls-cert-file",
            str(pki_dir / "apiserver.crt"),
            "--tls-private-key-file",
            str(pki_dir / "apiserver.key"),
            "--client-ca-file",
            str(pki_dir / "ca.crt"),
            "--authorization-mode",
            "RBAC",
            "--service-cluster-ip-range",
            "10.96.0.0/16",
            "--service-account-issuer",
            "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file",
            str(pki_dir / "sa.key"),
            "--service-account-signing-key-file",
            str(pki_dir / "sa.key"),
            "--allow-privileged=true",
            "--cert-dir",
            str(pki_dir),
            "--v",
            "1",
            *self.extra_apiserver_args,
        ]
        self._spawn(self.apiserver_argv, logs / "kube-apiserver.log")
        self._write_kubeconfig()
        self._wait_ready(timeout)
        return self

    def restart_apiserver(self, down_seconds: float = 0.0, timeout: float = 120.0) -> float:
        """Kill kube-apiserver (SIGKILL: no graceful drain, as in a crash), keep it down
        for `down_seconds`, start it again on the same port against the same etcd, and
        wait until it is ready. Returns how long it was unreachable, in seconds."""
        old = next(p for p in self.procs if p.args == self.apiserver_argv)
        t0 = time.monotonic()
        os.killpg(old.pid, signal.SIGKILL)
        old.wait()
        self.procs.remove(old)
        time.sleep(down_seconds)
        self._spawn(self.apiserver_argv, self.workdir / "logs" / "kube-apiserver.log")
        self._wait_ready(timeout)
        return time.monotonic() - t0

    def _spawn(self, argv: list[str], log: Path) -> None:
        out = open(log, "ab")  # noqa: SIM115 - lives as long as the process
        # A new session so that stop() can signal the whole group it started.
        self.procs.append(
            subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def _write_pki(self) -> None:
        d = self.workdir / "pki"
        d.mkdir(exist_ok=True)
        self.ca = pki.make_ca("ferry-test-ca")
        server = pki.issue(
            self.ca,
            "kube-apiserver",
            ["127.0.0.1", "localhost", "10.96.0.1", "kubernetes.default.svc"],
        )
        (d / "ca.crt").write_bytes(self.ca.cert_pem)
        (d / "apiserver.crt").write_bytes(server.cert_pem)
        (d / "apiserver.key").write_bytes(server.key_pem)
        (d / "sa.key").write_bytes(pki.rsa_key_pem())

    def user_kubeconfig(self, user: str, groups: list[str], path: Path) -> Path:
        """A kubeconfig authenticating as `user` in `groups` by client certificate."""
        assert self.ca is not None
        cert = pki.issue(self.ca, user, [], client=True, organization=",".join(groups) or None)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "ferry",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": _b64(self.ca.cert_pem),
                    },
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {
                        "client-certificate-data": _b64(cert.cert_pem),
                        "client-key-data": _b64(cert.key_pem),
                    },
                }
            ],
            "contexts": [{"name": "ferry", "context": {"cluster": "ferry", "user": user}}],
            "current-context": "ferry",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def _write_kubeconfig(self) -> None:
        self.kubeconfig = self.user_kubeconfig(
            "ferry-admin", ["system:masters"], self.workdir / "kubeconfig"
        )

    def ssl_context(self) -> ssl.SSLContext:
        assert self.ca is not None
        ctx = ssl.create_default_context(cadata=self.ca.cert_pem.decode())
        d = self.workdir / "pki"
        admin = pki.issue(self.ca, "ferry-probe", [], client=True, organization="system:masters")
        (d / "probe.crt").write_bytes(admin.cert_pem)
        (d / "probe.key").write_bytes(admin.key_pem)
        ctx.load_cert_chain(d / "probe.crt", d / "probe.key")
        return ctx

    def _wait_ready(self, timeout: float) -> None:
        ctx = self.ssl_context()
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    self.stop()
                    raise ControlPlaneError(
                        f"{proc.args[0]} exited with {proc.returncode}; logs in {self.workdir / 'logs'}"
                    )
            try:
                with urllib.request.urlopen(f"{self.server}/readyz", context=ctx, timeout=5) as r:
                    if r.status == 200:
                        return
            except Exception as exc:  # not up yet
                last = str(exc)
            time.sleep(0.5)
        self.stop()
        raise ControlPlaneError(f"kube-apiserver not ready after {timeout}s: {last}")

    def install_crds(self, timeout: float = 60.0) -> None:
        """Server-side apply the CRDs the API models generate (what `make crds` writes to
        crds/) and wait until every CRD is Established."""
        from ferry_api.generate import KINDS, render

        kubectl = shutil.which("kubectl")
        if kubectl is None:
            raise ControlPlaneError("kubectl not found on PATH")
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        crds = "---\n".join(render(kind) for kind in KINDS)
        for argv, stdin in (
            (["apply", "--server-side", "-f", "-"], crds),
            (
                [
                    "wait",
                    "--for=condition=Established",
                    f"--timeout={int(timeout)}s",
                    "crd",
                    "--all",
                ],
                None,
            ),
        ):
            done = subprocess.run(
                [kubectl, *argv],
                env=env,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=timeout + 5,
            )
            if done.returncode != 0:
                raise ControlPlaneError(f"kubectl {' '.join(argv)} failed: {done.stderr.strip()}")

    def install_admission_policy(
        self, operator_user: str = TEST_OPERATOR_USER, timeout: float = 30.0
    ) -> None:
        """The chart's ValidatingAdmissionPolicy on what a pod's own token may write
        (ferry_operator.admission), applied and waited for until the apiserver has
        compiled it."""
        from ferry_operator import admission

        kubectl = shutil.which("kubectl")
        if kubectl is None:
            raise ControlPlaneError("kubectl not found on PATH")
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        docs = "---\n".join(yaml.safe_dump(d) for d in admission.manifests(operator_user))
        done = subprocess.run(
            [kubectl, "apply", "--server-side", "-f", "-"],
            env=env,
            input=docs,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise ControlPlaneError(f"admission policy not applied: {done.stderr.strip()}")
        # In force once a pod's credential is refused another pod's Lease: a server-side
        # dry run as a user impersonating a pod claim (and system:masters, so RBAC passes).
        from kubernetes import client, config

        api = config.new_client_from_config(config_file=str(self.kubeconfig))
        api.set_default_header("Impersonate-User", "system:serviceaccount:default:ferry-probe")
        api.set_default_header("Impersonate-Group", "system:masters")
        api.set_default_header(
            "Impersonate-Extra-" + admission.POD_NAME_CLAIM.replace("/", "%2F"), "ferry-probe-a"
        )
        lease = {
            "metadata": {"name": "ferry-agent-ferry-probe-b"},
            "spec": {"holderIdentity": "ferry-probe-b"},
        }
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                client.CoordinationV1Api(api).create_namespaced_lease(
                    "default", lease, dry_run="All"
                )
            except client.ApiException as exc:
                if exc.status == 403 and "ferry-agent-ferry-probe-a" in (exc.body or ""):
                    return
            time.sleep(0.3)
        raise ControlPlaneError("the admission policy was not in force in time")

    def stop(self) -> None:
        # Throwaway state: no need to wait out the apiserver's graceful drain.
        stop_all(self.procs, grace_s=3)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
