"""Session-wide fixtures: one real etcd + kube-apiserver per test session, CRDs
installed, a namespace per test, and the operator as a real process when asked.

Nothing here is mocked. If the control-plane binaries cannot be provided, the
fixtures fail (they never skip).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from ferry_dev.controlplane import ControlPlane, free_port
from ferry_dev.operatorproc import OperatorProcess, start_operator

# Fuzz tests (hypothesis). By default each runs a fixed, derandomized set of examples
# so `make test` is reproducible and bounded; FERRY_FUZZ_EXAMPLES=N runs N random
# examples per test instead (failures are kept in ~/.cache/ferry/hypothesis and
# replayed first next time).
FUZZ_EXAMPLES = int(os.environ.get("FERRY_FUZZ_EXAMPLES", "0") or 0)
_FUZZ_COMMON = dict(
    deadline=None,  # apiserver round trips vary on a shared machine
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
    print_blob=True,
)
settings.register_profile("ferry-ci", derandomize=True, database=None, **_FUZZ_COMMON)
settings.register_profile(
    "ferry-long",
    max_examples=max(FUZZ_EXAMPLES, 1),
    derandomize=False,
    database=DirectoryBasedExampleDatabase(
        str(Path(os.environ.get("FERRY_CACHE", Path.home() / ".cache" / "ferry")) / "hypothesis")
    ),
    **_FUZZ_COMMON,
)
settings.load_profile("ferry-long" if FUZZ_EXAMPLES else "ferry-ci")


def fuzz_examples(default: int) -> settings:
    """Settings for one fuzz test: `default` examples in CI, FERRY_FUZZ_EXAMPLES when set."""
    return settings(max_examples=FUZZ_EXAMPLES or default)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    cp = ControlPlane(workdir=tmp_path_factory.mktemp("controlplane"))
    cp.start()
    try:
        cp.install_crds()
        cp.install_admission_policy()
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def kubeconfig(control_plane: ControlPlane) -> Path:
    return control_plane.kubeconfig


@pytest.fixture(scope="session")
def api_client(kubeconfig: Path) -> k8s_client.ApiClient:
    return k8s_config.new_client_from_config(config_file=str(kubeconfig))


@pytest.fixture()
def namespace(api_client: k8s_client.ApiClient, request: pytest.FixtureRequest) -> str:
    """A fresh namespace per test (left behind: the control plane is torn down at session end)."""
    base = request.node.name.lower().replace("_", "-")
    name = "".join(c for c in base if c.isalnum() or c == "-")[:40].strip("-")
    name = f"{name}-{uuid.uuid4().hex[:6]}"
    core = k8s_client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": name}})
    # No kube-controller-manager runs here, so create the default ServiceAccount pods need.
    core.create_namespaced_service_account(name, {"metadata": {"name": "default"}})
    return name


def kubectl(
    kubeconfig: Path, *args: str, input: str | None = None, check: bool = False
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    return subprocess.run(
        ["kubectl", *args],
        env=env,
        input=input,
        text=True,
        capture_output=True,
        check=check,
        timeout=60,
    )


@pytest.fixture(scope="session")
def operator(
    kubeconfig: Path, api_client: k8s_client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """One operator for the session: fast resync, and the injection webhook served over TLS."""
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = start_operator(
        kubeconfig,
        log,
        "--resync-seconds",
        "2",
        "--webhook-port",
        str(free_port()),
        "--webhook-host",
        "127.0.0.1",
    )
    try:
        adm = k8s_client.AdmissionregistrationV1Api(api_client)
        deadline = time.monotonic() + 30
        # kopf creates the configuration first and fills in the webhook once it serves.
        while not [
            w
            for c in adm.list_mutating_webhook_configuration().items
            if c.metadata.name == "ferry.dev"
            for w in c.webhooks or []
            if w.client_config and w.client_config.ca_bundle
        ]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"webhook configuration not created:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield op
    finally:
        op.stop()
