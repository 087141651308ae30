"""The apiserver itself refuses bad resources, with a message naming the field.

Each case is applied with `kubectl apply --server-side` against the real
kube-apiserver; the CRD's schema and CEL rules are what refuse it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import kubectl

WS: dict[str, Any] = {
    "apiVersion": "ferry.dev/v1alpha1",
    "kind": "WeightSource",
    "metadata": {"name": "ws"},
    "spec": {"model": {"name": "llama"}, "selector": {"matchLabels": {"app": "trainer"}}},
}
RJ: dict[str, Any] = {
    "apiVersion": "ferry.dev/v1alpha1",
    "kind": "RefitJob",
    "metadata": {"name": "rj"},
    "spec": {"sourceRef": {"name": "ws"}, "targets": {"matchLabels": {"app": "inference"}}},
}
AC: dict[str, Any] = {
    "apiVersion": "ferry.dev/v1alpha1",
    "kind": "ArtifactCache",
    "metadata": {"name": "ac"},
    "spec": {
        "kinds": ["triton"],
        "identity": {"triton": "3.7.1", "cuda": "13.0", "gpuArch": "sm_90"},
        "sources": {"matchLabels": {"warm": "true"}},
        "targets": {"matchLabels": {"app": "inference"}},
    },
}


def with_(base: dict, path: str, value: Any) -> dict:
    """A copy of base with spec field at dotted `path` set (or removed when value is DELETE)."""
    obj = copy.deepcopy(base)
    *parents, leaf = path.split(".")
    node = obj
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return obj


DELETE = object()

# (id, object, words the apiserver's message must contain)
CREATE_CASES = [
    ("ws-missing-model", with_(WS, "spec.model", DELETE), ["spec.model", "Required"]),
    ("ws-missing-selector", with_(WS, "spec.selector", DELETE), ["spec.selector", "Required"]),
    ("ws-empty-model-name", with_(WS, "spec.model.name", ""), ["spec.model.name"]),
    ("ws-bad-memory", with_(WS, "spec.memory", "gpu"), ["spec.memory", "cuda", "host"]),
    (
        "ws-bad-dtype",
        with_(WS, "spec.layout", {"dtype": "fp64"}),
        ["spec.layout.dtype", "bfloat16"],
    ),
    (
        "ws-tp-zero",
        with_(WS, "spec.layout", {"tensorParallelSize": 0}),
        ["spec.layout.tensorParallelSize", "0"],
    ),
    (
        "ws-ranks-per-pod-not-dividing-tp",
        with_(WS, "spec.layout", {"tensorParallelSize": 4, "ranksPerPod": 3}),
        ["spec.layout.ranksPerPod", "must divide", "tensorParallelSize"],
    ),
    (
        "ws-ranks-per-pod-too-many",
        with_(WS, "spec.layout", {"tensorParallelSize": 128, "ranksPerPod": 128}),
        ["spec.layout.ranksPerPod", "64"],
    ),
    (
        "ws-bad-quantization",
        with_(WS, "spec.layout", {"quantization": "int4"}),
        ["spec.layout.quantization"],
    ),
    (
        "ws-rails-explicit-no-devices",
        with_(WS, "spec.rails", {"mode": "explicit"}),
        ["spec.rails.devices", "explicit"],
    ),
    (
        "ws-rails-devices-with-auto",
        with_(WS, "spec.rails", {"mode": "auto", "devices": {"0": ["mlx5_0:1"]}}),
        ["spec.rails.devices", "only allowed"],
    ),
    ("ws-bad-rails-mode", with_(WS, "spec.rails", {"mode": "fastest"}), ["spec.rails.mode"]),
    (
        "ws-lease-too-short",
        with_(WS, "spec.heartbeat", {"leaseDurationSeconds": 1}),
        ["spec.heartbeat.leaseDurationSeconds"],
    ),
    (
        "ws-renew-not-below-lease",
        with_(WS, "spec.heartbeat", {"leaseDurationSeconds": 10, "renewIntervalSeconds": 10}),
        ["spec.heartbeat.renewIntervalSeconds", "below"],
    ),
    (
        "ws-empty-selector",
        with_(WS, "spec.selector", {"matchLabels": {}}),
        ["spec.selector", "at least one label"],
    ),
    (
        "ws-bad-selector-operator",
        with_(WS, "spec.selector", {"matchExpressions": [{"key": "a", "operator": "Near"}]}),
        ["spec.selector.matchExpressions[0].operator"],
    ),
    # Issue 19 (small ones, d): label keys and values in selectors have Kubernetes label syntax.
    (
        "ws-selector-label-key-with-space",
        with_(WS, "spec.selector", {"matchLabels": {"app name": "x"}}),
        ["spec.selector.matchLabels", "'app name'", "label key"],
    ),
    (
        "ws-selector-label-key-bad-prefix",
        with_(WS, "spec.selector", {"matchLabels": {"Ferry.dev/app": "x"}}),
        ["spec.selector.matchLabels", "'Ferry.dev/app'"],
    ),
    (
        "ws-selector-label-key-name-too-long",
        with_(WS, "spec.selector", {"matchLabels": {"ferry.dev/" + "a" * 64: "x"}}),
        ["spec.selector.matchLabels", "63"],
    ),
    (
        "ws-selector-label-value-bad",
        with_(WS, "spec.selector", {"matchLabels": {"app": "trainer!"}}),
        ["spec.selector.matchLabels.app"],
    ),
    (
        "ws-selector-label-value-too-long",
        with_(WS, "spec.selector", {"matchLabels": {"app": "a" * 64}}),
        ["spec.selector.matchLabels.app", "63"],
    ),
    (
        "rj-targets-expression-key-bad",
        with_(RJ, "spec.targets", {"matchExpressions": [{"key": "-app", "operator": "Exists"}]}),
        ["spec.targets.matchExpressions[0].key", "label key"],
    ),
    (
        "rj-targets-expression-value-bad",
        with_(
            RJ,
            "spec.targets",
            {"matchExpressions": [{"key": "app", "operator": "In", "values": ["a b"]}]},
        ),
        ["spec.targets.matchExpressions[0].values[0]"],
    ),
    (
        "ac-sources-label-key-two-slashes",
        with_(AC, "spec.sources", {"matchLabels": {"a/b/c": "x"}}),
        ["spec.sources.matchLabels", "'a/b/c'"],
    ),
    (
        "ac-targets-label-value-bad",
        with_(AC, "spec.targets", {"matchLabels": {"app": "-x"}}),
        ["spec.targets.matchLabels.app"],
    ),
    ("rj-missing-source", with_(RJ, "spec.sourceRef", DELETE), ["spec.sourceRef", "Required"]),
    ("rj-missing-targets", with_(RJ, "spec.targets", DELETE), ["spec.targets", "Required"]),
    (
        "rj-bad-source-name",
        with_(RJ, "spec.sourceRef", {"name": "Not_A_Name"}),
        ["spec.sourceRef.name"],
    ),
    (
        "rj-bad-strategy",
        with_(RJ, "spec.strategy", {"type": "broadcast"}),
        ["spec.strategy.type", "direct"],
    ),
    (
        "rj-chunk-too-small",
        with_(RJ, "spec.strategy", {"chunkBytes": 1024}),
        ["spec.strategy.chunkBytes", "1048576"],
    ),
    (
        "rj-fanout-too-big",
        with_(RJ, "spec.strategy", {"maxFanOut": 1000}),
        ["spec.strategy.maxFanOut", "64"],
    ),
    (
        "rj-parallel-with-chain",
        with_(RJ, "spec.strategy", {"type": "chain", "parallelSources": 2}),
        ["spec.strategy.parallelSources", "direct"],
    ),
    ("rj-negative-backoff", with_(RJ, "spec.backoffLimit", -1), ["spec.backoffLimit"]),
    ("rj-zero-timeout", with_(RJ, "spec.timeoutSeconds", 0), ["spec.timeoutSeconds"]),
    (
        "rj-negative-ttl",
        with_(RJ, "spec.ttlSecondsAfterFinished", -5),
        ["spec.ttlSecondsAfterFinished"],
    ),
    ("rj-bad-version", with_(RJ, "spec.version", "step 12"), ["spec.version"]),
    (
        "rj-reshard-without-tp",
        with_(RJ, "spec.transform", {"type": "reshard"}),
        ["spec.transform.targetTensorParallelSize", "required"],
    ),
    (
        "rj-tp-without-reshard",
        with_(RJ, "spec.transform", {"type": "fp8-block", "targetTensorParallelSize": 2}),
        ["spec.transform.targetTensorParallelSize", "only allowed"],
    ),
    (
        "rj-target-ranks-not-dividing-reshard-tp",
        with_(
            RJ,
            "spec",
            {
                **RJ["spec"],
                "transform": {"type": "reshard", "targetTensorParallelSize": 2},
                "targetRanksPerPod": 4,
            },
        ),
        ["spec.targetRanksPerPod", "must divide"],
    ),
    ("rj-bad-pause-mode", with_(RJ, "spec.pause", {"mode": "sleep"}), ["spec.pause.mode"]),
    ("rj-bad-transform", with_(RJ, "spec.transform", {"type": "int4"}), ["spec.transform.type"]),
    ("ac-no-kinds", with_(AC, "spec.kinds", []), ["spec.kinds"]),
    ("ac-bad-kind", with_(AC, "spec.kinds", ["jax"]), ["spec.kinds[0]", "triton"]),
    (
        "ac-torch-compile-needs-model",
        with_(AC, "spec.kinds", ["torch-compile"]),
        ["spec.identity.model", "torch-compile"],
    ),
    (
        "ac-triton-needs-versions",
        with_(AC, "spec.identity", {"triton": "3.7.1"}),
        ["spec.identity", "cuda", "gpuArch"],
    ),
    ("ac-zero-max-bytes", with_(AC, "spec.maxBytes", 0), ["spec.maxBytes"]),
    (
        "ac-bad-digest",
        with_(AC, "spec.identity", {"compileConfigDigest": "md5:abc"}),
        ["spec.identity.compileConfigDigest"],
    ),
    ("ac-bad-arch", with_(AC, "spec.identity", {"gpuArch": "hopper"}), ["spec.identity.gpuArch"]),
    (
        "ac-trust-without-secret",
        with_(AC, "spec.trust", {"required": True}),
        ["spec.trust.secretRef", "Required"],
    ),
    (
        "ac-trust-neither-signed-nor-opted-in",
        with_(AC, "spec.trust", {"allowUnsigned": False}),
        ["spec.trust.secretRef", "allowUnsigned: true"],
    ),
    ("ac-missing-targets", with_(AC, "spec.targets", DELETE), ["spec.targets", "Required"]),
]

# (id, valid object, dotted field to change afterwards, new value, words in the message)
UPDATE_CASES = [
    (
        "rj-source-immutable",
        RJ,
        "spec.sourceRef",
        {"name": "other"},
        ["spec.sourceRef", "immutable"],
    ),
    (
        "rj-targets-immutable",
        RJ,
        "spec.targets",
        {"matchLabels": {"app": "other"}},
        ["spec.targets", "immutable"],
    ),
    ("rj-version-immutable", RJ, "spec.version", "17", ["spec.version", "immutable"]),
    (
        "rj-strategy-immutable",
        RJ,
        "spec.strategy",
        {"type": "tree"},
        ["spec.strategy", "immutable"],
    ),
    ("ws-model-immutable", WS, "spec.model.name", "mistral", ["spec.model.name", "immutable"]),
    (
        "ac-identity-immutable",
        AC,
        "spec.identity",
        {"triton": "3.8.0", "cuda": "13.0", "gpuArch": "sm_90"},
        ["spec.identity", "immutable"],
    ),
]


def apply(kubeconfig: Path, namespace: str, obj: dict) -> tuple[int, str]:
    done = kubectl(
        kubeconfig,
        "apply",
        "--server-side",
        "--field-manager=test",
        "-n",
        namespace,
        "-f",
        "-",
        input=yaml.safe_dump(obj),
    )
    return done.returncode, done.stdout + done.stderr


def test_valid_samples_accepted(kubeconfig: Path, namespace: str) -> None:
    for obj in (WS, RJ, AC):
        code, out = apply(kubeconfig, namespace, obj)
        assert code == 0, out


@pytest.mark.parametrize(("case", "obj", "words"), CREATE_CASES, ids=[c[0] for c in CREATE_CASES])
def test_invalid_resource_refused(
    kubeconfig: Path, namespace: str, case: str, obj: dict, words: list[str]
) -> None:
    code, out = apply(kubeconfig, namespace, obj)
    assert code != 0, f"{case} was accepted"
    for word in words:
        assert word in out, f"{case}: {word!r} not in {out!r}"
    got = kubectl(kubeconfig, "get", obj["kind"].lower(), obj["metadata"]["name"], "-n", namespace)
    assert got.returncode != 0, "nothing may be stored for a refused object"


@pytest.mark.parametrize(
    ("case", "obj", "path", "value", "words"), UPDATE_CASES, ids=[c[0] for c in UPDATE_CASES]
)
def test_immutable_field_change_refused(
    kubeconfig: Path, namespace: str, case: str, obj: dict, path: str, value: Any, words: list[str]
) -> None:
    code, out = apply(kubeconfig, namespace, obj)
    assert code == 0, out
    code, out = apply(kubeconfig, namespace, with_(obj, path, value))
    assert code != 0, f"{case}: change was accepted"
    for word in words:
        assert word in out, f"{case}: {word!r} not in {out!r}"


def test_mutable_fields_still_change(kubeconfig: Path, namespace: str) -> None:
    """Immutability is targeted: e.g. a RefitJob's timeout and a source's revision may change."""
    assert apply(kubeconfig, namespace, RJ)[0] == 0
    code, out = apply(kubeconfig, namespace, with_(RJ, "spec.timeoutSeconds", 900))
    assert code == 0, out
    assert apply(kubeconfig, namespace, WS)[0] == 0
    code, out = apply(kubeconfig, namespace, with_(WS, "spec.model.revision", "step-2"))
    assert code == 0, out


def test_defaults_applied(kubeconfig: Path, namespace: str) -> None:
    assert apply(kubeconfig, namespace, RJ)[0] == 0
    got = yaml.safe_load(
        kubectl(kubeconfig, "get", "rj", "rj", "-n", namespace, "-o", "yaml", check=True).stdout
    )
    spec = got["spec"]
    assert spec["version"] == "latest"
    assert spec["strategy"] == {
        "type": "direct",
        "maxFanOut": 4,
        "chunkBytes": 64 << 20,
        "parallelSources": 1,
    }
    assert spec["transform"]["type"] == "none"
    assert spec["pause"] == {"mode": "engine", "timeoutSeconds": 30}
    assert spec["backoffLimit"] == 3 and spec["timeoutSeconds"] == 600
