"""A process that uses the shared embedded Redis of a folder (driven by tests/test_embedded.py over stdin/stdout).

Usage: ``embedded_user.py DATA_DIR [--binary PATH] [--wait-go] [--set KEY VALUE]``

With ``--wait-go`` it reads a line before acquiring (so that several start at once). It
acquires a lease, optionally writes a key, prints one JSON line (url, started, pid),
then holds the lease until stdin ends or says ``release``, prints ``RELEASED`` and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import redis

from agentcomms.embedded import acquire_embedded


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("--binary")
    parser.add_argument("--wait-go", action="store_true")
    parser.add_argument("--set", nargs=2, metavar=("KEY", "VALUE"))
    args = parser.parse_args()
    if args.wait_go:
        sys.stdin.readline()
    lease = acquire_embedded(args.data_dir, binary=args.binary)
    if args.set:
        client = redis.Redis.from_url(lease.url)
        client.set(*args.set)
        client.close()
    print(json.dumps({"url": lease.url, "started": lease.started, "pid": os.getpid()}), flush=True)
    sys.stdin.readline()
    lease.release()
    print("RELEASED", flush=True)


if __name__ == "__main__":
    main()
