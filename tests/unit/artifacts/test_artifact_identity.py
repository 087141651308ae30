from __future__ import annotations

import itertools

import pytest

from ferry_agent.artifacts import (
    Identity,
    IdentityError,
    MissingIdentityField,
    detect_environment,
    detect_identity,
)
from ferry_agent.artifacts.identity import FIELDS, REQUIRED, normalize_gpu_arch

FULL = {
    "model": "meta-llama/Llama-3.1-8B-Instruct",
    "framework": "vllm",
    "framework_version": "0.11.0",
    "torch": "2.9.0+cu128",
    "cuda": "12.8",
    "triton": "3.5.0",
    "gpu_arch": "sm_90",
    "compile_config_digest": "sha256:" + "ab" * 32,
}


def test_same_identity_same_hash_regardless_of_field_order():
    keys = list(FULL)
    hashes = {
        Identity.build("torch-compile", {k: FULL[k] for k in order}).hash
        for order in itertools.islice(itertools.permutations(keys), 0, 40000, 997)
    }
    assert len(hashes) == 1


def test_normalized_spellings_hash_the_same():
    a = Identity.build("torch-compile", FULL)
    b = Identity.build(
        "torch-compile",
        {
            **FULL,
            "framework": " VLLM ",
            "gpu_arch": "9.0",
            "framework_version": "v0.11.0",
            "compile_config_digest": "AB" * 32,
        },
    )
    assert a.hash == b.hash
    assert b.get("compile_config_digest") == "sha256:" + "ab" * 32


@pytest.mark.parametrize("field", FIELDS)
def test_any_field_change_changes_the_hash(field: str):
    base = Identity.build("torch-compile", FULL)
    changed = dict(FULL)
    changed[field] = {"gpu_arch": "sm_100", "compile_config_digest": "cd" * 32}.get(
        field, FULL[field] + "1"
    )
    assert Identity.build("torch-compile", changed).hash != base.hash


def test_kind_is_part_of_the_hash():
    fields = {"triton": "3.5.0", "cuda": "12.8", "gpu_arch": "sm_90"}
    assert Identity.build("triton", fields).hash != Identity.build("deepgemm", fields).hash


@pytest.mark.parametrize("kind", sorted(REQUIRED))
def test_missing_required_field_names_it(kind: str):
    for field in REQUIRED[kind]:
        values = {k: v for k, v in FULL.items() if k != field}
        with pytest.raises(MissingIdentityField) as err:
            Identity.build(kind, values)
        assert err.value.field == field and err.value.kind == kind
        assert repr(field) in str(err.value)
        with pytest.raises(MissingIdentityField):
            Identity.build(kind, {**values, field: "  "})  # blank counts as missing


def test_triton_and_deepgemm_are_self_keyed_torch_compile_needs_model():
    Identity.build("triton", triton="3.5.0", cuda="12.8", gpu_arch="sm_90")
    Identity.build("deepgemm", cuda="12.8", gpu_arch="sm_90a")
    with pytest.raises(MissingIdentityField, match="model"):
        Identity.build("torch-compile", {k: v for k, v in FULL.items() if k != "model"})


def test_bad_input_is_a_typed_error():
    with pytest.raises(IdentityError, match="unknown cache kind"):
        Identity.build("cudnn", FULL)
    with pytest.raises(IdentityError, match="unknown identity field 'gpu'"):
        Identity.build("triton", {**FULL, "gpu": "h100"})
    with pytest.raises(IdentityError, match="gpu_arch"):
        Identity.build("triton", {**FULL, "gpu_arch": "hopper"})
    with pytest.raises(IdentityError, match="sha256"):
        Identity.build("torch-compile", {**FULL, "compile_config_digest": "xyz"})
    with pytest.raises(IdentityError, match="string"):
        Identity.build("triton", {**FULL, "cuda": 12.8})


def test_round_trips_through_dict():
    ident = Identity.build("torch-compile", FULL)
    assert Identity.from_dict(ident.to_dict()) == ident
    assert ident.canonical().startswith(b'{"fields":{"compile_config_digest"')


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("9.0", "sm_90"),
        ("90", "sm_90"),
        ("sm90", "sm_90"),
        ("SM_90a", "sm_90a"),
        ("12.0", "sm_120"),
        ("compute_80", "sm_80"),
    ],
)
def test_gpu_arch_normalization(raw: str, want: str):
    assert normalize_gpu_arch(raw) == want


def test_detection_degrades_gracefully_without_a_gpu(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi
    monkeypatch.delenv("CUDA_VERSION", raising=False)
    found = detect_environment(use_torch=False)
    assert set(found) <= set(FIELDS)
    assert "gpu_arch" not in found
    with pytest.raises(MissingIdentityField) as err:
        detect_identity("deepgemm", use_torch=False, cuda="12.8")
    assert err.value.field == "gpu_arch"
    # explicit values fill what detection could not find
    ident = detect_identity("deepgemm", use_torch=False, cuda="12.8", gpu_arch="9.0")
    assert ident.get("gpu_arch") == "sm_90"


def test_detection_reads_cuda_version_from_the_container_env(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CUDA_VERSION", "12.8.1")
    assert detect_environment(use_torch=False)["cuda"] == "12.8.1"
