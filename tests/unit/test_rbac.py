"""The permissions table (ferry_operator.rbac) covers every API call the code makes.

The scan is a deliberately simple heuristic:
- kubernetes-client calls are found by method name (`patch_namespaced_lease`,
  `read_namespaced_pod`, `..._custom_object_status`); an unknown resource in a
  method name fails the test, so a new kind of call cannot slip by; a list method
  handed to `watch.Watch().stream(...)` is a watch;
- a custom-object call's plural comes from the `X.PLURAL` (or `plural`
  variable, meaning all three kinds) in the next few lines of the call;
- kopf handlers come from kopf's registry after importing ferry_operator.main
  with the webhook on.
Files under operator/ need OPERATOR, files under agent/ need AGENT.
tests/integration/test_chart.py checks the chart grants exactly the table.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from ferry_operator import rbac

REPO = Path(__file__).resolve().parents[2]
# dev/ is the local control plane used by tests and the demo (admin credentials);
# kubectl/ is the kubectl plugin, which runs with the user's own credentials.
SKIP = ("/dev/", "/proto/", "/bench/", "/kubectl/")
CALL = re.compile(
    r"\.(get|list|read|create|patch|replace|delete)_(namespaced_|cluster_)?([a-z_]+?)"
    r"(_for_all_namespaces)?\("
)
# A watch: the client's list method handed to watch.Watch().stream.
WATCH = re.compile(r"\.stream\(\s*\w+\.list_(namespaced_)([a-z_]+?),")
VERBS = {
    "get": "get",
    "list": "list",
    "read": "get",
    "create": "create",
    "patch": "patch",
    "replace": "update",
    "delete": "delete",
}
RESOURCES = {
    "lease": (rbac.COORD, "leases"),
    "pod": ("", "pods"),
    "secret": ("", "secrets"),
    "event": ("", "events"),
    "custom_object": (rbac.FERRY, None),
    "custom_object_status": (rbac.FERRY, None),
}
# Cluster-scoped resources the code may touch (client methods without namespaced_).
CLUSTER_RESOURCES = {
    "mutating_webhook_configuration": (
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
    ),
    "certificate_signing_request": (rbac.CERTS, "certificatesigningrequests"),
    "certificate_signing_request_approval": (rbac.CERTS, "certificatesigningrequests/approval"),
    "certificate_signing_request_status": (rbac.CERTS, "certificatesigningrequests/status"),
}
CLUSTER_SCOPED = {
    "namespace",
    "node",
    "custom_resource_definition",
    "persistent_volume",
    "mutating_webhook_configuration",
    "validating_webhook_configuration",
    "cluster_role",
    "cluster_role_binding",
    "storage_class",
}
PLURALS = {
    "weightsource": "weightsources",
    "refitjob": "refitjobs",
    "artifactcache": "artifactcaches",
}
# ferry_api.ssa.apply_status (and the operator's kube.apply_status) patch the
# status of the model class they are given.
APPLY_STATUS = re.compile(r"\b(?:ssa|kube)\.apply_status\(")
MODEL = re.compile(r"\b(WeightSource|RefitJob|ArtifactCache)\b")


def named_kinds(call: str) -> list[str]:
    named = re.findall(r"(\w+)\.PLURAL", call) or MODEL.findall(call)
    return [PLURALS[n.lower()] for n in named if n.lower() in PLURALS]


def kinds_in(call: str, before: str, root: Path) -> list[str]:
    """Plurals a custom-object call touches. A `plural` parameter is resolved one
    level up: the kinds the enclosing function's callers pass; else all kinds."""
    if named := named_kinds(call):
        return named[:1]
    if not re.search(r"\b(plural|model)\b", call):
        return []
    fn = re.findall(r"def (\w+)\(", before)[-1]
    sites = [
        t[c.end() : c.end() + 200]
        for f in root.rglob("*.py")
        for t in [f.read_text()]
        for c in re.finditer(rf"\b{fn}\(", t)
        if not t[max(0, c.start() - 4) : c.start()].endswith("def ")
    ]
    kinds = [named_kinds(site)[:1] for site in sites]
    if not sites or any(not k for k in kinds):
        return list(rbac.KINDS)
    return sorted({k[0] for k in kinds})


def scan(root: Path) -> dict[tuple[str, str, str], list[str]]:
    """(group, resource, verb) -> where the call is."""
    found: dict[tuple[str, str, str], list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        if any(s in str(path) for s in SKIP):
            continue
        text = path.read_text()
        for m in CALL.finditer(text):
            verb, what = VERBS[m.group(1)], m.group(3)
            scoped = m.group(2) or m.group(4)
            if what in CLUSTER_RESOURCES and not scoped:
                where = f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}"
                found.setdefault((*CLUSTER_RESOURCES[what], verb), []).append(where)
                continue
            if what not in RESOURCES or not scoped:
                # Cluster-scoped client methods carry no namespaced_/cluster_ marker.
                if what in CLUSTER_SCOPED or (scoped and what not in RESOURCES):
                    raise AssertionError(f"{path}: unmapped API call {m.group(0)}")
                continue  # not a Kubernetes client method (read_text, kube.list_pods)
            group, resource = RESOURCES[what]
            call = text[m.end() : m.end() + 400]
            call = call[: call.find("\n\n")] if "\n\n" in call else call
            where = f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}"
            if resource is None:
                suffix = "/status" if what.endswith("_status") else ""
                resources = [p + suffix for p in kinds_in(call, text[: m.start()], root)]
                assert resources, f"{where}: cannot tell which kind {m.group(0)} touches"
            else:
                resources = [resource]
            verbs = [verb]
            if verb == "patch" and "APPLY" in call and not what.endswith("_status"):
                verbs.append("create")  # server-side apply creates an absent object
            for r in resources:
                for v in verbs:
                    found.setdefault((group, r, v), []).append(where)
        for m in WATCH.finditer(text):
            if m.group(2) in RESOURCES and RESOURCES[m.group(2)][1] is not None:
                group, resource = RESOURCES[m.group(2)]
                where = f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}"
                found.setdefault((group, resource, "watch"), []).append(where)
        for m in APPLY_STATUS.finditer(text):
            call = text[m.end() : m.end() + 400]
            where = f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}"
            kinds = kinds_in(call.split("\n\n")[0], text[: m.start()], root)
            assert kinds, f"{where}: cannot tell which kind {m.group(0)} touches"
            for k in kinds:
                found.setdefault((rbac.FERRY, f"{k}/status", "patch"), []).append(where)
    return found


def kopf_needs() -> dict[tuple[str, str, str], list[str]]:
    """What kopf needs for the handlers main.py registers (webhook on)."""
    probe = (
        "import json, kopf, ferry_operator.main\n"
        "r = kopf.get_default_registry()\n"
        "out = []\n"
        "for reg, verbs in ((r._watching, ['list', 'watch']),\n"
        "                   (r._changing, ['list', 'watch', 'patch']),\n"
        "                   (r._spawning, ['list', 'watch', 'patch'])):\n"
        "    for h in reg.get_all_handlers():\n"
        "        s = h.selector\n"
        "        out.append([s.group or '', s.plural or s.any_name, verbs, h.id])\n"
        "out.append([None, None, [], str(len(r._webhooks.get_all_handlers()))])\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "FERRY_WEBHOOK_PORT": "9443"}
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO, timeout=60
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout.splitlines()[-1])
    *handlers, (_, _, _, webhooks) = rows
    assert int(webhooks) >= 1, "the injection webhook did not register"
    found: dict[tuple[str, str, str], list[str]] = {}
    for group, plural, verbs, hid in handlers:
        for v in verbs:
            found.setdefault((group, plural, v), []).append(f"kopf handler {hid}")
    return found


def covered(table: tuple[rbac.Permission, ...]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for g, r, v, _ in rbac.rules(
            table, frozenset({"peering", "webhook", "selfsigned", "cluster"})
        )
    }


def test_scan_finds_the_calls_we_know_about() -> None:
    op = scan(REPO / "operator" / "ferry_operator")
    assert ("", "pods", "list") in op
    assert (rbac.COORD, "leases", "delete") in op
    assert {(rbac.FERRY, f"{k}/status", "patch") for k in rbac.KINDS} <= set(op)
    assert (rbac.FERRY, "weightsources", "get") in op
    agent = scan(REPO / "agent" / "ferry_agent")
    assert (rbac.COORD, "leases", "patch") in agent
    assert (rbac.COORD, "leases", "watch") in agent


def test_every_operator_call_and_handler_is_in_the_table() -> None:
    need = {**scan(REPO / "operator" / "ferry_operator")}
    for key, where in kopf_needs().items():
        need.setdefault(key, []).extend(where)
    missing = {k: v for k, v in need.items() if k not in covered(rbac.OPERATOR)}
    assert not missing, f"add to ferry_operator.rbac.OPERATOR: {missing}"


def test_every_agent_call_is_in_the_table() -> None:
    need = scan(REPO / "agent" / "ferry_agent")
    missing = {k: v for k, v in need.items() if k not in covered(rbac.AGENT)}
    assert not missing, f"add to ferry_operator.rbac.AGENT: {missing}"


def test_no_stale_code_grants() -> None:
    """A permission justified by code must still be used by it; drop it when not."""
    used = {
        "operator": set(scan(REPO / "operator" / "ferry_operator")) | set(kopf_needs()),
        "agent": set(scan(REPO / "agent" / "ferry_agent")),
    }
    for who, table in (("operator", rbac.OPERATOR), ("agent", rbac.AGENT)):
        for p in table:
            if p.via != "code":
                continue
            for verb in p.verbs:
                assert (p.group, p.resource, verb) in used[who], (
                    f"{who}: {p.group}/{p.resource} {verb} is granted for code that no longer "
                    f"makes the call ({p.reason})"
                )


def test_every_permission_says_why() -> None:
    for p in (*rbac.OPERATOR, *rbac.AGENT):
        assert p.via in ("code", "kopf", "apiserver")
        assert len(p.reason) > 15, p
