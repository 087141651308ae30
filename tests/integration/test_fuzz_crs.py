"""Fuzzing the API: the apiserver (CRD schema + CEL, webhook on) accepts exactly the specs
the pydantic models accept, and a refusal names the field.

Specs are mostly near-valid: a valid spec with one field changed (wrong type, out of
bounds, bad enum, a quantity or duration string where an integer belongs, removed,
added where it is not allowed, or set so a cross-field rule breaks), plus valid ones.
The oracle is `Model.from_wire` (the model read with the apiserver's JSON rules) and,
for updates, the fields the model marks immutable (compared after defaulting).
Creates and updates are dry runs (`dryRun=All`): full validation and admission,
nothing stored, so the operator has nothing to reconcile.

FERRY_FUZZ_EXAMPLES=N runs N random examples per test instead of the fixed CI set.
"""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from kubernetes import client as k8s_client
from pydantic import BaseModel, ValidationError

from ferry_api import GROUP, VERSION, generate
from ferry_api.artifactcache import ArtifactCacheSpec
from ferry_api.refitjob import RefitJobSpec
from ferry_api.weightsource import WeightSourceSpec
from tests.conftest import fuzz_examples

pytestmark = pytest.mark.integration

KINDS: dict[str, tuple[str, type[BaseModel]]] = {
    "WeightSource": ("weightsources", WeightSourceSpec),
    "RefitJob": ("refitjobs", RefitJobSpec),
    "ArtifactCache": ("artifactcaches", ArtifactCacheSpec),
}
SCHEMAS = {
    m.KIND: generate.crd(m)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
        "spec"
    ]
    for m in generate.KINDS
}

# ---------------------------------------------------------------- valid specs

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
label_name = st.from_regex(r"\A[a-z0-9]([-a-z0-9_.]{0,10}[a-z0-9])?\Z")
label_key = st.one_of(
    label_name, st.builds(lambda p, n: f"{p}/{n}", st.just("ferry.dev"), label_name)
)
dns = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?(\.[a-z0-9]{1,5})?\Z")


def optional(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


requirement = st.one_of(
    st.fixed_dictionaries(
        {
            "key": label_key,
            "operator": st.sampled_from(["In", "NotIn"]),
            "values": st.lists(label_name, min_size=1, max_size=3),
        }
    ),
    st.fixed_dictionaries(
        {"key": label_key, "operator": st.sampled_from(["Exists", "DoesNotExist"])}
    ),
)
selector = st.one_of(
    st.fixed_dictionaries(
        {"matchLabels": st.dictionaries(label_key, label_name, min_size=1, max_size=3)}
    ),
    st.fixed_dictionaries(
        {"matchExpressions": st.lists(requirement, min_size=1, max_size=3)},
        optional={"matchLabels": st.dictionaries(label_key, label_name, max_size=2)},
    ),
)


@st.composite
def heartbeat(draw: st.DrawFn) -> dict[str, Any]:
    lease = draw(st.integers(3, 300))
    hb = {"leaseDurationSeconds": lease}
    if lease <= 5 or draw(st.booleans()):
        hb["renewIntervalSeconds"] = draw(st.integers(1, min(100, lease - 1)))
    return hb


ws_spec = st.fixed_dictionaries(
    {
        "model": optional(revision=st.text(max_size=128)).map(lambda m: {"name": "llama", **m})
        | st.fixed_dictionaries({"name": st.text(min_size=1, max_size=60)}),
        "selector": selector,
    },
    optional={
        "layout": optional(
            dtype=st.sampled_from(["bfloat16", "float16", "float32", "float8_e4m3fn", "int8"]),
            tensorParallelSize=st.integers(1, 64),
            rankLabel=label_key,
            ranksPerPod=st.integers(1, 8),
            quantization=st.sampled_from(["none", "fp8-block"]),
        ),
        "memory": st.sampled_from(["cuda", "host"]),
        "rails": st.one_of(
            optional(mode=st.sampled_from(["auto", "stripe", "off"])),
            st.fixed_dictionaries(
                {
                    "mode": st.just("explicit"),
                    "devices": st.dictionaries(
                        st.sampled_from("01234567"),
                        st.lists(st.sampled_from(["mlx5_0:1", "mlx5_1:1"]), max_size=2),
                        min_size=1,
                        max_size=3,
                    ),
                }
            ),
        ),
        "heartbeat": heartbeat(),
    },
)


@st.composite
def strategy(draw: st.DrawFn) -> dict[str, Any]:
    out = draw(
        optional(
            type=st.sampled_from(["direct", "tree", "chain"]),
            maxFanOut=st.integers(1, 64),
            chunkBytes=st.integers(1 << 20, 4 << 30),
        )
    )
    if out.get("type", "direct") == "direct" and draw(st.booleans()):
        out["parallelSources"] = draw(st.integers(1, 16))
    return out


transform = st.one_of(
    optional(type=st.sampled_from(["none", "fp8-block"]), blockSize=st.integers(16, 1024)),
    st.fixed_dictionaries(
        {"type": st.just("reshard"), "targetTensorParallelSize": st.integers(1, 64)}
    ),
)
rj_spec = st.fixed_dictionaries(
    {"sourceRef": st.fixed_dictionaries({"name": dns}), "targets": selector},
    optional={
        "version": st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:+-]{0,12}\Z"),
        "strategy": strategy(),
        "transform": transform,
        "pause": optional(
            mode=st.sampled_from(["engine", "doubleBuffer", "none"]),
            timeoutSeconds=st.integers(1, 600),
        ),
        "timeoutSeconds": st.integers(1, 86400),
        "backoffLimit": st.integers(0, 20),
        "ttlSecondsAfterFinished": st.integers(0, 30 * 86400),
        "targetRanksPerPod": st.integers(1, 8),
    },
)

IDENTITY = {
    "model": "llama",
    "framework": "vllm",
    "frameworkVersion": "0.11",
    "torch": "2.9.0",
    "cuda": "13.0",
    "triton": "3.5.0",
    "gpuArch": "sm_90",
    "compileConfigDigest": "sha256:" + "ab" * 32,
}


@st.composite
def ac_spec(draw: st.DrawFn) -> dict[str, Any]:
    kinds = draw(
        st.lists(
            st.sampled_from(["torch-compile", "triton", "deepgemm"]),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    need = {
        "torch-compile": list(IDENTITY),
        "triton": ["triton", "cuda", "gpuArch"],
        "deepgemm": ["cuda", "gpuArch"],
    }
    fields = {f for k in kinds for f in need[k]} | set(
        draw(st.lists(st.sampled_from(list(IDENTITY))))
    )
    spec = {
        "identity": {f: IDENTITY[f] for f in sorted(fields)},
        "kinds": kinds,
        "sources": draw(selector),
        "targets": draw(selector),
    }
    spec.update(
        draw(
            optional(
                trust=st.one_of(
                    st.fixed_dictionaries(
                        {"secretRef": dns},
                        optional={
                            "key": dns,
                            "required": st.booleans(),
                            "allowUnsigned": st.booleans(),
                        },
                    ),
                    st.just({"allowUnsigned": True}),
                ),
                maxBytes=st.integers(1 << 20, 1 << 40),
                installTimeoutSeconds=st.integers(5, 3600),
            )
        )
    )
    return spec


VALID = {"WeightSource": ws_spec, "RefitJob": rj_spec, "ArtifactCache": ac_spec()}

# ------------------------------------------------------------------ mutations

DELETE = object()


def schema_paths(
    node: dict[str, Any], path: tuple[Any, ...] = ()
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Every field of the spec schema: object keys, list item 0, and a map value under key "0"."""
    out = [(path, node)] if path else []
    for name, child in (node.get("properties") or {}).items():
        out += schema_paths(child, (*path, name))
    if "items" in node:
        out += schema_paths(node["items"], (*path, 0))
    if isinstance(node.get("additionalProperties"), dict):
        out += schema_paths(node["additionalProperties"], (*path, "0"))
    return out


def bad_values(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values at and beyond the edges of a schema node, valid ones among them, and wrong types."""
    picks: list[Any] = [
        None,
        DELETE,
        True,
        0,
        -1,
        1.5,
        2.0,
        "",
        "x",
        [],
        {},
        ["x"],
        {"x": "y"},
        "64Mi",
        "1Gi",
        "30s",
        "1e3",
        "0x10",
        2**63,
        -(2**63) - 1,
    ]
    kind = node.get("type")
    if kind == "integer":
        lo, hi = node.get("minimum", -(2**63)), node.get("maximum", 2**63 - 1)
        picks += [lo - 1, lo, hi, hi + 1, float(hi), str(lo), (lo + hi) // 2]
    if kind == "string":
        n = node.get("maxLength")
        if n:
            picks += ["a" * n, "a" * (n + 1), "é" * n]
        if "pattern" in node:
            picks += ["Not_Valid!", "sm_90\n", "a b", "sha256:" + "0" * 64, "-a", "a."]
        for value in node.get("enum", []):
            picks += [value, value.upper(), f" {value}"]
    if kind == "array":
        n = node.get("maxItems")
        item = (node.get("items") or {}).get("enum") or ["a"]
        if n:
            picks += [item[:1] * (n + 1), list(item) * 2, item[:n]]
        picks += [item[:1] * 2, [None], [1]]
    if kind == "object":
        picks += [{"unknownField": 1}]
    return st.one_of(
        st.sampled_from(picks),
        text,
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
    )


def set_path(spec: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(spec)
    node: Any = out
    for key, nxt in zip(path, path[1:], strict=False):
        if isinstance(node, list):
            while len(node) <= key:
                node.append({} if isinstance(nxt, str) else [])
            node = node[key]
        else:
            child = node.get(key)
            if not isinstance(child, list if isinstance(nxt, int) else dict):
                child = [] if isinstance(nxt, int) else {}
                node[key] = child
            node = child
    leaf = path[-1]
    if isinstance(node, list):
        if value is DELETE:
            if leaf < len(node):
                del node[leaf]
        else:
            while len(node) <= leaf:
                node.append(None)
            node[leaf] = value
    elif value is DELETE:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return out


@st.composite
def mutated(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    spec = draw(VALID[kind])
    if draw(st.integers(0, 4)) == 0:
        return spec  # about a fifth stay valid
    paths = schema_paths(SCHEMAS[kind])
    if draw(st.integers(0, 9)) == 0:
        objects = [(), *(p for p, n in paths if n.get("properties"))]
        path = draw(st.sampled_from(objects))
        return set_path(spec, (*path, "unknownField"), draw(st.sampled_from([1, "x", {}])))
    path, node = draw(st.sampled_from(paths))
    return set_path(spec, path, draw(bad_values(node)))


# ------------------------------------------------------------------- oracle


def oracle(kind: str, spec: Any, old: Any = None) -> list[str]:
    """The fields the model refuses (empty: accepted), as the apiserver spells them."""
    model = KINDS[kind][1]
    try:
        new = model.from_wire(spec)
    except ValidationError as exc:
        return [wire_path(e["loc"]) for e in exc.errors()]
    if old is None:
        return []
    before = model.from_wire(old)
    return [wire_path(p) for p in immutable_paths(model) if get(before, p) != get(new, p)]


def wire_path(loc: tuple[Any, ...]) -> str:
    out = "spec"
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-after", "literal[")):
            out += f".{part}"
    return out


def immutable_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Fields whose schema carries the `self == oldSelf` transition rule (ferry_api.meta.k8s)."""
    out = []
    for name, info in model.model_fields.items():
        alias = info.alias or name
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        rules = extra.get("x-kubernetes-validations") or []
        if any(isinstance(r, dict) and r.get("rule") == "self == oldSelf" for r in rules):
            out.append((*prefix, alias))
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out += immutable_paths(sub, (*prefix, alias))
    return out


def get(obj: Any, path: tuple[str, ...]) -> Any:
    for alias in path:
        obj = next(
            getattr(obj, n) for n, f in type(obj).model_fields.items() if (f.alias or n) == alias
        )
    return obj


# ------------------------------------------------------------------ apiserver


class Api:
    def __init__(self, api_client: k8s_client.ApiClient, namespace: str):
        self.co = k8s_client.CustomObjectsApi(api_client)
        self.ns = namespace

    def create(
        self, kind: str, spec: Any, *, name: str | None = None, dry_run: bool = True
    ) -> str | None:
        """None when accepted, else the apiserver's message."""
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": kind,
            "metadata": {"name": name or f"f-{uuid.uuid4().hex[:8]}"},
            "spec": spec,
        }
        return self._call(
            lambda: self.co.create_namespaced_custom_object(
                GROUP,
                VERSION,
                self.ns,
                KINDS[kind][0],
                body,
                dry_run="All" if dry_run else None,
                field_validation="Strict",
            )
        )

    def update(self, kind: str, name: str, spec: Any) -> str | None:
        plural = KINDS[kind][0]
        for _ in range(5):
            obj = self.co.get_namespaced_custom_object(GROUP, VERSION, self.ns, plural, name)
            obj["spec"] = spec
            msg = self._call(
                lambda obj=obj: self.co.replace_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    self.ns,
                    plural,
                    name,
                    obj,
                    dry_run="All",
                    field_validation="Strict",
                )
            )
            if msg is None or not msg.startswith("409"):
                return msg
        raise AssertionError(f"update of {kind}/{name} kept conflicting")

    @staticmethod
    def _call(fn: Any) -> str | None:
        try:
            fn()
        except k8s_client.ApiException as exc:
            if exc.status not in (400, 409, 422):
                raise
            try:
                detail = json.loads(exc.body).get("message", exc.body)
            except ValueError:
                detail = exc.body
            return f"{exc.status} {detail}"
        return None


@pytest.fixture()
def api(api_client: k8s_client.ApiClient, namespace: str, operator: Any) -> Api:
    """The session's operator runs, so its admission webhook is registered and served."""
    return Api(api_client, namespace)


def check(kind: str, spec: Any, refused_by_model: list[str], refused_by_server: str | None) -> None:
    shown = json.dumps(spec, default=repr)[:2000]
    if not refused_by_model:
        assert refused_by_server is None, (
            f"{kind} valid for the model, refused: {refused_by_server}\n{shown}"
        )
        return
    assert refused_by_server is not None, (
        f"{kind} accepted, model refuses {refused_by_model}\n{shown}"
    )
    assert any(path in refused_by_server for path in refused_by_model), (
        f"{kind}: message names none of {refused_by_model}: {refused_by_server}\n{shown}"
    )


# -------------------------------------------------------------------- tests

WS_BASE = {"model": {"name": "llama"}, "selector": {"matchLabels": {"app": "trainer"}}}
RJ_BASE = {"sourceRef": {"name": "ws"}, "targets": {"matchLabels": {"app": "inference"}}}
AC_BASE = {
    "kinds": ["triton"],
    "identity": {"triton": "3.5.0", "cuda": "13.0", "gpuArch": "sm_90"},
    "sources": {"matchLabels": {"warm": "true"}},
    "targets": {"matchLabels": {"app": "inference"}},
}
BASES = {"WeightSource": WS_BASE, "RefitJob": RJ_BASE, "ArtifactCache": AC_BASE}


@fuzz_examples(60)
@given(spec=mutated("WeightSource"))
@example(spec={**WS_BASE, "layout": {"tensorParallelSize": 2.0}})  # schema took it, CEL would not
@example(spec={**WS_BASE, "heartbeat": {"renewIntervalSeconds": 1.0}})  # CEL: "got float64"
@example(
    spec={**WS_BASE, "layout": {"tensorParallelSize": True}}
)  # pydantic's lax mode took it as 1
@example(spec={**WS_BASE, "layout": None})  # null means absent: defaulted
@example(spec={**WS_BASE, "rails": {"mode": "explicit"}})  # the model had no cross-field rules
@example(
    spec={**WS_BASE, "heartbeat": {"leaseDurationSeconds": 5}}
)  # renew 5 (default) is not below 5
@example(spec={**WS_BASE, "selector": {"matchLabels": {"app": None}}})  # pruned: an empty selector
@example(spec={**WS_BASE, "selector": {"matchExpressions": [{"key": "a", "operator": "In"}]}})
@example(
    spec={
        **WS_BASE,
        "selector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["b"]}]},
    }
)
def test_weightsource_create_accepted_exactly_when_the_model_accepts(api: Api, spec: dict) -> None:
    check("WeightSource", spec, oracle("WeightSource", spec), api.create("WeightSource", spec))


@fuzz_examples(60)
@given(spec=mutated("RefitJob"))
@example(spec={**RJ_BASE, "strategy": {"type": "tree", "parallelSources": 2}})
@example(spec={**RJ_BASE, "transform": {"type": "reshard"}})
@example(spec={**RJ_BASE, "transform": {"targetTensorParallelSize": 2}})
@example(spec={**RJ_BASE, "timeoutSeconds": "600"})
@example(spec={**RJ_BASE, "strategy": {"chunkBytes": "64Mi"}})
def test_refitjob_create_accepted_exactly_when_the_model_accepts(api: Api, spec: dict) -> None:
    check("RefitJob", spec, oracle("RefitJob", spec), api.create("RefitJob", spec))


@fuzz_examples(60)
@given(spec=mutated("ArtifactCache"))
@example(spec={**AC_BASE, "kinds": ["triton", "triton"]})  # a set: the model took duplicates
@example(spec={**AC_BASE, "kinds": ["torch-compile"]})
@example(spec={**AC_BASE, "trust": {"secretRef": "k", "required": "yes"}})  # lax bool coercion
@example(spec={**AC_BASE, "maxBytes": 1e9})  # a whole-number float: refused on both sides
def test_artifactcache_create_accepted_exactly_when_the_model_accepts(api: Api, spec: dict) -> None:
    check("ArtifactCache", spec, oracle("ArtifactCache", spec), api.create("ArtifactCache", spec))


@pytest.fixture()
def stored(api: Api) -> dict[str, str]:
    """One stored object of each kind (the base specs) to update."""
    names = {}
    for kind, spec in BASES.items():
        names[kind] = f"base-{kind.lower()}"
        assert api.create(kind, spec, name=names[kind], dry_run=False) is None
    return names


@st.composite
def update(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    kind = draw(st.sampled_from(sorted(BASES)))
    base = BASES[kind]
    path, node = draw(st.sampled_from(schema_paths(SCHEMAS[kind])))
    value = draw(st.one_of(bad_values(node), st.sampled_from([node.get("default", DELETE)])))
    return kind, set_path(base, path, value)


@fuzz_examples(60)
@given(change=update())
@example(change=("RefitJob", {**RJ_BASE, "strategy": {"type": "direct"}}))  # equal once defaulted
@example(change=("RefitJob", {**RJ_BASE, "strategy": {"maxFanOut": 8}}))
@example(change=("RefitJob", {**RJ_BASE, "version": "latest"}))
@example(change=("RefitJob", {**RJ_BASE, "timeoutSeconds": 900}))
@example(change=("RefitJob", {**RJ_BASE, "strategy": {"chunkBytes": float(64 << 20)}}))
@example(change=("WeightSource", {**WS_BASE, "model": {"name": "llama", "revision": "step-2"}}))
@example(change=("ArtifactCache", {**AC_BASE, "maxBytes": 1 << 30}))
def test_update_accepted_exactly_when_valid_and_immutable_fields_unchanged(
    api: Api, stored: dict[str, str], change: tuple[str, dict[str, Any]]
) -> None:
    kind, spec = change
    check(kind, spec, oracle(kind, spec, old=BASES[kind]), api.update(kind, stored[kind], spec))


def test_every_immutable_field_is_found() -> None:
    """The update oracle reads the same markers the CRD's transition rules come from."""
    assert immutable_paths(RefitJobSpec) == [
        ("sourceRef",),
        ("version",),
        ("targets",),
        ("strategy",),
        ("transform",),
    ]
    assert immutable_paths(WeightSourceSpec) == [("model", "name")]
    assert immutable_paths(ArtifactCacheSpec) == [("identity",)]


def test_schema_paths_cover_the_spec() -> None:
    paths = {p for p, _ in schema_paths(SCHEMAS["RefitJob"])}
    assert ("strategy", "parallelSources") in paths and (
        "targets",
        "matchExpressions",
        0,
        "values",
        0,
    ) in paths
    assert Path(generate.path_for(generate.KINDS[1])).exists()
