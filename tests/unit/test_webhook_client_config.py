"""How the operator tells the apiserver to reach its webhook (node17)."""

from __future__ import annotations

from ferry_operator.webhook import service_client_config, service_ref


def test_a_service_host_becomes_a_service_reference() -> None:
    """The real node found it: a URL naming `<svc>.<ns>.svc` is resolved by the apiserver's
    host DNS ("no such host"); a service reference is resolved by the apiserver."""
    cfg = {
        "url": "https://ferry-webhook.ferry-system.svc:9443",
        "caBundle": "Q0E=",
    }  # what kopf yields
    assert service_client_config(cfg, "ferry-webhook.ferry-system.svc") == {
        "caBundle": "Q0E=",
        "service": {"namespace": "ferry-system", "name": "ferry-webhook", "port": 9443, "path": ""},
    }
    # kopf then appends "/<handler id>": the path must not end in "/" ("//inject-agent" is invalid).
    assert service_ref("ferry-webhook.ferry-system.svc.cluster.local") == (
        "ferry-system",
        "ferry-webhook",
    )


def test_other_hosts_keep_their_url() -> None:
    cfg = {"url": "https://127.0.0.1:9443/inject-agent"}
    assert service_client_config(cfg, "127.0.0.1") == cfg
    assert service_ref("webhook.example.com") is None
