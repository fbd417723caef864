#!/usr/bin/env python
"""Upload and download rates of a run's objects through ``ddm.store.ObjectStore``.

    python scripts/bench_store.py                      # a local S3 server (moto) started here, 64 MiB x 4
    python scripts/bench_store.py --url s3://bucket/x  # your bucket (credentials and endpoint from the environment)

Each object is uploaded as ddm uploads (straight to its key on S3, GCS and Azure, whose objects appear whole or
not at all; elsewhere a .part- key moved to its name) and downloaded as ddm downloads (a temporary file, its
sha256 checked, renamed). Prints MiB/s for each, and ddm's upload against a plain put of the same bytes. Then a
folder of ``--files`` files is pushed and pulled as a job pushes and pulls one (``ddm.store.mirror``), one file at
a time and ``--transfers`` at once, and the ratio of the two is printed.
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
    parser.add_argument("--files", type=int, default=32, help="files of the folder pushed and pulled")
    parser.add_argument("--file-mib", type=int, default=4, help="size of each of the folder's files in MiB")
    parser.add_argument("--transfers", type=int, default=8, help="files moved at once (store.transfers)")
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
            folder = _folder_rates(store, Path(tmp), args.files, args.file_mib, args.transfers)
        where = "a local moto server on 127.0.0.1" if server else store.url
        print(f"store: {where}; {args.count} objects of {args.mib} MiB")
        print(f"upload (ObjectStore.put_file):    {total / up:8.1f} MiB/s  ({up:.2f} s)")
        print(f"upload, plain put of the same:   {total / plain:8.1f} MiB/s  (ddm's costs {up / plain:.2f}x)")
        print(f"download (sha256 checked):       {total / down:8.1f} MiB/s  ({down:.2f} s)")
        size = args.files * args.file_mib
        print(f"a folder of {args.files} files of {args.file_mib} MiB, pushed and pulled (sha256 checked):")
        for what, (one, many) in folder.items():
            print(
                f"  {what}: {size / one:8.1f} MiB/s one at a time, {size / many:8.1f} MiB/s {args.transfers} at once "
                f"({one / many:.2f}x faster)"
            )
    finally:
        if server is not None:
            server.stop()


def _folder_rates(store, tmp: Path, files: int, mib: int, transfers: int) -> dict:
    """Seconds to push ``files`` files under fresh keys, and to pull them into a fresh folder, one at a time and
    ``transfers`` at once: ``{"push": (one, many), "pull": (one, many)}``."""
    from ddm.store.mirror import pull_folder, push_folder

    for name in ("one", "many"):
        (tmp / "source" / name).mkdir(parents=True)
        for i in range(files):
            (tmp / "source" / name / f"shard-{i:06d}.tar").write_bytes(os.urandom(mib << 20))
    times = {"push": [], "pull": []}
    for name, n in (("one", 1), ("many", transfers)):
        began = time.perf_counter()
        push_folder(store, tmp / "source", name, transfers=n)
        times["push"].append(time.perf_counter() - began)
        began = time.perf_counter()
        pull_folder(store, tmp / f"pulled-{name}", name, transfers=n)
        times["pull"].append(time.perf_counter() - began)
    return {what: tuple(t) for what, t in times.items()}


if __name__ == "__main__":
    main()
