"""Where the agent keeps packed archives (node17: the injected agent has a read-only root)."""

from __future__ import annotations

import pytest

from ferry_agent.k8s.artifacts import ArtifactStoreError, store_dir


def test_store_dir_is_ferry_artifact_store_when_set(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert store_dir({"FERRY_ARTIFACT_STORE": str(tmp_path)}) == str(tmp_path)


def test_no_writable_tempdir_names_the_variable_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only root with no /tmp: a clear error naming FERRY_ARTIFACT_STORE, not tempfile's."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    for var in ("TMPDIR", "TEMP", "TMP"):
        monkeypatch.setenv(var, "/nonexistent-ferry-test")
    monkeypatch.setattr(tempfile, "_candidate_tempdir_list", lambda: ["/nonexistent-ferry-test"])
    with pytest.raises(ArtifactStoreError, match="FERRY_ARTIFACT_STORE"):
        store_dir({})
    monkeypatch.setattr(tempfile, "tempdir", None)
