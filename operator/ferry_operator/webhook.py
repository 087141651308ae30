"""The admission webhook's TLS server: certificates from a directory (cert-manager
or a mounted Secret) or, by default, self-managed (a CA and serving cert
generated at start, the CA put into the managed webhook configuration)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import kopf

from . import pki


def server(port: int, host: str, cert_dir: str) -> kopf.WebhookServer:
    """cert_dir with tls.crt, tls.key (and ca.crt) wins; otherwise self-managed for `host`."""
    if cert_dir and (Path(cert_dir) / "tls.crt").exists():
        d = Path(cert_dir)
        ca = d / "ca.crt"
        return kopf.WebhookServer(addr="0.0.0.0", port=port, host=host or None,
                                  certfile=str(d / "tls.crt"), pkeyfile=str(d / "tls.key"),
                                  cafile=str(ca) if ca.exists() else None)
    hosts = [h for h in {host or "127.0.0.1", "127.0.0.1", "localhost"} if h]
    ca = pki.make_ca("ferry-webhook-ca")
    leaf = pki.issue(ca, host or "127.0.0.1", hosts)
    d = Path(tempfile.mkdtemp(prefix="ferry-webhook-"))
    (d / "tls.crt").write_bytes(leaf.cert_pem)
    (d / "tls.key").write_bytes(leaf.key_pem)
    (d / "tls.key").chmod(0o600)
    return kopf.WebhookServer(addr="0.0.0.0" if host not in ("", "127.0.0.1") else "127.0.0.1",
                              port=port, host=host or "127.0.0.1",
                              certfile=str(d / "tls.crt"), pkeyfile=str(d / "tls.key"),
                              cadata=ca.cert_pem)
