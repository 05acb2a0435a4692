"""The joiner's side of enrollment: which CA it trusts before its join token leaves the node.

A join token carries the cluster CA's pin (`cx1.<secret>.<sha256 of the CA's public key>`, tls.ca_pin).
The joiner reads the CA the enrollment port presents, compares it with the pin and talks TLS to the server
with that CA as the only root; only then is `cx1.<secret>` sent. A token without a pin (made before pins)
is refused unless the operator says --insecure-skip-ca-pin (bootstrap.join.insecure_skip_ca_pin), which is
logged. A join without a token (an operator approves it) trusts the CA presented at first contact, shows
its pin for the operator to compare (`cortex secrets ca` on a member), and pins it for every later ask.
"""

from __future__ import annotations

import logging

import grpc

from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex._proto.cortex.v1 import cortex_pb2_grpc as pb_grpc
from cortex.membership import identity
from cortex.node.logs import fields
from cortex.security import authz

log = logging.getLogger("cortex.enroll")


class EnrollError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def pin_for(token: str, known_pin: str = "", insecure_skip_ca_pin: bool = False) -> str:
    """The CA pin to enforce ("" = trust on first use, allowed for approval joins and when skipped)."""
    pin = identity.split_token(token)[1] if token else ""
    if pin or known_pin:
        if pin and known_pin and pin != known_pin:
            raise EnrollError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"the join token pins CA {pin[:16]}…, this node already trusts CA {known_pin[:16]}…")
        return pin or known_pin
    if token and not insecure_skip_ca_pin:
        raise EnrollError(grpc.StatusCode.FAILED_PRECONDITION,
                          "this join token carries no CA pin (a token from before pinning), so this node cannot "
                          "check that it talks to the real cluster before sending it. Make a new token on a "
                          "member with `cortex token create` (it ends in .<64 hex digits>), or accept the risk "
                          "with --insecure-skip-ca-pin (bootstrap.join.insecure_skip_ca_pin: true)")
    if token:
        log.warning("joining WITHOUT checking the cluster CA (--insecure-skip-ca-pin): a man in the middle "
                    "could take the join token")
    return ""


def call_join(address: str, request: pb.JoinRequest, pin: str, options: list,
              timeout: float) -> tuple[pb.JoinResponse, str]:
    """Join over the enrollment port, pinned to `pin` when given. Returns (response, pin of the CA trusted).
    The token is stripped of its pin (only its secret part is sent), and nothing is sent before the server
    is checked against the CA."""
    token = identity.split_token(request.token)[0] if request.token else ""
    outgoing = pb.JoinRequest()
    outgoing.CopyFrom(request)
    outgoing.token = token
    try:
        enrollment = authz.open_enrollment(address, options, pin=pin)
    except ConnectionError as exc:
        raise EnrollError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
    except authz.PinMismatch as exc:
        log.error("join refused: the server is not the pinned cluster's", extra=fields(address=address,
                                                                                          error=str(exc)))
        raise EnrollError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
    if not pin:
        log.warning("trusting the cluster CA presented at first contact: compare its pin with "
                    "`cortex secrets ca` on a member", extra=fields(address=address, ca_pin=enrollment.pin))
    try:
        return pb_grpc.ClusterStub(enrollment.channel).Join(outgoing, timeout=timeout), enrollment.pin
    except grpc.RpcError as exc:
        raise EnrollError(exc.code(), f"{address} refused the join: {exc.details()}") from None
    finally:
        enrollment.channel.close()
