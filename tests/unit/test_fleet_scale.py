"""What a member's RPC costs the server must not grow with the size of the fleet (bench/fleet.py measures it
with thousands of simulated workers; these are the findings it led to, each on the real part)."""

from __future__ import annotations

from cortex.security import tls

FLEET = 2500  # members, each calling with a certificate of its own


def test_every_members_certificate_stays_cached_across_a_fleet():
    """Every RPC names its caller by its certificate (authz.RoleCheck -> tls.peer_of). With more distinct
    certificates than the cache held, a round of heartbeats from the whole fleet evicted each entry before its
    next use, and every call parsed an X.509 certificate again."""
    ca, ca_key = tls.new_ca("c-fleet")
    csr = tls.new_csr(tls.new_key_pem(), "w")
    certs = [tls.sign(ca, ca_key, csr, f"w{i:05d}", "worker", "c-fleet") for i in range(FLEET)]
    tls.peer_of.cache_clear()
    first = [tls.peer_of(c) for c in certs]  # one heartbeat round: each parsed once
    assert [p.name for p in first] == [f"w{i:05d}" for i in range(FLEET)]
    before = tls.peer_of.cache_info()
    again = [tls.peer_of(bytes(c)) for c in certs]  # the next round: a fresh bytes object per call, as gRPC gives
    after = tls.peer_of.cache_info()
    assert again == first
    assert after.misses == before.misses, f"{after.misses - before.misses} of {FLEET} certificates parsed again"
