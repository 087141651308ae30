from ferry_agent.artifacts import build


def test_grpc_stubs_are_fresh():
    stale = build.stale()
    assert not stale, f"stale: {stale}; run python -m ferry_agent.artifacts.build"
