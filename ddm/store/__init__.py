"""Runs that live in an object store (``run_dir=s3://bucket/run``): the objects, and the lock of a job's folder.

``ObjectStore`` (``objects.py``) reads and writes a run's artefacts under a URL through fsspec, keeping the
promises of a local run directory: an upload is complete or invisible, a download is checked against its
recorded sha256, and ``create`` makes an object only if none has its key. ``lock.py`` builds a job's folder
lock on that conditional put, with the rules and messages of ``ddm.launch.lock``.
"""

from ddm.store.objects import ConditionalPutUnsupported, ObjectStore, is_url, redacted

__all__ = ["ConditionalPutUnsupported", "ObjectStore", "is_url", "redacted"]
