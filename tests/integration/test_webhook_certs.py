"""The injection webhook's certificates with more than one operator replica, and their
rotation, against the real apiserver and real operator processes (issue 19).

Each operator here keeps its own MutatingWebhookConfiguration (FERRY_WEBHOOK_CONFIGURATION)
and its serving Secret in this module's namespace (POD_NAMESPACE), so the session's
operator and its `ferry.dev` configuration are left alone.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from kubernetes import client as k8s_client

from ferry_dev.controlplane import free_port
from ferry_dev.operatorproc import OperatorProcess, start_operator
from ferry_operator import pki, servingcert
from tests.kube_helpers import wait_for


@dataclass
class Replicas:
    namespace: str
    config: str
    ops: list[OperatorProcess]
    ports: list[int]


def served_cert(port: int) -> bytes:
    """The DER certificate a TLS handshake on `port` presents (not verified here)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der
    return der


def pem_to_der(pem: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def review(port: int, path: str, ca_pem: bytes, namespace: str) -> dict:
    """An AdmissionReview for a labelled pod, sent as the apiserver sends it: TLS verified
    against `ca_pem` (what the webhook configuration says to trust) for 127.0.0.1."""
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    uid = str(uuid.uuid4())
    body = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "namespace": namespace,
            "name": "p",
            "dryRun": False,
            "userInfo": {"username": "test"},
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "p",
                    "namespace": namespace,
                    "labels": {"ferry.dev/inject": "true"},
                },
                "spec": {"containers": [{"name": "engine", "image": "example.invalid/e:1"}]},
            },
        },
    }
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()[:300]
        out = json.loads(resp.read())["response"]
    finally:
        conn.close()
    assert out["uid"] == uid and out["allowed"] is True and out.get("patch"), out
    return out


def configuration(api: k8s_client.ApiClient, name: str) -> tuple[bytes, str] | None:
    """(caBundle, URL path) of the injection webhook in configuration `name`."""
    try:
        cfg = k8s_client.AdmissionregistrationV1Api(api).read_mutating_webhook_configuration(name)
    except k8s_client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    hooks = [w for w in cfg.webhooks or [] if w.client_config and w.client_config.ca_bundle]
    if not hooks:
        return None
    cc = hooks[0].client_config
    return base64.b64decode(cc.ca_bundle), urlsplit(cc.url).path


def _namespace(api: k8s_client.ApiClient, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    core = k8s_client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name}})
    core.create_namespaced_service_account(name, {"metadata": {"name": "default"}})
    return name


def _listening(port: int) -> bool:
    try:
        served_cert(port)
        return True
    except OSError:
        return False


def _start(
    kubeconfig: Path, log: Path, namespace: str, config: str, port: int, *extra: str
) -> OperatorProcess:
    """An operator serving the webhook on `port` (healthy, and its webhook listening)."""
    op = _start_process(kubeconfig, log, namespace, config, port, *extra)
    wait_for(lambda: _listening(port), what=f"webhook listening on {port}")
    return op


def _start_process(
    kubeconfig: Path, log: Path, namespace: str, config: str, port: int, *extra: str
) -> OperatorProcess:
    return start_operator(
        kubeconfig,
        log,
        "--webhook-port",
        str(port),
        "--webhook-host",
        "127.0.0.1",
        *extra,
        env={
            "POD_NAMESPACE": namespace,
            "FERRY_WEBHOOK_CONFIGURATION": config,
            "FERRY_WEBHOOK_CERT_CHECK_SECONDS": "1",
            "POD_NAME": f"op-{port}",
        },
    )


def _delete_config(api: k8s_client.ApiClient, name: str) -> None:
    try:
        k8s_client.AdmissionregistrationV1Api(api).delete_mutating_webhook_configuration(name)
    except k8s_client.ApiException as exc:
        if exc.status != 404:
            raise


@pytest.fixture(scope="module")
def replicas(
    kubeconfig: Path, api_client: k8s_client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replicas]:
    """Two operator processes serving one webhook, as two replicas behind one Service."""
    ns = _namespace(api_client, "webhook-replicas")
    config = f"ferry-test.{ns}"
    logs = tmp_path_factory.mktemp("replicas")
    ports, ops = [free_port(), free_port()], []
    try:
        for i, port in enumerate(ports):
            ops.append(_start(kubeconfig, logs / f"op{i}.log", ns, config, port))
        yield Replicas(ns, config, ops, ports)
    finally:
        for op in ops:
            op.stop()
        _delete_config(api_client, config)


def test_webhook_certificates_with_more_than_one_operator_replica(
    replicas: Replicas, api_client: k8s_client.ApiClient
) -> None:
    """Every replica serves a certificate the one caBundle trusts, and the caBundle does not
    flap: the apiserver's TLS handshake succeeds whichever replica the Service picks."""
    ca, path = wait_for(
        lambda: configuration(api_client, replicas.config), what="webhook configuration"
    )
    bundles = set()
    for _ in range(6):
        bundles.add(configuration(api_client, replicas.config)[0])  # type: ignore[index]
        for port in replicas.ports:
            review(port, path, ca, replicas.namespace)
        time.sleep(0.5)
    assert bundles == {ca}, "the caBundle changed while both replicas ran"
    assert len({served_cert(p) for p in replicas.ports}) == 1, (
        "replicas serve different certificates"
    )
    secret = k8s_client.CoreV1Api(api_client).read_namespaced_secret(
        servingcert.SECRET_NAME, replicas.namespace
    )
    assert base64.b64decode(secret.data["ca.crt"]) == ca
    core = k8s_client.CoreV1Api(api_client)
    for i in range(3):  # and through the apiserver, under this configuration
        core.create_namespaced_pod(
            replicas.namespace,
            {
                "metadata": {"name": f"engine-{i}", "labels": {"ferry.dev/inject": "true"}},
                "spec": {"containers": [{"name": "engine", "image": "example.invalid/e:1"}]},
            },
        )
        stored = core.read_namespaced_pod(f"engine-{i}", replicas.namespace)
        assert [c.name for c in stored.spec.init_containers or []] == ["ferry-agent"]


def test_webhook_certificate_rotation_reloads_without_restart(
    replicas: Replicas, api_client: k8s_client.ApiClient
) -> None:
    """The shared Secret is rotated to a new CA and leaf: both replicas serve the new leaf
    (same processes, no restart), the caBundle becomes the new CA, and the webhook answers
    from both under it."""
    core = k8s_client.CoreV1Api(api_client)
    pids = [op.proc.pid for op in replicas.ops]
    ca = pki.make_ca("rotated-ca")
    leaf = pki.issue(ca, "127.0.0.1", ["127.0.0.1", "localhost"])
    data = servingcert.Serving(leaf.cert_pem, leaf.key_pem, ca.cert_pem, ca.key_pem).data()
    core.patch_namespaced_secret(
        servingcert.SECRET_NAME,
        replicas.namespace,
        {"data": {k: base64.b64encode(v).decode() for k, v in data.items()}},
    )
    want = pem_to_der(leaf.cert_pem)
    wait_for(
        lambda: all(served_cert(p) == want for p in replicas.ports),
        timeout=30,
        what="both replicas serving the rotated certificate",
    )
    wait_for(
        lambda: (configuration(api_client, replicas.config) or (b"",))[0] == ca.cert_pem,
        timeout=30,
        what="caBundle = the rotated CA",
    )
    path = configuration(api_client, replicas.config)[1]  # type: ignore[index]
    for port in replicas.ports:
        review(port, path, ca.cert_pem, replicas.namespace)
    assert [op.proc.pid for op in replicas.ops] == pids and all(
        op.proc.poll() is None for op in replicas.ops
    )


def test_webhook_secret_deleted_is_recreated_and_replicas_converge(
    replicas: Replicas, api_client: k8s_client.ApiClient
) -> None:
    """Deleting the shared Secret (a manual rotation) gives one new certificate that both
    replicas serve, under a caBundle that still trusts the CA they served before."""
    core = k8s_client.CoreV1Api(api_client)
    old_ca = configuration(api_client, replicas.config)[0]  # type: ignore[index]
    core.delete_namespaced_secret(servingcert.SECRET_NAME, replicas.namespace)

    def recreated() -> bytes | None:
        try:
            s = core.read_namespaced_secret(servingcert.SECRET_NAME, replicas.namespace)
        except k8s_client.ApiException:
            return None
        return base64.b64decode(s.data["tls.crt"])

    leaf = wait_for(recreated, timeout=30, what="the Secret written again")
    wait_for(
        lambda: all(served_cert(p) == pem_to_der(leaf) for p in replicas.ports),
        timeout=30,
        what="both replicas serving the new certificate",
    )
    ca, path = wait_for(
        lambda: (c := configuration(api_client, replicas.config)) and c[0] != old_ca and c,
        timeout=30,
        what="the new caBundle",
    )
    assert old_ca in ca, "the CA the replicas served before must stay trusted while they reload"
    for port in replicas.ports:
        review(port, path, ca, replicas.namespace)


def test_webhook_cert_dir_rotation_reloads_without_restart(
    kubeconfig: Path, api_client: k8s_client.ApiClient, tmp_path: Path
) -> None:
    """cert-manager mode: the files in --webhook-cert-dir are renewed (a new CA, as after an
    issuer change); the running operator serves the new certificate and writes the new
    caBundle, without a restart."""
    ns = _namespace(api_client, "webhook-certdir")
    config = f"ferry-test.{ns}"
    certs = tmp_path / "certs"
    certs.mkdir()

    def write(ca: pki.KeyPair) -> pki.KeyPair:
        leaf = pki.issue(ca, "127.0.0.1", ["127.0.0.1"])
        for name, data in (
            ("tls.crt", leaf.cert_pem),
            ("tls.key", leaf.key_pem),
            ("ca.crt", ca.cert_pem),
        ):
            (certs / f".{name}").write_bytes(data)
            (certs / f".{name}").rename(certs / name)
        return leaf

    write(pki.make_ca("first-ca"))
    port = free_port()
    op = _start(kubeconfig, tmp_path / "op.log", ns, config, port, "--webhook-cert-dir", str(certs))
    try:
        wait_for(lambda: configuration(api_client, config), what="webhook configuration")
        ca = pki.make_ca("renewed-ca")
        leaf = write(ca)
        wait_for(
            lambda: served_cert(port) == pem_to_der(leaf.cert_pem),
            timeout=30,
            what="the renewed certificate served",
        )
        wait_for(
            lambda: (configuration(api_client, config) or (b"",))[0] == ca.cert_pem,
            timeout=30,
            what="caBundle = the renewed CA",
        )
        review(port, configuration(api_client, config)[1], ca.cert_pem, ns)  # type: ignore[index]
        assert op.proc.poll() is None
    finally:
        op.stop()
        _delete_config(api_client, config)


def test_webhook_stays_configured_when_one_replica_stops(
    replicas: Replicas, api_client: k8s_client.ApiClient
) -> None:
    """A replica that stops (a rolling update, a drained node) must not take the webhook out
    of the configuration for the others: kopf removed non-persistent webhooks on exit, so
    labelled pods started without the agent until another replica rewrote it."""
    before = configuration(api_client, replicas.config)
    assert before is not None
    replicas.ops[0].stop()
    time.sleep(2)
    after = configuration(api_client, replicas.config)
    assert after == before, "the stopping replica removed the webhook"
    review(replicas.ports[1], after[1], after[0], replicas.namespace)
