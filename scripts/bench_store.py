#!/usr/bin/env python
"""Upload and download rates of a run's objects through ``ddm.store.ObjectStore``.

    python scripts/bench_store.py                      # a local S3 server (moto) started here, 64 MiB x 4
    python scripts/bench_store.py --url s3://bucket/x  # your bucket (credentials and endpoint from the environment)

Each object is uploaded as ddm uploads (straight to its key on S3, GCS and Azure, whose objects appear whole or
not at all; elsewhere a .part- key moved to its name) and downloaded as ddm downloads (a temporary file, its
sha256 checked, renamed). Prints MiB/s for each, and ddm's upload against a plain put of the same bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a bucket URL to measure against (default: a local moto server)")
    parser.add_argument("--mib", type=int, default=64, help="size of each object in MiB")
    parser.add_argument("--count", type=int, default=4, help="objects uploaded and downloaded")
    args = parser.parse_args()

    from ddm.io import sha256_file
    from ddm.store import ObjectStore

    server = None
    url = args.url
    if url is None:
        from tests.object_store import S3Server

        server = S3Server()
        os.environ.update(server.env())
        url = f"s3://{server.new_bucket()}/bench"
    try:
        store = ObjectStore(url)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "object.bin"
            local.write_bytes(os.urandom(args.mib << 20))
            digest = sha256_file(local)
            total = args.count * args.mib
            began = time.perf_counter()
            for i in range(args.count):
                store.put_file(local, f"objects/{i}.bin")
            up = time.perf_counter() - began
            began = time.perf_counter()
            for i in range(args.count):
                store.fs.put_file(str(local), store.key(f"plain/{i}.bin"))
            plain = time.perf_counter() - began
            began = time.perf_counter()
            for i in range(args.count):
                store.get_file(f"objects/{i}.bin", Path(tmp) / f"down-{i}.bin", sha256=digest)
            down = time.perf_counter() - began
        where = "a local moto server on 127.0.0.1" if server else store.url
        print(f"store: {where}; {args.count} objects of {args.mib} MiB")
        print(f"upload (ObjectStore.put_file):    {total / up:8.1f} MiB/s  ({up:.2f} s)")
        print(f"upload, plain put of the same:   {total / plain:8.1f} MiB/s  (ddm's costs {up / plain:.2f}x)")
        print(f"download (sha256 checked):       {total / down:8.1f} MiB/s  ({down:.2f} s)")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
