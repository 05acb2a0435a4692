"""Loading the Raft layer leaves the standard library's address functions as they were."""

import socket


def test_socket_inet_ntop_still_works_after_the_raft_layer_loaded():
    import cortex.raft.consensus  # noqa: F401  (imports pysyncobj, whose win_inet_pton replaced inet_ntop)

    assert socket.inet_ntop(socket.AF_INET, b"\x7f\x00\x00\x01") == "127.0.0.1"
    assert socket.inet_ntop(socket.AF_INET6, b"\x00" * 15 + b"\x01") == "::1"


def test_pyroute2_decodes_addresses_in_a_process_that_runs_raft():
    from pyroute2 import IPRoute

    import cortex.raft.consensus  # noqa: F401

    with IPRoute() as ipr:
        addresses = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)]
    assert "127.0.0.1" in addresses
