"""`kubectl auth can-i --list` with the operator's and an agent's real tokens, on the
chart's RBAC as applied to the real apiserver, prints exactly the tables of
docs/security.md, and those are what ferry_operator.rbac grants."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import yaml
from kubernetes import client as k8s_client

from ferry_dev.controlplane import REPO_ROOT
from ferry_operator import rbac
from tests.conftest import kubectl
from tests.integration.test_chart import helm, render  # noqa: F401  (the helm fixture)
from tests.kube_helpers import make_pod, pod_token

DOCS = REPO_ROOT / "docs" / "security.md"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
# What every authenticated user may do (system:basic-user, discovery, public-info-viewer).
BUILT_IN = re.compile(r"^self\w+reviews\.\w+\.k8s\.io$")


def can_i(kubeconfig: Path, token: str, namespace: str, tmp: Path) -> set[tuple[str, str, str]]:
    """The rows kubectl prints, as rbac.can_i builds them (verbs merged per resource and name)."""
    config = yaml.safe_load(kubeconfig.read_text())
    config["users"] = [{"name": "sa", "user": {"token": token}}]
    config["contexts"][0]["context"]["user"] = "sa"
    path = tmp / f"kubeconfig-{uuid.uuid4().hex[:6]}"
    path.write_text(yaml.safe_dump(config))
    out = kubectl(path, "auth", "can-i", "--list", "-n", namespace, check=True).stdout.splitlines()
    header = out[0]
    cols = [header.index(c) for c in ("Resources", "Non-Resource URLs", "Resource Names", "Verbs")]
    merged: dict[tuple[str, str], set[str]] = {}
    for line in out[1:]:
        res, urls, names, verbs = (
            line[a:b].strip() for a, b in zip(cols, [*cols[1:], None], strict=False)
        )
        if not res or BUILT_IN.match(res):
            assert res or urls, line
            continue
        for name in names.strip("[]").split() or [""]:
            merged.setdefault((res, name), set()).update(verbs.strip("[]").split())
    return {(r, n, " ".join(sorted(v))) for (r, n), v in merged.items()}


def documented(who: str, place: str) -> set[tuple[str, str, str]]:
    ns = {
        "release": "its release namespace",
        "served": "a served namespace",
        "other": "any other namespace",
    }[place]
    text = DOCS.read_text()
    block = text.split(f"**{who}**, in {ns}:\n", 1)[1].strip("\n").split("\n\n", 1)[0]
    rows = set()
    for line in block.splitlines()[2:]:
        cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
        rows.add((cells[0], cells[1], cells[2]))
    return rows


def test_docs_tables_are_the_permissions_table() -> None:
    assert rbac.can_i_markdown() in DOCS.read_text(), (
        "docs/security.md: paste ferry_operator.rbac.can_i_markdown()"
    )


def test_kubectl_can_i_prints_exactly_the_documented_table(
    helm: str,  # noqa: F811  (the fixture imported above)
    kubeconfig: Path,
    api_client: k8s_client.ApiClient,
    namespace: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    core = k8s_client.CoreV1Api(api_client)
    release, other = f"cani-{uuid.uuid4().hex[:6]}", f"other-{uuid.uuid4().hex[:6]}"
    for ns in (release, other):
        core.create_namespace({"metadata": {"name": ns}})
    docs = render(
        helm,
        "--set",
        f"agent.rbac.bindings[0].namespace={namespace}",
        "--set",
        "agent.rbac.bindings[0].serviceAccount=default",
        namespace=release,
        release=release,
    )
    docs = [d for d in docs if d["kind"] in RBAC_KINDS]
    kubectl(
        kubeconfig,
        "apply",
        "--server-side",
        "-f",
        "-",
        input="---\n".join(yaml.safe_dump(d) for d in docs),
        check=True,
    )
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]
    op = core.create_namespaced_service_account_token(
        sa, release, {"spec": {"audiences": []}}
    ).status.token
    make_pod(api_client, namespace, "agent-0", {"app": "x"})
    agent = pod_token(api_client, namespace, "agent-0")
    enabled = frozenset({"webhook", "selfsigned"})
    for place, ns in (("release", release), ("served", namespace), ("other", other)):
        got = can_i(kubeconfig, op, ns, tmp_path)
        assert got == documented("operator", place), f"operator in {place} ({ns})"
        assert got == rbac.can_i(rbac.OPERATOR, enabled, rbac.PLACES[place])
    got = can_i(kubeconfig, agent, namespace, tmp_path)
    agent_enabled = enabled | {"cluster"}  # agent.rbac.bindings binds -agent-certs too
    assert (
        got == documented("agent", "served") == rbac.can_i(rbac.AGENT, agent_enabled, ("cluster",))
    )
    # Elsewhere only the cluster-scoped rule: asking for its own pod certificate.
    elsewhere = rbac.can_i(rbac.AGENT, agent_enabled, ("cluster",)) - rbac.can_i(
        rbac.AGENT, enabled, ("cluster",)
    )
    assert {r for r, _, _ in elsewhere} == {"certificatesigningrequests.certificates.k8s.io"}
    assert can_i(kubeconfig, agent, other, tmp_path) == elsewhere, (
        "agents have no other rights elsewhere"
    )
