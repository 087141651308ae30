"""What a pod's own service-account token may write, enforced by the apiserver.

A ValidatingAdmissionPolicy (CEL, evaluated in kube-apiserver) over every request
that carries a pod-bound token: the `authentication.kubernetes.io/pod-name`
extra claim of a TokenRequest bound to a pod, which is what the kubelet mounts
into every container of a pod. So it covers the agent sidecar and any other
container holding that pod's token, whatever RBAC the ServiceAccount has. The
operator's own ServiceAccount is excluded (it assigns). For such a request:

1. agent Leases (named `ferry-agent-*`, or labelled LEASE_LABEL or the operator's
   canary label, before or after the write): only `ferry-agent-<own pod>` in the
   token's own namespace; holderIdentity = own pod; only the agent's annotation
   keys (`report.*`, `followreport.*`) may change (never `assign.*` / `follow.*`);
   labels unchanged but for LEASE_LABEL, which stays "true";
2. WeightSource and ArtifactCache status: only the entry of `status.members`
   keyed by the own pod may change; every other member and every other status
   field stays as it was;
3. RefitJob status: never (the operator folds reports into it).

This module is the one source: the chart's template is generated from it
(`python -m ferry_operator.admission`; tests/unit/test_admission_policy.py fails
when it is stale) and the dev cluster and test fixtures apply `manifests()`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from ferry_api import GROUP, leases

POLICY_NAME = "ferry-pod-writes"
POD_NAME_CLAIM = "authentication.kubernetes.io/pod-name"
CANARY_LABEL = "ferry.dev/role"  # health.CANARY_LABEL (not imported: health pulls in kopf)
AGENT_KEYS = (leases.REPORT, leases.FOLLOW_REPORT)  # what an agent writes on its own Lease
LEASE_PREFIX = leases.lease_name("")
CHART_TEMPLATE = (
    Path(__file__).resolve().parents[2] / "charts" / "ferry" / "templates" / "admission-policy.yaml"
)
# Stand-ins the generator swaps for Helm expressions in the chart template.
_USER = "@@OPERATOR_USER@@"
_NS_SELECTOR = "@@NAMESPACE_SELECTOR@@"


def _q(s: str) -> str:
    """A CEL string literal (the values here hold no quote or backslash)."""
    assert "'" not in s and "\\" not in s, s
    return f"'{s}'"


def _agent_key(k: str) -> str:
    return " || ".join(f"{k}.startsWith({_q(p)})" for p in AGENT_KEYS)


def _variables() -> list[dict[str, str]]:
    v = [
        ("pod", f"request.userInfo.extra[{_q(POD_NAME_CLAIM)}][0]"),
        # The token's ServiceAccount lives in the request's namespace (a pod in
        # another namespace could share this pod's name).
        (
            "homeNamespace",
            "request.userInfo.username.startsWith('system:serviceaccount:' + request.namespace + ':')",
        ),
        ("obj", "request.operation == 'DELETE' ? oldObject : object"),
        (
            "newLabels",
            "request.operation != 'DELETE' && has(object.metadata.labels) ? "
            "object.metadata.labels : {}",
        ),
        (
            "oldLabels",
            "oldObject != null && has(oldObject.metadata.labels) ? oldObject.metadata.labels : {}",
        ),
        (
            "newAnnotations",
            "request.operation != 'DELETE' && has(object.metadata.annotations) ? "
            "object.metadata.annotations : {}",
        ),
        (
            "oldAnnotations",
            "oldObject != null && has(oldObject.metadata.annotations) ? "
            "oldObject.metadata.annotations : {}",
        ),
        # leases.lease_name: cut at 253 characters (a Lease name's limit)
        (
            "ownLease",
            f"size({_q(LEASE_PREFIX)} + variables.pod) > 253 ? "
            f"({_q(LEASE_PREFIX)} + variables.pod).substring(0, 253) : "
            f"{_q(LEASE_PREFIX)} + variables.pod",
        ),
        (
            "isAgentLease",
            f"request.resource.group == 'coordination.k8s.io' && "
            f"(variables.obj.metadata.name.startsWith({_q(LEASE_PREFIX)}) || "
            f"{_q(leases.LEASE_LABEL)} in variables.newLabels || "
            f"{_q(leases.LEASE_LABEL)} in variables.oldLabels || "
            f"{_q(CANARY_LABEL)} in variables.newLabels || {_q(CANARY_LABEL)} in variables.oldLabels)",
        ),
        (
            "isMemberStatus",
            f"request.resource.group == {_q(GROUP)} && request.subResource == 'status' && "
            "request.resource.resource in ['weightsources', 'artifactcaches']",
        ),
        ("newStatus", "has(object.status) ? object.status : {}"),
        ("oldStatus", "oldObject != null && has(oldObject.status) ? oldObject.status : {}"),
        ("newMembers", "has(variables.newStatus.members) ? variables.newStatus.members : []"),
        ("oldMembers", "has(variables.oldStatus.members) ? variables.oldStatus.members : []"),
    ]
    return [{"name": n, "expression": e} for n, e in v]


def _validations() -> list[dict[str, str]]:
    lease = "!variables.isAgentLease || "
    member = "!variables.isMemberStatus || "
    who = "'the token of pod ' + variables.pod + ' '"
    return [
        {
            "expression": lease + "(variables.homeNamespace && variables.obj.metadata.name == "
            "variables.ownLease)",
            "messageExpression": who
            + "+ 'may write only its own agent Lease ' + variables.ownLease "
            "+ ', not ' + variables.obj.metadata.name",
            "reason": "Forbidden",
        },
        {
            "expression": lease + "request.operation == 'DELETE' || "
            "(has(object.spec.holderIdentity) && "
            "object.spec.holderIdentity == variables.pod)",
            "messageExpression": who + "+ 'must hold its own Lease: spec.holderIdentity must be ' "
            "+ variables.pod",
            "reason": "Forbidden",
        },
        {
            "expression": lease + "request.operation == 'DELETE' || ("
            f"variables.newAnnotations.all(k, {_agent_key('k')} || "
            "(k in variables.oldAnnotations && "
            "variables.oldAnnotations[k] == variables.newAnnotations[k])) && "
            f"variables.oldAnnotations.all(k, {_agent_key('k')} || "
            "k in variables.newAnnotations))",
            "messageExpression": who
            + "+ 'may change only the "
            + ", ".join(f"{p}*" for p in AGENT_KEYS)
            + " annotations of its Lease ("
            + leases.ASSIGN
            + "* and "
            + leases.FOLLOW
            + "* belong to the operator)'",
            "reason": "Forbidden",
        },
        {
            "expression": lease + "request.operation == 'DELETE' || ("
            f"{_q(leases.LEASE_LABEL)} in variables.newLabels && "
            f"variables.newLabels[{_q(leases.LEASE_LABEL)}] == 'true' && "
            f"variables.newLabels.all(k, k == {_q(leases.LEASE_LABEL)} || "
            "(k in variables.oldLabels && variables.oldLabels[k] == variables.newLabels[k])) && "
            "variables.oldLabels.all(k, k in variables.newLabels))",
            "messageExpression": who
            + "+ 'may not change the labels of its Lease (but "
            + leases.LEASE_LABEL
            + "=true)'",
            "reason": "Forbidden",
        },
        {
            "expression": member + "variables.homeNamespace && "
            "variables.newMembers.filter(m, m.pod != variables.pod) == "
            "variables.oldMembers.filter(m, m.pod != variables.pod)",
            "messageExpression": who
            + "+ 'may write only its own entry (pod: ' + variables.pod + ') "
            "of status.members'",
            "reason": "Forbidden",
        },
        {
            "expression": member + "variables.newStatus.all(k, k == 'members' || "
            "(k in variables.oldStatus && variables.oldStatus[k] == variables.newStatus[k])) && "
            "variables.oldStatus.all(k, k == 'members' || k in variables.newStatus)",
            "messageExpression": who + "+ 'may change only its own entry of status.members, "
            "no other status field'",
            "reason": "Forbidden",
        },
        {
            "expression": f"!(request.resource.group == {_q(GROUP)} && "
            "request.resource.resource == 'refitjobs' && request.subResource == 'status')",
            "messageExpression": who
            + "+ 'may not write RefitJob status (the operator folds reports "
            "from Leases into it)'",
            "reason": "Forbidden",
        },
    ]


def policy(operator_user: str) -> dict[str, Any]:
    """The ValidatingAdmissionPolicy; `operator_user` is the operator's username
    (`system:serviceaccount:<ns>:<name>`), whose requests it does not judge."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": POLICY_NAME},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": ["coordination.k8s.io"],
                        "apiVersions": ["*"],
                        "operations": ["CREATE", "UPDATE", "DELETE"],
                        "resources": ["leases"],
                    },
                    {
                        "apiGroups": [GROUP],
                        "apiVersions": ["*"],
                        "operations": ["UPDATE"],
                        "resources": [
                            "weightsources/status",
                            "artifactcaches/status",
                            "refitjobs/status",
                        ],
                    },
                ]
            },
            "matchConditions": [
                {
                    "name": "pod-bound-token",
                    "expression": f"{_q(POD_NAME_CLAIM)} in request.userInfo.extra",
                },
                {
                    "name": "not-the-operator",
                    "expression": f"request.userInfo.username != {_q(operator_user)}",
                },
            ],
            "variables": _variables(),
            "validations": _validations(),
        },
    }


def binding(namespaces: list[str] | None = None) -> dict[str, Any]:
    """The binding: every namespace, or only `namespaces` (the namespaced install)."""
    spec: dict[str, Any] = {
        "policyName": POLICY_NAME,
        "validationActions": ["Deny"],
        "matchResources": {},
    }
    if namespaces:
        spec["matchResources"] = {
            "namespaceSelector": {
                "matchExpressions": [
                    {
                        "key": "kubernetes.io/metadata.name",
                        "operator": "In",
                        "values": list(namespaces),
                    }
                ]
            }
        }
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": POLICY_NAME},
        "spec": spec,
    }


def manifests(operator_user: str, namespaces: list[str] | None = None) -> list[dict[str, Any]]:
    return [policy(operator_user), binding(namespaces)]


def chart_template() -> str:
    """charts/ferry/templates/admission-policy.yaml: manifests() with the operator's
    username and the namespaced install's selector filled in by Helm."""
    pol = yaml.safe_dump(policy(_USER), sort_keys=False, width=1000)
    bind = binding()
    bind["spec"]["matchResources"] = _NS_SELECTOR
    text = yaml.safe_dump(bind, sort_keys=False, width=1000)
    user = '{{ include "ferry.operatorUser" . }}'
    selector = "\n".join(
        [
            "{{- if .Values.namespaced.enabled }}",
            "    namespaceSelector:",
            "      matchExpressions:",
            "        - key: kubernetes.io/metadata.name",
            "          operator: In",
            "          values: {{ toJson .Values.namespaced.namespaces }}",
            "{{- else }} {}",
            "{{- end }}",
        ]
    )
    return "".join(
        [
            "# Generated by `python -m ferry_operator.admission` from ferry_operator/admission.py;\n",
            "# do not edit. What a pod's own service-account token may write (docs/security.md).\n",
            "{{- if .Values.admissionPolicy.enabled }}\n",
            pol.replace(_USER, user),
            "---\n",
            text.replace(f"matchResources: '{_NS_SELECTOR}'", "matchResources:" + selector),
            "{{- end }}\n",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 when the chart template is stale")
    args = p.parse_args(argv)
    text = chart_template()
    if args.check:
        stale = not CHART_TEMPLATE.exists() or CHART_TEMPLATE.read_text() != text
        if stale:
            print(
                f"{CHART_TEMPLATE} is stale: run python -m ferry_operator.admission",
                file=sys.stderr,
            )
        return int(stale)
    CHART_TEMPLATE.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
