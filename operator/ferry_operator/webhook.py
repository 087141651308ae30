"""The admission webhook's TLS server, with certificates that are reloaded without a restart.

Certificates come from a directory (cert-manager, or any mounted Secret: tls.crt,
tls.key, ca.crt) or, by default, from the one shared Secret that every replica
serves (servingcert.py). Every CHECK_SECONDS the server reads its source again:
a changed certificate or key is loaded into the live TLS context (new handshakes
get it; the listening socket never closes), and a changed CA bundle is handed to
kopf, which writes it into the webhook configuration. An unchanged one is not
handed on, so replicas never rewrite the caBundle to the value it already has.

Who writes the MutatingWebhookConfiguration (CONFIG_MODES, `--webhook-config`):
- "managed": kopf creates it and writes its webhooks (local operators: tests, `ferry dev`);
- "ca-bundle": the chart renders it (templates/webhook.yaml) and the operator patches
  only the caBundle of its one webhook (self-managed certificates);
- "external": the chart renders it and cert-manager's CA injector fills the caBundle;
  the operator writes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import os
import ssl
import tempfile
import urllib.parse
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp.web
import kopf
from kubernetes import client

from . import kube, servingcert
from .servingcert import Serving

log = logging.getLogger(__name__)
CHECK_SECONDS = float(os.environ.get("FERRY_WEBHOOK_CERT_CHECK_SECONDS", "10"))
CONFIG_MODES = ("managed", "ca-bundle", "external")
# kopf's name for the webhook of handler "inject-agent" in configuration "ferry.dev"
# (the chart's templates/webhook.yaml renders the same name).
HANDLER_ID = "inject-agent"


def webhook_name(configuration: str) -> str:
    return f"{HANDLER_ID}.{configuration}"


def patch_ca_bundle(configuration: str, bundle_b64: str) -> None:
    """Write `bundle_b64` into the caBundle of our webhook in `configuration`, nothing else
    (a strategic merge on the webhook list, keyed by webhook name)."""
    client.AdmissionregistrationV1Api(kube.api()).patch_mutating_webhook_configuration(
        configuration,
        {
            "webhooks": [
                {"name": webhook_name(configuration), "clientConfig": {"caBundle": bundle_b64}}
            ]
        },
        _content_type="application/strategic-merge-patch+json",
    )


def service_ref(host: str) -> tuple[str, str] | None:
    """(namespace, name) when `host` is a Service's in-cluster name `<name>.<ns>.svc`."""
    parts = host.split(".")
    if (
        len(parts) in (3, 5)
        and parts[2] == "svc"
        and (len(parts) == 3 or parts[3:] == ["cluster", "local"])
    ):
        return parts[1], parts[0]
    return None


def service_client_config(config: dict[str, Any], host: str) -> dict[str, Any]:
    """kopf's `url` client config as a `service` reference when `host` names a Service.

    node17: with a URL the apiserver resolves `<svc>.<ns>.svc` through its own host's
    DNS, which in most clusters (and on the real node) knows no cluster names: every
    injection failed with "no such host". A service reference is resolved by the
    apiserver itself, to the Service's endpoints."""
    ref = service_ref(host)
    if ref is None or not config.get("url"):
        return config
    url = urllib.parse.urlsplit(config["url"])
    out = {k: v for k, v in config.items() if k != "url"}
    out["service"] = {
        "namespace": ref[0],
        "name": ref[1],
        "port": url.port or 443,
        # kopf appends "/<handler id>" to this path itself.
        "path": url.path.rstrip("/"),
    }
    return out


def hosts_for(host: str) -> list[str]:
    """SANs of the shared serving certificate: the name the apiserver dials first."""
    first = host or "127.0.0.1"
    return [first, *sorted({"127.0.0.1", "localhost"} - {first})]


def read_dir(cert_dir: str) -> Serving:
    d = Path(cert_dir)
    ca = d / "ca.crt"
    return Serving(
        (d / "tls.crt").read_bytes(),
        (d / "tls.key").read_bytes(),
        ca.read_bytes() if ca.exists() else b"",
    )


class SharedSecret:
    """The serving certificate in one Secret: created if absent (the first replica's
    write wins), renewed when servingcert.plan says so (an update against the read
    resourceVersion: a replica that lost the race reads the winner's)."""

    def __init__(self, namespace: str, name: str, hosts: list[str]) -> None:
        self.namespace, self.name, self.hosts = namespace, name, hosts
        self.last: Serving | None = None  # what this replica loaded last (and serves)

    def _read(self) -> tuple[Serving | None, str | None]:
        try:
            secret = kube.core().read_namespaced_secret(self.name, self.namespace)
        except client.ApiException as exc:
            if exc.status == 404:
                return None, None
            raise
        data = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
        return Serving.from_data(
            data
        ), secret.metadata.resource_version if secret.metadata else None

    def _body(self, serving: Serving, version: str | None) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "labels": {"app.kubernetes.io/component": "webhook-serving-cert"},
        }
        if version:
            meta["resourceVersion"] = version
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": meta,
            "type": "Opaque",
            "data": {k: base64.b64encode(v).decode() for k, v in serving.data().items()},
        }

    def load(self) -> Serving:
        for _ in range(5):
            current, version = self._read()
            now = dt.datetime.now(dt.UTC)
            new = servingcert.plan(
                current, self.hosts, now, self.last.ca_bundle if self.last else b""
            )
            if new is None and current is not None:
                self.last = current
                return current
            assert new is not None
            why = servingcert.problem(current, self.hosts, now)
            try:
                if version is None:
                    kube.core().create_namespaced_secret(self.namespace, self._body(new, None))
                else:
                    kube.core().replace_namespaced_secret(
                        self.name, self.namespace, self._body(new, version)
                    )
                log.info(
                    "webhook serving certificate in Secret %s/%s written (%s)",
                    self.namespace,
                    self.name,
                    why,
                )
                self.last = new
                return new
            except client.ApiException as exc:
                if exc.status != 409:  # 409: another replica wrote first; adopt its Secret
                    raise
        raise RuntimeError(f"Secret {self.namespace}/{self.name} kept changing under 5 writes")


class ReloadingServer(kopf.WebhookServer):
    """kopf's webhook server, but the TLS context is built once and reloaded in place."""

    def __init__(
        self,
        source: Callable[[], Serving],
        check_seconds: float = CHECK_SECONDS,
        on_bundle: Callable[[str], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.source = source
        self.check_seconds = check_seconds
        # ca-bundle mode: called with each new caBundle (kopf manages nothing then)
        self.on_bundle = on_bundle
        self._bundle_due: str | None = None

    async def _hand_on(self, config: Any) -> None:
        """Give the caBundle to on_bundle; one that failed is tried again every check."""
        if self.on_bundle is None:
            return
        self._bundle_due = config.get("caBundle") or self._bundle_due
        if self._bundle_due is None:
            return
        try:
            await asyncio.to_thread(self.on_bundle, self._bundle_due)
            log.info("webhook caBundle written")
            self._bundle_due = None
        except Exception as exc:
            log.warning(
                "webhook caBundle not written yet (retrying in %.0fs): %s", self.check_seconds, exc
            )

    @staticmethod
    def _load_chain(context: ssl.SSLContext, serving: Serving) -> None:
        with tempfile.TemporaryDirectory(prefix="ferry-webhook-") as d:
            cert, key = Path(d) / "tls.crt", Path(d) / "tls.key"
            cert.write_bytes(serving.cert_pem)
            key.touch(mode=0o600)
            key.write_bytes(serving.key_pem)
            context.load_cert_chain(str(cert), str(key))

    def _client_config(self, port: int, serving: Serving) -> Any:
        host = self.host or self._get_accessible_addr(self.addr)
        config: Any = {"url": self._build_url("https", host, port, self.path or "")}
        bundle = serving.ca_bundle or serving.cert_pem
        config["caBundle"] = base64.b64encode(bundle).decode("ascii")
        return service_client_config(config, host or "")

    async def _first_load(self) -> Serving:
        """The source, retried (1 s doubling to 10 s) while it fails: an apiserver that is
        briefly away at start must not end the operator."""
        delay = 1.0
        while True:
            try:
                return await asyncio.to_thread(self.source)
            except Exception as exc:
                log.warning(
                    "webhook certificate not loaded yet (retrying in %.0fs): %s", delay, exc
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:  # type: ignore[override]
        async def serve(request: aiohttp.web.Request) -> aiohttp.web.Response:
            return await self._serve(fn, request)

        serving = await self._first_load()
        context = ssl.create_default_context(purpose=ssl.Purpose.CLIENT_AUTH)
        self._load_chain(context, serving)
        app = aiohttp.web.Application()
        app.add_routes([aiohttp.web.post(f"{(self.path or '').rstrip('/')}/{{id:.*}}", serve)])
        runner = aiohttp.web.AppRunner(app, handle_signals=False)
        await runner.setup()
        port = self.port or self._allocate_free_port()
        try:
            site = aiohttp.web.TCPSite(
                runner,
                self.addr or None,
                port,
                ssl_context=context,
                reuse_port=True,
                reuse_address=True,
            )
            await site.start()
            first = self._client_config(port, serving)
            await self._hand_on(first)
            yield first
            while True:
                await asyncio.sleep(self.check_seconds)
                if self._bundle_due is not None:
                    await self._hand_on({})
                try:
                    new = await asyncio.to_thread(self.source)
                except Exception as exc:  # keep serving what we have; the next check retries
                    log.warning("webhook certificate source unreadable: %s", exc)
                    continue
                if (new.cert_pem, new.key_pem) != (serving.cert_pem, serving.key_pem):
                    try:
                        self._load_chain(context, new)
                    except (ssl.SSLError, OSError) as exc:  # e.g. a half-written mount
                        log.warning("webhook certificate not reloaded: %s", exc)
                        continue
                    log.info("webhook serving certificate reloaded")
                bundle_changed = new.ca_bundle != serving.ca_bundle
                serving = new
                if bundle_changed:
                    config = self._client_config(port, serving)
                    await self._hand_on(config)
                    yield config
        finally:
            await runner.cleanup()


def server(
    port: int,
    host: str,
    cert_dir: str,
    namespace: str,
    secret: str = servingcert.SECRET_NAME,
    on_bundle: Callable[[str], None] | None = None,
) -> kopf.WebhookServer:
    """cert_dir with tls.crt and tls.key wins; otherwise the shared Secret `secret` in
    `namespace`, made for `host` (the name the apiserver dials)."""
    if cert_dir and (Path(cert_dir) / "tls.crt").exists():
        return ReloadingServer(
            lambda: read_dir(cert_dir),
            addr="0.0.0.0",
            port=port,
            host=host or None,
            on_bundle=on_bundle,
        )
    shared = SharedSecret(namespace, secret, hosts_for(host))
    return ReloadingServer(
        shared.load,
        addr="0.0.0.0" if host not in ("", "127.0.0.1") else "127.0.0.1",
        port=port,
        host=host or "127.0.0.1",
        on_bundle=on_bundle,
    )
