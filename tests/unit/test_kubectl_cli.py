"""kubectl ferry: the command shell (watch loop, exit codes, errors, kubeconfig) without a cluster."""

from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from ferry_api.refitjob import RefitJob
from ferry_kubectl import cli
from ferry_kubectl.kube import Kube, NotFound, PluginError, _translated
from tests.api_objects import SELECTOR, T0, cond, served

START = T0


class FakeKube:
    """Serves successive snapshots of one RefitJob; remembers what was created."""

    def __init__(self, snapshots: list[dict[str, Any] | None]):
        self.snapshots = snapshots
        self.gets = 0
        self.created: list[tuple[str, str, dict]] = []
        self.namespace = "ml"

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        if plural == "weightsources":
            return {"metadata": {"name": name}}
        snap = self.snapshots[min(self.gets, len(self.snapshots) - 1)]
        self.gets += 1
        if snap is None:
            raise NotFound(f'refitjob "{name}" in namespace "{namespace}" not found')
        return snap

    def create(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self.created.append((plural, namespace, body))
        return {**body, "metadata": {"name": "policy-refit-x7k2p"}}


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def job(phase: str, done: list[int], **extra: Any) -> dict[str, Any]:
    conds = {
        "Succeeded": [cond("Complete", "True", "AllTargetsDone")],
        "Failed": [
            cond("Failed", "True", "DeadlineExceeded", "not finished within spec.timeoutSeconds=5")
        ],
    }.get(phase, [])
    return served(
        RefitJob,
        "refit",
        {"sourceRef": {"name": "policy"}, "targets": SELECTOR, "timeoutSeconds": 5},
        {
            "phase": phase,
            "version": "1",
            "startTime": "2026-11-22T12:00:00Z",
            "bytesTotal": 200,
            "targetsSummary": f"{sum(b == 100 for b in done)}/2",
            "targets": [
                {"pod": f"i-{i}", "phase": "Done" if b == 100 else "Pulling", "bytes": b}
                for i, b in enumerate(done)
            ],
            "conditions": conds,
            **extra,
        },
    )


def run_watch(
    snaps: list[dict[str, Any] | None], tty: bool = False, **kw: Any
) -> tuple[int, str, FakeKube]:
    kube, clock, out = FakeKube(snaps), Clock(), io.StringIO()
    code = cli.watch_job(
        kube,
        "ml",
        "refit",
        out,
        clock=clock,
        sleep=clock.sleep,
        tty=tty,
        now=lambda: START + timedelta(seconds=clock.t),
        **kw,
    )  # type: ignore[arg-type]
    return code, out.getvalue(), kube


def test_watch_exits_0_on_complete_with_progress_lines() -> None:
    code, text, kube = run_watch(
        [
            job("Running", [0, 0]),
            job("Running", [30, 10]),
            job("Running", [70, 40]),
            job("Succeeded", [100, 100]),
        ]
    )
    assert code == 0 and kube.gets == 4
    assert [p for p in (" 30%", " 70%", "100%") if p in text] == [" 30%", " 70%", "100%"]
    rows = [line.split() for line in text.splitlines()]
    # Rates and ETAs from successive observations, one second apart.
    assert "i-0 30% 30 B/100 B 30 B/s ETA 2s Pulling".split() in rows, text
    assert "i-1 40% 40 B/100 B 20 B/s ETA 3s Pulling".split() in rows, text
    assert text.rstrip().splitlines()[-1].startswith("refitjob/refit Complete: 2/2 targets hold 1")
    assert "\x1b[" not in text


def test_watch_on_a_tty_redraws_in_place() -> None:
    code, text, _ = run_watch(
        [job("Running", [0, 0]), job("Running", [50, 10]), job("Succeeded", [100, 100])], tty=True
    )
    assert code == 0
    assert text.count("\x1b[3F") == 2, "each later frame moves up over the 3 lines drawn before"
    assert "[############............]" in text


def test_watch_exits_1_on_failure_with_reason(capsys: pytest.CaptureFixture[str]) -> None:
    code, text, _ = run_watch([job("Running", [10, 0]), job("Failed", [10, 0])])
    assert code == 1
    assert "Failed (DeadlineExceeded): not finished within spec.timeoutSeconds=5" in text


def test_watch_times_out_with_exit_2() -> None:
    with pytest.raises(PluginError, match='timed out after 3s waiting for refitjob "refit"') as e:
        run_watch([job("Running", [10, 0])], timeout=3)
    assert e.value.code == 2


def test_watch_default_deadline_is_the_jobs_own_plus_grace() -> None:
    clock = Clock()
    with pytest.raises(PluginError, match="timed out"):
        cli.watch_job(
            FakeKube([job("Running", [0, 0])]),
            "ml",
            "refit",
            io.StringIO(),  # type: ignore[arg-type]
            clock=clock,
            sleep=clock.sleep,
            tty=False,
        )
    assert clock.t == pytest.approx(5 + cli.DEADLINE_GRACE_S)


def test_watch_a_job_deleted_midway() -> None:
    with pytest.raises(PluginError, match="was deleted before it finished"):
        run_watch([job("Running", [0, 0]), None])
    with pytest.raises(NotFound):
        run_watch([None])


def test_refit_creates_a_job_from_flags_then_watches() -> None:
    kube, out = FakeKube([job("Succeeded", [100, 100])]), io.StringIO()
    args = cli.build_parser().parse_args(
        [
            "refit",
            "policy",
            "--targets",
            "app=inference,tier in (a)",
            "--strategy",
            "chain",
            "--version",
            "42",
            "--chunk-bytes",
            "1Mi",
            "--interval",
            "0.2",
        ]
    )
    args.namespace = None
    assert cli.cmd_refit(args, kube, out) == 0  # type: ignore[arg-type]
    ((plural, ns, body),) = kube.created
    assert (plural, ns) == ("refitjobs", "ml")
    assert body["metadata"] == {"generateName": "policy-refit-"}
    assert body["spec"] == {
        "sourceRef": {"name": "policy"},
        "version": "42",
        "targets": {
            "matchLabels": {"app": "inference"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a"]}],
        },
        "strategy": {"type": "chain", "chunkBytes": 1 << 20},
    }
    assert out.getvalue().startswith("refitjob.ferry.dev/policy-refit-x7k2p created\n")


def test_refit_no_watch_and_explicit_name() -> None:
    kube, out = FakeKube([]), io.StringIO()
    args = cli.build_parser().parse_args(
        ["refit", "policy", "--targets", "app=x", "--name", "step-9", "--no-watch", "-n", "prod"]
    )
    assert cli.cmd_refit(args, kube, out) == 0  # type: ignore[arg-type]
    assert kube.created[0][1] == "prod" and kube.created[0][2]["metadata"] == {"name": "step-9"}
    assert kube.gets == 0


def test_refit_refuses_a_bad_flag_before_creating_anything() -> None:
    kube = FakeKube([])
    args = cli.build_parser().parse_args(
        ["refit", "policy", "--targets", "app=x", "--max-fan-out", "100", "--no-watch"]
    )
    with pytest.raises(PluginError, match=r"spec\.strategy\.maxFanOut: .*less than or equal to 64"):
        cli.cmd_refit(args, kube, io.StringIO())  # type: ignore[arg-type]
    assert kube.created == []


def api_error(status: int, body: dict[str, Any] | None) -> client.ApiException:
    e = client.ApiException(status=status, reason="x")
    e.body = json.dumps(body) if body is not None else "404 page not found"
    return e


@pytest.mark.parametrize(
    ("status", "body", "want"),
    [
        (
            404,
            {"reason": "NotFound", "details": {"name": "nope"}},
            'refitjob "nope" in namespace "ml" not found',
        ),
        (404, None, "are the Ferry CRDs installed?"),
        (
            403,
            {"message": 'refitjobs.ferry.dev "nope" is forbidden: User "bob" cannot get resource'},
            'permission denied: refitjobs.ferry.dev "nope" is forbidden: User "bob"',
        ),
        (401, {}, "unauthorized"),
        (
            422,
            {"message": "spec.targets: Invalid value: selector must name at least one label"},
            "spec.targets: Invalid value",
        ),
    ],
)
def test_api_errors_become_one_line_messages(status: int, body: dict | None, want: str) -> None:
    with (
        pytest.raises(PluginError) as e,
        _translated('refitjob "nope" in namespace "ml"', "refitjobs"),
    ):
        raise api_error(status, body)
    assert want in str(e.value) and "\n" not in str(e.value) and e.value.code == 2


def kubeconfig(tmp_path: Path) -> Path:
    cluster = {"server": "https://127.0.0.1:1", "insecure-skip-tls-verify": True}
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "a",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [
            {"name": "a", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}},
            {"name": "b", "context": {"cluster": "c", "user": "u"}},
        ],
    }
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_kubeconfig_context_and_namespace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = kubeconfig(tmp_path)
    assert Kube.connect(str(path)).namespace == "team-a"
    assert Kube.connect(str(path), context="b").namespace == "default"
    monkeypatch.setenv("KUBECONFIG", str(path))
    assert Kube.connect().server == "https://127.0.0.1:1"


def test_unreachable_server_and_bad_kubeconfig_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["status", "--kubeconfig", str(kubeconfig(tmp_path))])
    err = capsys.readouterr().err
    assert (
        code == 2 and err.startswith("error: cannot reach the API server") and err.count("\n") == 1
    )
    code = cli.main(["status", "--kubeconfig", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert (
        code == 2 and err.startswith("error: cannot load a kubeconfig") and "Traceback" not in err
    )


def test_in_cluster_when_no_kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(PluginError, match="cannot use the pod's service account"):
        Kube.connect()  # no token mounted here: the in-cluster path was taken and says so
