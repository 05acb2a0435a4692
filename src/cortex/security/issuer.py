"""`python -m cortex.security.issuer`: one issuance for an agent (tls.ISSUE_IN_SUBPROCESS), then exit.

Reads {"call", "args", "kwargs"} as JSON on stdin (bytes as {"b": base64}, datetimes as {"t": ISO 8601}),
runs that tls function in this process, where importing cryptography costs the agent nothing, and writes
{"result"} or {"error", "message"} on stdout. Keys cross only the pipe between the two processes.
"""

from __future__ import annotations

import json
import sys

from cortex.security import tls


def main() -> int:
    try:
        request = json.loads(sys.stdin.buffer.read())
        fn = tls.ISSUING[request["call"]]
        args = tls._decode(request["args"])
        kwargs = {k: tls._decode(v) for k, v in request.get("kwargs", {}).items()}
    except (ValueError, KeyError, TypeError) as exc:
        answer = {"error": "TLSError", "message": f"bad issuer request: {type(exc).__name__}: {exc}"}
    else:
        try:
            answer = {"result": tls._encode(fn(*args, **kwargs))}
        except tls.TLSError as exc:
            answer = {"error": "TLSError", "message": str(exc)}
        except ValueError as exc:
            answer = {"error": "ValueError", "message": str(exc)}
    sys.stdout.write(json.dumps(answer))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
