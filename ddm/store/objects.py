"""``ObjectStore``: a run directory that lives under a URL (``s3://bucket/run``, ``gs://``, ``az://``, any fsspec
protocol), with the promises a local run directory keeps.

- **Nothing half-written looks complete.** On S3, GCS and Azure (``ATOMIC_PUT``) an object appears whole when its
  upload completes, or not at all (a multipart upload stays invisible until it is completed), so an object is put
  straight to its key. Elsewhere an upload goes to ``<key>.part-<token>`` first and is moved to its name once
  whole; a reader never takes a ``.part-`` key for an artefact. (A temporary key on S3 would cost a server-side
  copy of every byte for nothing: ``make bench-store`` measured the move at 1.9x a put.)
- **What comes down is what was recorded.** ``get_file`` writes to a temporary file beside the target, checks its
  sha256 when one is given, then renames it; a mismatch names the object's URL and leaves nothing behind.
- **One writer per key where it matters.** ``create`` makes an object only if no object has that key, with the
  store's conditional put (S3's ``If-None-Match``, which s3fs sends for mode ``xb``); a store without one says so
  (``ConditionalPutUnsupported``) and the caller decides.

Credentials and endpoints come from the environment as each fsspec backend reads them (for S3: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ...); ``redacted`` strips anything secret a URL
carries before it is logged or recorded.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ddm.artifacts import is_url
from ddm.errors import BadInput, Unusable
from ddm.io import sha256_file

PART = ".part-"  # the infix of an upload not yet complete
# Protocols whose objects appear whole or not at all: put straight to the key.
ATOMIC_PUT = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


class ConditionalPutUnsupported(Unusable):
    """The store cannot create an object only if it is absent."""


def redacted(url: str) -> str:
    """``url`` without user, password or query (where signed URLs and keys hide): safe to log and record."""
    parts = urlsplit(str(url))
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def working_copy_path(run_dir, cache) -> Path:
    """Where a run lives on this machine: ``run_dir`` itself, or for a URL its working copy
    ``cache/<protocol>/<bucket>/<path>`` (the credentials a URL may carry left out)."""
    if not is_url(run_dir):
        return Path(str(run_dir))
    scheme, rest = redacted(str(run_dir)).rstrip("/").split("://", 1)
    return Path(str(cache)) / scheme / rest


class ObjectStore:
    """The objects under ``url``; keys are paths relative to it (``experts/expert-03/expert.pt``)."""

    def __init__(self, url: str, fs=None):
        if not is_url(url):
            raise BadInput(f"{url!r} is not a URL of an object store (s3://bucket/run, gs://..., memory://...)")
        self.url = redacted(url).rstrip("/")
        if fs is None:
            import fsspec

            try:
                fs, root = fsspec.core.url_to_fs(str(url))
            except (ImportError, ValueError) as error:
                raise BadInput(
                    f"cannot open {self.url}: {error}. The protocol's fsspec backend must be installed "
                    f"(s3fs for s3://: pip install 'ddm[store]'; gcsfs for gs://, adlfs for az://)"
                ) from None
        else:
            root = fs._strip_protocol(str(url))
        self.fs, self.root = fs, str(root).rstrip("/")
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        self.atomic_put = any(p in ATOMIC_PUT for p in protocols)

    # ---- names ------------------------------------------------------------------------
    def key(self, rel) -> str:
        rel = str(rel).strip("/")
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel) -> str:
        """The URL of ``rel``, as messages name it."""
        rel = str(rel).strip("/")
        return f"{self.url}/{rel}" if rel else self.url

    # ---- reading ----------------------------------------------------------------------
    def exists(self, rel) -> bool:
        self.fs.invalidate_cache()
        return bool(self.fs.exists(self.key(rel)))

    def list(self, rel="") -> list[str]:
        """The complete objects under ``rel`` (recursively), as keys relative to the store; uploads in flight are
        left out."""
        self.fs.invalidate_cache()
        base = self.key(rel)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        out = []
        for key in found:
            rel_key = str(key)[len(self.root) :].lstrip("/")
            if PART not in Path(rel_key).name:
                out.append(rel_key)
        return sorted(out)

    def read_bytes(self, rel) -> bytes:
        try:
            return self.fs.cat_file(self.key(rel))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url_of(rel)} does not exist") from None

    def read_json(self, rel):
        data = self.read_bytes(rel)
        try:
            return json.loads(data)
        except ValueError:
            raise Unusable(f"{self.url_of(rel)} is not valid JSON: it was damaged; write it again") from None

    def get_file(self, rel, local, sha256: str | None = None) -> Path:
        """Download ``rel`` to ``local`` (temporary file, checksum, rename); returns ``local``."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.tmp")
        try:
            try:
                self.fs.get_file(self.key(rel), str(tmp))
            except FileNotFoundError:
                raise FileNotFoundError(f"{self.url_of(rel)} does not exist") from None
            if sha256 is not None:
                got = sha256_file(tmp)
                if got != sha256:
                    raise Unusable(
                        f"{self.url_of(rel)} does not match its recorded sha256 ({got[:12]}... against "
                        f"{sha256[:12]}...): the object was damaged or replaced; upload it again from the job "
                        f"that made it"
                    )
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        return local

    # ---- writing ----------------------------------------------------------------------
    def put_file(self, local, rel) -> str:
        """Upload ``local`` to ``rel`` whole (see the module docstring). Returns its URL."""
        self._put(lambda key: self.fs.put_file(str(local), key), rel)
        return self.url_of(rel)

    def put_bytes(self, data: bytes, rel) -> str:
        """``put_file`` of bytes."""
        self._put(lambda key: self.fs.pipe_file(key, data), rel)
        return self.url_of(rel)

    def _put(self, write, rel) -> None:
        final = self.key(rel)
        if self.atomic_put:
            write(final)
        else:
            part = f"{final}{PART}{uuid.uuid4().hex}"
            write(part)
            try:
                self.fs.mv(part, final)
            finally:
                if self.fs.exists(part):
                    self.fs.rm_file(part)
        self.fs.invalidate_cache()

    def put_json(self, obj, rel) -> str:
        return self.put_bytes((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), rel)

    def create(self, rel, data: bytes) -> bool:
        """Create ``rel`` holding ``data`` only if no object has that key: True when this call made it."""
        try:
            with self.fs.open(self.key(rel), "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        except (NotImplementedError, ValueError) as error:
            raise ConditionalPutUnsupported(
                f"{self.url} cannot create an object only if it is absent ({error}): two jobs could both write "
                f"{self.url_of(rel)}"
            ) from None
        self.fs.invalidate_cache()
        return True

    def remove(self, rel) -> None:
        try:
            self.fs.rm_file(self.key(rel))
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache()
