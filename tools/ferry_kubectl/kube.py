"""The plugin's only contact with the API server, using the caller's own
credentials: any kubeconfig (--kubeconfig, --context, KUBECONFIG, ~/.kube/config)
or the pod's service account in a cluster. Failures become one-line `PluginError`s."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import urllib3
from kubernetes import client, config

from ferry_api import GROUP, VERSION

# (connect, read) seconds for every request: a dead or half-open connection
# surfaces as an error instead of hanging the command.
REQUEST_TIMEOUT = (5, 30)
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
SINGULAR = {
    "weightsources": "weightsource",
    "refitjobs": "refitjob",
    "artifactcaches": "artifactcache",
}


class PluginError(Exception):
    """A failure the user can act on; `code` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class NotFound(PluginError):
    pass


def _server_message(exc: client.ApiException) -> str:
    try:
        return json.loads(exc.body or "").get("message") or exc.reason or ""
    except (ValueError, AttributeError):
        return (
            (exc.body or exc.reason or "").strip().splitlines()[0]
            if (exc.body or exc.reason)
            else ""
        )


@contextmanager
def _translated(what: str, plural: str) -> Iterator[None]:
    try:
        yield
    except client.ApiException as exc:
        msg = _server_message(exc)
        if exc.status == 404:
            try:
                named = json.loads(exc.body or "").get("details", {}).get("name")
            except (ValueError, AttributeError):
                named = None
            if named:
                raise NotFound(f"{what} not found") from None
            raise PluginError(
                f"the server does not serve {plural}.{GROUP}/{VERSION}: "
                "are the Ferry CRDs installed? (kubectl apply --server-side -f crds/)"
            ) from None
        if exc.status == 403:
            raise PluginError(f"permission denied: {msg}") from None
        if exc.status == 401:
            raise PluginError(
                "unauthorized: the credentials in this kubeconfig were rejected"
            ) from None
        raise PluginError(f"{what}: {msg or exc.reason} (HTTP {exc.status})") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise PluginError(f"cannot reach the API server: {exc}") from None


@dataclass
class Kube:
    api: client.ApiClient
    namespace: str  # the context's namespace (or the pod's, in a cluster)
    server: str

    @classmethod
    def connect(cls, kubeconfig: str | None = None, context: str | None = None) -> Kube:
        cfg = client.Configuration()
        env = os.environ.get("KUBECONFIG")
        use_file = bool(
            kubeconfig or env or context or Path("~/.kube/config").expanduser().exists()
        )
        in_cluster = not use_file and "KUBERNETES_SERVICE_HOST" in os.environ
        try:
            if not in_cluster:
                # KUBECONFIG may be a colon-separated list; the loader merges it.
                path = kubeconfig or env or str(Path("~/.kube/config").expanduser())
                config.load_kube_config(
                    config_file=path,
                    context=context,
                    client_configuration=cfg,
                    persist_config=False,
                )
                contexts, active = config.list_kube_config_contexts(config_file=path)
                chosen = (
                    next((c for c in contexts if c["name"] == context), active)
                    if context
                    else active
                )
                namespace = ((chosen or {}).get("context") or {}).get("namespace") or "default"
            else:
                config.load_incluster_config(client_configuration=cfg)
                namespace = SA_NAMESPACE.read_text().strip() if SA_NAMESPACE.exists() else "default"
        except (config.ConfigException, OSError, TypeError, ValueError) as exc:
            if in_cluster:
                raise PluginError(f"cannot use the pod's service account ({exc})") from None
            raise PluginError(
                f"cannot load a kubeconfig ({exc}); set --kubeconfig or KUBECONFIG"
            ) from None
        return cls(client.ApiClient(cfg), namespace, cfg.host)

    @property
    def objects(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    def list(self, plural: str, namespace: str | None) -> list[dict[str, Any]]:
        """Every object of a kind in `namespace`, or in all namespaces when None."""
        with _translated(f"list {plural}", plural):
            if namespace is None:
                got = self.objects.list_cluster_custom_object(
                    GROUP, VERSION, plural, _request_timeout=REQUEST_TIMEOUT
                )
            else:
                got = self.objects.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, plural, _request_timeout=REQUEST_TIMEOUT
                )
        return list(cast(dict[str, Any], got).get("items") or [])

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        what = f'{SINGULAR.get(plural, plural)} "{name}" in namespace "{namespace}"'
        with _translated(what, plural):
            return cast(
                dict[str, Any],
                self.objects.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, plural, name, _request_timeout=REQUEST_TIMEOUT
                ),
            )

    def create(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        with _translated(
            f"create {SINGULAR.get(plural, plural)} in namespace {namespace!r}", plural
        ):
            return cast(
                dict[str, Any],
                self.objects.create_namespaced_custom_object(
                    GROUP, VERSION, namespace, plural, body, _request_timeout=REQUEST_TIMEOUT
                ),
            )
