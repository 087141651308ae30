"""The operator as the chart installs it: its own ServiceAccount's token with exactly the
chart's RBAC, the chart's MutatingWebhookConfiguration, `--webhook-config=ca-bundle`.
It writes only the caBundle into that configuration (nothing else of it changes), its
webhook injects pods, and it cannot create a webhook configuration or write Leases
outside its namespaces."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s_client

from ferry_dev.controlplane import free_port
from ferry_dev.operatorproc import start_operator
from ferry_operator import servingcert
from tests.conftest import kubectl
from tests.integration.test_chart import helm, render  # noqa: F401  (the helm fixture)
from tests.kube_helpers import create, get, token_client, wait_for

RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


@pytest.mark.parametrize("namespaced", [False, True], ids=["cluster", "namespaced"])
def test_chart_operator_patches_only_the_ca_bundle_and_injects(
    helm: str,  # noqa: F811  (the fixture imported above)
    kubeconfig: Path,
    api_client: k8s_client.ApiClient,
    namespace: str,  # noqa: F811
    tmp_path: Path,
    namespaced: bool,
) -> None:
    core = k8s_client.CoreV1Api(api_client)
    adm = k8s_client.AdmissionregistrationV1Api(api_client)
    release, config = f"lp-{uuid.uuid4().hex[:6]}", f"lp-{uuid.uuid4().hex[:6]}.ferry.dev"
    core.create_namespace({"metadata": {"name": release}})
    port = free_port()
    docs = render(
        helm,
        "--set",
        f"agent.rbac.bindings[0].namespace={namespace}",
        "--set",
        "agent.rbac.bindings[0].serviceAccount=default",
        "--set",
        f"webhook.configurationName={config}",
        "--set",
        f"namespaced.enabled={str(namespaced).lower()}",
        namespace=release,
        release=release,
    )
    hook = next(d for d in docs if d["kind"] == "MutatingWebhookConfiguration")
    args = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert "--webhook-config=ca-bundle" in args
    scope = [a.split("=", 1)[1] for a in args if a.startswith("--namespace=")]
    assert scope == ([namespace, release] if namespaced else [])
    # The test apiserver cannot reach a Service: the webhook points at this process instead.
    hook["webhooks"][0]["clientConfig"] = {"url": f"https://127.0.0.1:{port}/inject-agent"}
    kubectl(
        kubeconfig,
        "apply",
        "--server-side",
        "-f",
        "-",
        check=True,
        input="---\n".join(yaml.safe_dump(d) for d in docs if d["kind"] in RBAC_KINDS or d is hook),
    )
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]
    token = core.create_namespaced_service_account_token(
        sa, release, {"spec": {"audiences": []}}
    ).status.token
    cfg = yaml.safe_load(kubeconfig.read_text())
    cfg["users"] = [{"name": "operator", "user": {"token": token}}]
    cfg["contexts"][0]["context"]["user"] = "operator"
    op_kubeconfig = tmp_path / "operator-kubeconfig"
    op_kubeconfig.write_text(yaml.safe_dump(cfg))

    op = start_operator(
        op_kubeconfig,
        tmp_path / "operator.log",
        "--webhook-port",
        str(port),
        "--webhook-host",
        "127.0.0.1",
        "--webhook-config",
        "ca-bundle",
        env={"POD_NAMESPACE": release, "POD_NAME": "op-0", "FERRY_WEBHOOK_CONFIGURATION": config},
        namespaces=scope or None,
    )
    try:

        def bundle() -> str:
            got = adm.read_mutating_webhook_configuration(config).webhooks[0].client_config
            return got.ca_bundle or ""

        # Ready only once the caBundle is in the configuration (helm install --wait returns
        # on readiness; a pod created before that got no sidecar: node17).
        wait_for(lambda: op.readyz() == 200, timeout=60, what="the operator's readiness")
        written = bundle()
        assert written, "ready before its caBundle was written"
        secret = core.read_namespaced_secret(servingcert.SECRET_NAME, release)
        assert base64.b64decode(written) == base64.b64decode(secret.data["ca.crt"])
        stored = adm.read_mutating_webhook_configuration(config).to_dict()["webhooks"][0]
        assert stored["name"] == hook["webhooks"][0]["name"]
        assert stored["rules"][0]["operations"] == ["CREATE"]
        assert stored["object_selector"]["match_expressions"][0]["key"] == "ferry.dev/inject"
        assert stored["client_config"]["url"] == f"https://127.0.0.1:{port}/inject-agent"

        core.create_namespaced_pod(
            namespace,
            {
                "metadata": {"name": "engine-0", "labels": {"ferry.dev/inject": "true"}},
                "spec": {"containers": [{"name": "engine", "image": "example.invalid/vllm:1"}]},
            },
        )
        pod = core.read_namespaced_pod("engine-0", namespace)
        assert [c.name for c in pod.spec.init_containers] == ["ferry-agent"]
        assert op.healthz() == 200, "its canary Lease (release namespace) goes round"
        create(
            api_client,
            namespace,
            "weightsources",
            {
                "apiVersion": "ferry.dev/v1alpha1",
                "kind": "WeightSource",
                "metadata": {"name": "src"},
                "spec": {
                    "model": {"name": "llama"},
                    "selector": {"matchLabels": {"app": "trainer"}},
                },
            },
        )
        wait_for(
            lambda: (
                get(api_client, "weightsources", namespace, "src")
                .get("status", {})
                .get("observedGeneration")
            ),
            what="the operator reconciles a served namespace's source",
        )

        as_operator = token_client(api_client, token)
        refused = []
        attempts = [
            lambda: k8s_client.AdmissionregistrationV1Api(
                as_operator
            ).create_mutating_webhook_configuration(
                {"metadata": {"name": f"evil-{release}"}, "webhooks": []}
            ),
            lambda: k8s_client.CoordinationV1Api(as_operator).create_namespaced_lease(
                "kube-system", {"metadata": {"name": f"evil-{release}"}, "spec": {}}
            ),
            lambda: k8s_client.CoordinationV1Api(as_operator).patch_namespaced_lease(
                "kube-scheduler", "kube-system", {"metadata": {"annotations": {"x": "y"}}}
            ),
        ]
        if namespaced:
            attempts.append(
                lambda: k8s_client.CustomObjectsApi(as_operator).list_namespaced_custom_object(
                    "ferry.dev", "v1alpha1", "kube-system", "weightsources"
                )
            )
        for attempt in attempts:
            try:
                attempt()
            except k8s_client.ApiException as exc:
                refused.append(exc.status)
        assert refused == [403] * len(attempts)
        log = (tmp_path / "operator.log").read_text()
        assert "Forbidden" not in log and "403" not in log, (
            "the chart's RBAC lacks something it does"
        )
    finally:
        op.stop()
        adm.delete_mutating_webhook_configuration(config)
