"""The Lease payloads as the operator writes and reads them at 1,000 targets: every
assignment of a job encoded with the shared parts once, every report decoded from its
annotation text once (ferry bench reconcile measures both)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from ferry_api import leases
from ferry_api.refitjob import RefitJobSpec
from ferry_operator.handlers.refitjob import fold

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def spec(**kw: object) -> RefitJobSpec:
    return RefitJobSpec.model_validate(
        {"sourceRef": {"name": "src"}, "targets": {"matchLabels": {"x": "y"}}, **kw}
    )


def test_encode_assignments_is_each_assignments_own_encoding() -> None:
    one, other = spec(), spec(strategy={"type": "chain"}, verify="full")
    want = {
        "a": leases.Assignment(
            job="j", attempt=1, source="s0,s1", version="5", start_time=T0, spec=one
        ),
        "b": leases.Assignment(
            job="j",
            attempt=3,
            source="a",
            version="5",
            start_time=T0,
            spec=one,
            endpoints={"a": "10.0.0.1:50051", "spec": '"startTime":"x"'},
        ),
        "c": leases.Assignment(job="j", attempt=2, spec=one),  # no version, no start time
        "d": leases.Assignment(
            job="k", attempt=1, source="s0", version="6", start_time=T0, spec=other
        ),
    }
    got = leases.encode_assignments(want)
    assert got == {pod: a.encode() for pod, a in want.items()}
    for pod, text in got.items():
        assert leases.Assignment.from_annotation(json.loads(text)) == want[pod]
        assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":")), (
            "canonical"
        )


def test_report_decode_reads_annotation_text_and_refuses_what_is_not_a_report() -> None:
    text = leases.Report(attempt=2, phase="Pulling", bytes=10, endpoint="h:1").encode()
    r = leases.Report.decode(text)
    assert r == leases.Report.parse(json.loads(text)) and r is leases.Report.decode(text), "cached"
    for bad in (
        None,
        "",
        "{not json",
        "[1]",
        '{"attempt": 0, "phase": "Done"}',
        '{"phase": "Done"}',
    ):
        assert leases.Report.decode(bad) is None, bad
    # A bad number is dropped, not the report (as Report.parse does).
    assert leases.Report.decode(
        '{"attempt": 1, "phase": "Done", "seconds": Infinity}'
    ) == leases.Report(attempt=1, phase="Done")


def test_a_huge_annotation_is_decoded_without_being_kept() -> None:
    before = leases._decode_report.cache_info().currsize
    huge = json.dumps({"attempt": 1, "phase": "Failed", "reason": "X", "message": "m" * 200_000})
    r = leases.Report.decode(huge)
    assert r is not None and r.message is not None and len(r.message) == 1024
    assert leases._decode_report.cache_info().currsize == before


def test_fold_takes_a_decoded_report_as_it_takes_the_wire_form() -> None:
    entry = {"pod": "t0", "source": "s0", "attempts": 1}
    wire = {"attempt": 1, "phase": "Pulling", "bytes": 5, "endpoint": "t0:1"}
    assert (
        fold(entry, leases.Report.parse(wire))
        == fold(entry, wire)
        == {**entry, "phase": "Pulling", "bytes": 5, "endpoint": "t0:1"}
    )


def test_a_follow_assignment_travels_typed_from_the_operator_to_the_agents_follower() -> None:
    import pytest
    from pydantic import ValidationError

    from ferry_agent.k8s.following import spec_of

    a = leases.FollowAssignment(
        job="j",
        source="src-0",
        source_endpoint="10.0.0.1:7470",
        upstream="t-0",
        upstream_endpoint="10.0.0.2:7470",
        timeout_seconds=60,
        chunk_bytes=1 << 20,
        pause="doubleBuffer",
    )
    f = spec_of(json.loads(a.encode()), "t-1")
    assert (f.source, f.upstream, f.timeout_s, f.chunk_bytes) == (
        "10.0.0.1:7470",
        "10.0.0.2:7470",
        60.0,
        1 << 20,
    )
    assert f.quiesce and not f.double_buffer, "a relay's downstream swaps nothing"
    # what an operator before the typed payload wrote (nulls included) still reads
    old = {
        "job": "j",
        "source": "src-0",
        "sourceEndpoint": "10.0.0.1:7470",
        "upstream": None,
        "upstreamEndpoint": None,
        "timeoutSeconds": 600,
        "chunkBytes": 67108864,
        "pause": "none",
    }
    f = spec_of(old, "t-1")
    assert f.upstream is None and not f.quiesce
    with pytest.raises(ValidationError, match="sourceEndpoint"):
        spec_of({"job": "j", "source": "src-0"}, "t-1")


def test_a_follow_report_drops_each_bad_value_not_the_report() -> None:
    r = leases.FollowReport.parse(
        {
            "version": "v3",
            "ok": "yes",
            "lastRefitTime": "yesterday",
            "seconds": float("inf"),
            "bytes": 2**70,
            "endpoint": "h:1",
        }
    )
    assert r == leases.FollowReport(version="v3", endpoint="h:1")
    assert leases.FollowReport.parse("not a report") is None
