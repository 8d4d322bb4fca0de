"""The trust policy's remembered verdicts: the same answers as judging afresh, bounded."""

from __future__ import annotations

from spendtap.proxy.trust import PEER_VERDICTS_MAX, TrustPolicy

PEERS = [
    "127.0.0.1",
    "127.9.9.9",
    "10.1.2.3",
    "10.2.0.1",
    "192.168.0.7",
    "::1",
    "::ffff:10.1.2.3",  # IPv4-mapped: judged as 10.1.2.3
    "::ffff:8.8.8.8",
    "fe80::1%eth0",
    "2001:db8::5",
    "8.8.8.8",
    "",
    None,
    "not-an-address",
]


def test_remembered_verdicts_match_fresh_ones():
    for spec in ("", "10.1.0.0/16, 2001:db8::/32", "127.0.0.1", "::1"):
        policy = TrustPolicy.from_settings(spec, None)
        fresh = {peer: policy._judge(peer) for peer in PEERS}
        for _ in range(3):  # the first pass judges, the next ones remember
            assert {peer: policy.trusts_peer(peer) for peer in PEERS} == fresh, spec
    policy = TrustPolicy.from_settings("10.1.0.0/16", None)
    assert policy.trusts_peer("10.1.2.3") and policy.trusts_peer("::ffff:10.1.2.3")
    assert not policy.trusts_peer("10.2.0.1") and not policy.trusts_peer("127.0.0.1")
    assert not policy.trusts_peer(None) and not policy.trusts_peer("not-an-address")


def test_remembered_verdicts_are_bounded_and_not_shared():
    policy = TrustPolicy.from_settings("10.0.0.0/8", None)
    for i in range(PEER_VERDICTS_MAX * 2 + 3):
        peer = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        assert policy.trusts_peer(peer)
        assert len(policy._verdicts) <= PEER_VERDICTS_MAX
    assert not policy.trusts_peer("11.0.0.1")
    # Settings changed at run time make a new policy: nothing judged under the old one
    # carries over, and equal settings still compare equal.
    other = TrustPolicy.from_settings("11.0.0.0/8", None)
    assert other._verdicts == {} and other.trusts_peer("11.0.0.1")
    assert TrustPolicy.from_settings("10.0.0.0/8", None) == policy


def test_any_peer_needs_no_memory():
    policy = TrustPolicy.from_settings("any", None)
    assert all(policy.trusts_peer(peer) for peer in PEERS)
    assert policy._verdicts == {}
