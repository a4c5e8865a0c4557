"""The worker pods' init container: wait for the master instead of crash-looping.

    python -m vishwamai.kubeflow.wait HOST PORT [--timeout SECONDS]

A worker that starts before the master's pod (and so its Service DNS name) exists fails at
once with "name or service not known"; waiting here until HOST resolves and PORT accepts a TCP
connection lets the job start cleanly in any pod order.  Exit 0 when reachable, 1 on timeout.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time


def reachable(host: str, port: int, timeout_s: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:  # DNS not there yet (gaierror), refused, or timed out
        return False


def wait_for(host: str, port: int, timeout_s: float, interval_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not reachable(host, port):
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vishwamai.kubeflow.wait", description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before giving up (exit 1)")
    parser.add_argument("--interval", type=float, default=2.0)
    args = parser.parse_args(argv)
    print(f"waiting for {args.host}:{args.port} (up to {args.timeout:.0f} s)", flush=True)
    if wait_for(args.host, args.port, args.timeout, args.interval):
        print(f"{args.host}:{args.port} is up", flush=True)
        return 0
    print(f"error: {args.host}:{args.port} not reachable after {args.timeout:.0f} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
