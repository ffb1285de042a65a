"""Wait until TCP ports accept connections: a restored service serving again.

Run inside the private network (``python -m transmigrate.orchestrate.probe ADDRESS
PORT...``), as a client of the service would be. Exits 0 once every port has
accepted a connection, 1 with the first port that did not within ``--timeout``.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time

__all__ = ["main"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("address")
    parser.add_argument("ports", nargs="+", type=int)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    deadline = time.monotonic() + args.timeout
    for port in args.ports:
        while True:
            try:
                socket.create_connection((args.address, port), timeout=1.0).close()
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    sys.exit(f"{args.address}:{port} accepts no connection ({exc})")
                time.sleep(0.02)


if __name__ == "__main__":
    main()
