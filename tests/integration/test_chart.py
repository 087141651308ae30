"""The Helm chart: lint, render, and a server-side dry-run against the real apiserver.

`make chart-test` runs this file; `make test` runs it with everything else. helm
comes from hack/helm.sh (built once from its Go module, cached outside the
checkout).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ferry_dev.controlplane import REPO_ROOT
from ferry_operator import rbac
from tests.conftest import kubectl

CHART = REPO_ROOT / "charts" / "ferry"
# Values that turn on every template the test apiserver can take (it has no
# cert-manager or prometheus-operator CRDs; those are checked as rendered YAML).
FULL = ["--set", "replicaCount=2", "--set", "dashboards.enabled=true"]


@pytest.fixture(scope="session")
def helm() -> str:
    done = subprocess.run(
        [str(REPO_ROOT / "hack" / "helm.sh")], capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.strip().splitlines()[-1]


def render(
    helm: str, *args: str, namespace: str = "ferry-system", release: str = "ferry"
) -> list[dict[str, Any]]:
    """`helm template` of the chart with `args` (--set ...), as parsed documents."""
    done = subprocess.run(
        [helm, "template", release, str(CHART), "-n", namespace, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def find(docs: list[dict], kind: str, suffix: str = "") -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(hits) == 1, f"{kind} *{suffix}: {[d['metadata']['name'] for d in hits]}"
    return hits[0]


def operator_container(docs: list[dict]) -> dict:
    return find(docs, "StatefulSet", "-operator")["spec"]["template"]["spec"]["containers"][0]


def test_helm_lint_strict(helm: str) -> None:
    for values in (
        [],
        [
            *FULL,
            "--set",
            "webhook.certManager.enabled=true",
            "--set",
            "metrics.serviceMonitor.enabled=true",
        ],
    ):
        done = subprocess.run(
            [helm, "lint", "--strict", str(CHART), *values],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "0 chart(s) failed" in done.stdout


def test_rendered_chart_passes_server_side_dry_run(
    helm: str, kubeconfig: Path, namespace: str
) -> None:
    docs = render(
        helm,
        "--include-crds",
        *FULL,
        "--set",
        f"agent.rbac.bindings[0].namespace={namespace}",
        "--set",
        "agent.rbac.bindings[0].serviceAccount=default",
        # Cluster-scoped and shared by every test of this apiserver: a local operator's
        # kopf-managed "ferry.dev" (clientConfig.url) would merge with the chart's service.
        "--set",
        f"webhook.configurationName=dry-run.{namespace}",
        namespace=namespace,
    )
    kinds = {d["kind"] for d in docs}
    assert {
        "CustomResourceDefinition",
        "ClusterKopfPeering",
        "StatefulSet",
        "ClusterRole",
        "ClusterRoleBinding",
        "RoleBinding",
        "ServiceAccount",
        "Service",
        "ConfigMap",
    } <= kinds
    # kopf's peering CRDs must exist before the ClusterKopfPeering object can be
    # validated, as Helm does with crds/ (installed first, waited for).
    crds = "---\n".join(
        yaml.safe_dump(d)
        for d in docs
        if d["kind"] == "CustomResourceDefinition" and d["spec"]["group"] == "kopf.dev"
    )
    kubectl(kubeconfig, "apply", "--server-side", "-f", "-", input=crds, check=True)
    kubectl(
        kubeconfig,
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/clusterkopfpeerings.kopf.dev",
        "crd/kopfpeerings.kopf.dev",
        check=True,
    )
    done = kubectl(
        kubeconfig,
        "apply",
        "--server-side",
        "--dry-run=server",
        "-n",
        namespace,
        "-f",
        "-",
        input="---\n".join(yaml.safe_dump(d) for d in docs),
    )
    assert done.returncode == 0, done.stderr
    applied = [line for line in done.stdout.splitlines() if "serverside-applied" in line]
    assert len(applied) == len(docs), done.stdout


def test_operator_workload(helm: str) -> None:
    c = operator_container(render(helm))
    args = c["args"]
    assert args[:3] == ["operator", "run", "--all-namespaces"]
    assert "--health-port=8080" in args
    assert "--webhook-port=9443" in args
    assert "--webhook-host=ferry-webhook.ferry-system.svc" in args
    assert not any(a.startswith(("--peering", "--webhook-cert-dir")) for a in args)
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["ports"][0]["containerPort"] == 8080
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def test_agent_settings_reach_every_variable_injection_reads(helm: str) -> None:
    read = set(
        re.findall(
            r'env\.get\("(FERRY_[A-Z_]+)"',
            (REPO_ROOT / "operator/ferry_operator/injection.py").read_text(),
        )
    )
    assert len(read) >= 9
    env = {
        e["name"]: e.get("value")
        for e in operator_container(
            render(
                helm,
                "--set",
                "agent.rails=stripe",
                "--set",
                "agent.shmSize=64Gi",
                "--set",
                "agent.image.digest=sha256:" + "a" * 64,
            )
        )["env"]
    }
    assert read <= set(env), f"not set by the chart: {sorted(read - set(env))}"
    assert env["FERRY_AGENT_RAILS"] == "stripe"
    assert env["FERRY_AGENT_SHM_SIZE"] == "64Gi"
    assert env["FERRY_AGENT_IMAGE"] == "ghcr.io/ferry-dev/ferry-agent@sha256:" + "a" * 64


def test_peering_only_with_replicas_and_distinct_priorities(helm: str) -> None:
    docs = render(helm, "--set", "replicaCount=3")
    c = operator_container(docs)
    assert "--peering=ferry" in c["args"]
    # Equal kopf priorities pause every replica; each pod's ordinal is its priority.
    assert "--priority=$(FERRY_PEERING_PRIORITY)" in c["args"]
    prio = next(e for e in c["env"] if e["name"] == "FERRY_PEERING_PRIORITY")
    assert "apps.kubernetes.io/pod-index" in prio["valueFrom"]["fieldRef"]["fieldPath"]
    assert find(docs, "ClusterKopfPeering")["metadata"]["name"] == "ferry"
    assert not [d for d in render(helm) if d["kind"] == "ClusterKopfPeering"]


def test_cert_manager_mode(helm: str) -> None:
    docs = render(helm, "--set", "webhook.certManager.enabled=true")
    serving = find(docs, "Certificate", "-webhook")
    assert "ferry-webhook.ferry-system.svc" in serving["spec"]["dnsNames"]
    assert serving["spec"]["issuerRef"]["name"] == "ferry-webhook-ca"
    assert find(docs, "Certificate", "-webhook-ca")["spec"]["isCA"] is True
    sts = find(docs, "StatefulSet", "-operator")["spec"]["template"]["spec"]
    assert "--webhook-cert-dir=/certs" in sts["containers"][0]["args"]
    vol = next(v for v in sts["volumes"] if v["name"] == "webhook-certs")
    assert vol["secret"]["secretName"] == serving["spec"]["secretName"]
    own = render(
        helm,
        "--set",
        "webhook.certManager.enabled=true",
        "--set",
        "webhook.certManager.issuerRef.name=corp",
        "--set",
        "webhook.certManager.issuerRef.kind=ClusterIssuer",
    )
    assert [d["kind"] for d in own if d["kind"] in ("Issuer", "Certificate")] == ["Certificate"]
    assert find(own, "Certificate")["spec"]["issuerRef"] == {
        "name": "corp",
        "kind": "ClusterIssuer",
    }


def test_crds_survive_upgrades_and_land_first(helm: str) -> None:
    crds = [d for d in render(helm) if d["kind"] == "CustomResourceDefinition"]
    assert {d["metadata"]["name"] for d in crds} == {
        "weightsources.ferry.dev",
        "refitjobs.ferry.dev",
        "artifactcaches.ferry.dev",
    }
    for d in crds:
        ann = d["metadata"]["annotations"]
        assert ann["helm.sh/resource-policy"] == "keep"
        assert int(ann["argocd.argoproj.io/sync-wave"]) < 0
    assert not [
        d
        for d in render(helm, "--set", "crds.install=false")
        if d["kind"] == "CustomResourceDefinition"
    ]


def test_service_monitor_and_dashboard(helm: str) -> None:
    docs = render(
        helm, "--set", "metrics.serviceMonitor.enabled=true", "--set", "dashboards.enabled=true"
    )
    sm = find(docs, "ServiceMonitor")
    svc = find(docs, "Service", "-metrics")
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["spec"]["selector"].items()
    cm = find(docs, "ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["ferry.json"] == (CHART / "dashboards" / "ferry.json").read_text().rstrip(
        "\n"
    )


def test_argocd_health_snippet_carries_the_lua(helm: str) -> None:
    cm = find(render(helm, "--set", "argocd.healthSnippet=true"), "ConfigMap", "argocd-cm")
    assert cm["metadata"]["namespace"] == "argocd"
    for kind in ("WeightSource", "RefitJob", "ArtifactCache"):
        lua = (CHART / "argocd" / "ferry.dev" / kind / "health.lua").read_text()
        assert cm["data"][f"resource.customizations.health.ferry.dev_{kind}"] == lua.rstrip("\n")


def _granted(role: dict) -> set[tuple]:
    out = set()
    for rule in role["rules"]:
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                for v in rule["verbs"]:
                    for n in rule.get("resourceNames") or [""]:
                        out.add((g, r, v, n))
    return out


SERVED = [
    "--set",
    "agent.rbac.bindings[0].namespace=llm",
    "--set",
    "agent.rbac.bindings[0].serviceAccount=default",
    "--set",
    "namespaced.namespaces[0]=team-a",
    "--set",
    "namespaced.namespaces[1]=llm",
]


@pytest.mark.parametrize(
    "replicas,webhook,cert_manager,namespaced",
    [
        (1, True, False, False),
        (2, True, False, False),
        (1, False, False, False),
        (2, True, True, False),
        (1, True, False, True),
        (1, True, True, True),
    ],
)
def test_chart_rbac_is_exactly_the_permissions_table(
    helm: str, replicas: int, webhook: bool, cert_manager: bool, namespaced: bool
) -> None:
    docs = render(
        helm,
        "--set",
        f"replicaCount={replicas}",
        "--set",
        f"webhook.enabled={webhook}",
        "--set",
        f"webhook.certManager.enabled={cert_manager}",
        "--set",
        f"namespaced.enabled={namespaced}",
        *SERVED,
    )
    enabled = (
        frozenset({"peering"} if replicas > 1 else set())
        | ({"webhook"} if webhook else set())
        | ({"selfsigned"} if webhook and not cert_manager else set())
        | ({"namespaced"} if namespaced else set())
    )
    roles = [
        d
        for d in docs
        if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-operator")
    ]
    op = _granted(roles[0]) if roles else set()
    want = rbac.rules(rbac.OPERATOR, enabled, where="cluster")
    assert op == want, f"extra: {sorted(op - want)}; missing: {sorted(want - op)}"
    release = find(docs, "Role", "-operator")
    assert release["metadata"]["namespace"] == "ferry-system"
    got = _granted(release)
    want = rbac.rules(rbac.OPERATOR, enabled, where="release")
    assert got == want, f"Role extra: {sorted(got - want)}; missing: {sorted(want - got)}"
    binding = find(docs, "RoleBinding", "-operator")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": release["metadata"]["name"],
    }
    served = {
        d["metadata"]["namespace"]: _granted(d)
        for d in docs
        if d["kind"] == "Role" and d["metadata"]["name"].endswith("-operator-served")
    }
    assert set(served) == {"team-a", "llm"} | ({"ferry-system"} if namespaced else set())
    want = rbac.rules(rbac.OPERATOR, enabled, where="served")
    for ns, got in served.items():
        assert got == want, f"{ns}: extra: {sorted(got - want)}; missing: {sorted(want - got)}"
    # No Lease write anywhere but the release and the served namespaces.
    assert not {r for r in op if r[1] == "leases" and r[2] in ("create", "patch", "delete")}
    agent = _granted(find(docs, "ClusterRole", "-agent"))
    want = rbac.rules(rbac.AGENT)
    assert agent == want, f"extra: {sorted(agent - want)}; missing: {sorted(want - agent)}"
    certs = _granted(find(docs, "ClusterRole", "-agent-certs"))
    want = rbac.rules(rbac.AGENT, frozenset({"cluster"})) - rbac.rules(rbac.AGENT)
    assert certs == want, f"extra: {sorted(certs - want)}; missing: {sorted(want - certs)}"


def test_namespaced_install_watches_only_the_served_namespaces(helm: str) -> None:
    docs = render(helm, "--set", "namespaced.enabled=true", *SERVED)
    args = operator_container(docs)["args"]
    assert "--all-namespaces" not in args
    assert [a for a in args if a.startswith("--namespace=")] == [
        "--namespace=team-a",
        "--namespace=llm",
        "--namespace=ferry-system",
    ]
    hook = find(docs, "MutatingWebhookConfiguration")["webhooks"][0]
    assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == [
        "team-a",
        "llm",
        "ferry-system",
    ]
    vapb = find(docs, "ValidatingAdmissionPolicyBinding")
    assert vapb["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0]["values"] == [
        "team-a",
        "llm",
    ]
    done = subprocess.run(
        [
            helm,
            "template",
            "ferry",
            str(CHART),
            "--set",
            "namespaced.enabled=true",
            "--set",
            "replicaCount=2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "replicaCount: 1" in done.stderr


def test_admission_policy_is_what_ferry_operator_admission_builds(helm: str) -> None:
    from ferry_operator import admission

    docs = render(helm, "--set", "serviceAccount.name=op")
    got = [find(docs, "ValidatingAdmissionPolicy"), find(docs, "ValidatingAdmissionPolicyBinding")]
    assert got == admission.manifests("system:serviceaccount:ferry-system:op")
    docs = render(
        helm, "--set", "namespaced.enabled=true", "--set", "namespaced.namespaces[0]=team-a"
    )
    assert find(docs, "ValidatingAdmissionPolicyBinding") == admission.binding(["team-a"])
    assert not [
        d
        for d in render(helm, "--set", "admissionPolicy.enabled=false")
        if d["kind"].startswith("ValidatingAdmissionPolicy")
    ]


KOPF_WEBHOOKS = """
import json, kopf, ferry_operator.main
from kopf._core.engines.admission import build_webhooks
from kopf._cogs.structs.references import Resource
r = kopf.get_default_registry()
print(json.dumps(build_webhooks(r._webhooks.get_all_handlers(),
    resources=[Resource('', 'v1', 'pods')], name_suffix='ferry.dev',
    client_config={'service': {'namespace': 'ferry-system', 'name': 'ferry-webhook', 'port': 9443}})))
"""


def test_webhook_configuration_is_what_kopf_would_manage(helm: str) -> None:
    """The chart renders the configuration kopf used to create at run time (the operator
    no longer may): the same webhook, rules, selector and path, with the Service."""
    import json
    import os
    import sys

    env = {**os.environ, "FERRY_WEBHOOK_PORT": "9443", "FERRY_WEBHOOK_FAILURE_POLICY": "Fail"}
    done = subprocess.run(
        [sys.executable, "-c", KOPF_WEBHOOKS],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    kopf_hooks = json.loads(done.stdout.splitlines()[-1])
    config = find(render(helm), "MutatingWebhookConfiguration")
    assert config["metadata"]["name"] == "ferry.dev"
    assert "caBundle" not in json.dumps(config), "the operator or cert-manager writes the CA"
    assert config["webhooks"] == kopf_hooks
    cm = find(
        render(helm, "--set", "webhook.certManager.enabled=true"), "MutatingWebhookConfiguration"
    )
    assert (
        cm["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        == "ferry-system/ferry-webhook"
    )
    args = operator_container(render(helm))["args"]
    assert "--webhook-config=ca-bundle" in args
    assert (
        "--webhook-config=external"
        in operator_container(render(helm, "--set", "webhook.certManager.enabled=true"))["args"]
    )


def test_user_roles_aggregate_into_view_and_edit(helm: str) -> None:
    """People get read access with `view` and write access with `edit`; status stays
    writable only by the operator and agents."""
    docs = render(helm)
    view = find(docs, "ClusterRole", "-view")
    edit = find(docs, "ClusterRole", "-edit")
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert "rbac.authorization.k8s.io/aggregate-to-view" not in edit["metadata"]["labels"]
    granted = {
        (r, v)
        for rule in view["rules"] + edit["rules"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    for kind in ("weightsources", "refitjobs", "artifactcaches"):
        assert {(kind, "get"), (kind, "watch"), (kind, "create"), (kind, "delete")} <= granted
        assert not any(r == f"{kind}/status" and v in ("patch", "update") for r, v in granted)
    off = render(helm, "--set", "rbac.aggregateToUserRoles=false")
    assert not [
        d
        for d in off
        if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith(("-view", "-edit"))
    ]
