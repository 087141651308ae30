"""The shared webhook serving certificate: when a replica keeps, renews or replaces it (pure)."""

from __future__ import annotations

import datetime as dt

from cryptography import x509

from ferry_operator import pki, servingcert
from ferry_operator.servingcert import Serving, plan, problem

HOSTS = ["ferry-webhook.ferry-system.svc", "127.0.0.1", "localhost"]
NOW = dt.datetime.now(dt.UTC)


def fresh() -> Serving:
    new = plan(None, HOSTS, NOW)
    assert new is not None
    return new


def cas(bundle: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(bundle)


def test_absent_gives_a_ca_and_leaf_for_the_hosts_and_a_good_one_is_kept() -> None:
    s = fresh()
    assert problem(s, HOSTS, NOW) is None
    assert plan(s, HOSTS, NOW) is None, "a replica must adopt a good Secret, not rewrite it"
    assert s.ca_key_pem and len(cas(s.ca_bundle)) == 1


def test_expiring_leaf_is_renewed_from_the_same_ca_so_the_cabundle_stays() -> None:
    s = fresh()
    later = (
        NOW
        + dt.timedelta(days=servingcert.LEAF_DAYS)
        - servingcert.RENEW_BEFORE
        + dt.timedelta(days=1)
    )
    assert "expires" in (problem(s, HOSTS, later) or "")
    renewed = plan(s, HOSTS, later)
    assert (
        renewed is not None and renewed.ca_bundle == s.ca_bundle and renewed.cert_pem != s.cert_pem
    )
    assert problem(renewed, HOSTS, later) is None


def test_a_new_host_renews_the_leaf() -> None:
    s = fresh()
    hosts = ["other-webhook.ns.svc", *HOSTS[1:]]
    assert "does not cover" in (problem(s, hosts, NOW) or "")
    renewed = plan(s, hosts, NOW)
    assert (
        renewed is not None
        and renewed.ca_bundle == s.ca_bundle
        and problem(renewed, hosts, NOW) is None
    )


def test_garbage_or_a_foreign_leaf_is_replaced() -> None:
    assert plan(Serving(b"junk", b"junk", b"junk"), HOSTS, NOW) is not None
    s = fresh()
    other = pki.issue(pki.make_ca("other"), HOSTS[0], HOSTS)
    foreign = Serving(other.cert_pem, other.key_pem, s.ca_bundle, s.ca_key_pem)
    assert "not issued" in (problem(foreign, HOSTS, NOW) or "")
    mismatched = Serving(s.cert_pem, other.key_pem, s.ca_bundle, s.ca_key_pem)
    assert "key does not match" in (problem(mismatched, HOSTS, NOW) or "")


def test_expiring_ca_is_replaced_and_the_old_one_stays_trusted_meanwhile() -> None:
    """A replica still serving the old leaf must stay trusted until it reloads."""
    s = fresh()
    later = NOW + dt.timedelta(days=servingcert.CA_DAYS) - servingcert.CA_RENEW_BEFORE
    new = plan(s, HOSTS, later)
    assert new is not None
    bundle = cas(new.ca_bundle)
    assert len(bundle) == 2 and bundle[1] == cas(s.ca_bundle)[0]
    assert problem(new, HOSTS, later) is None


def test_a_deleted_secret_is_recreated_trusting_the_ca_replicas_still_serve() -> None:
    """Replicas that have not yet reloaded keep serving the previous leaf: the new
    caBundle must trust its CA too."""
    s = fresh()
    new = plan(None, HOSTS, NOW, serving_bundle=s.ca_bundle)
    assert new is not None
    bundle = cas(new.ca_bundle)
    assert len(bundle) == 2 and bundle[1] == cas(s.ca_bundle)[0]
    assert len(cas(plan(None, HOSTS, NOW).ca_bundle)) == 1  # type: ignore[union-attr]
