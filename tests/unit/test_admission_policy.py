"""The chart's admission policy template is generated from ferry_operator.admission."""

from __future__ import annotations

from ferry_operator import admission


def test_chart_template_is_fresh() -> None:
    assert admission.main(["--check"]) == 0, "run: python -m ferry_operator.admission"


def test_every_agent_key_is_a_lease_key_the_operator_does_not_write() -> None:
    from ferry_api import leases

    assert set(admission.AGENT_KEYS) == {leases.REPORT, leases.FOLLOW_REPORT}
    assert not {leases.ASSIGN, leases.FOLLOW} & set(admission.AGENT_KEYS)
