"""Runs that live in an object store (``run_dir=s3://bucket/run``): how their stages reach the bucket.

- ``objects``: ``ObjectStore`` reads and writes a run's artefacts under a URL through fsspec, keeping the
  promises of a local run directory: an upload is complete or invisible, a download is checked against its
  recorded sha256, and ``create`` makes an object only if none has its key;
- ``lock``: a job folder's lock on that conditional put, with the rules and messages of ``ddm.launch.lock``;
- ``mirror``: whole folders pushed with their index of sha256s (written last) and pulled against it;
- ``stage_io``: what each stage's job reads and writes, by key;
- ``working_copy``: a stage run on a local copy of the run: pull, run, push;
- ``job_folders``: what ``ddm status``, ``ddm submit`` and the pipeline read of a run's job folders, on local
  disk or in a bucket.
"""

from ddm.store.objects import ConditionalPutUnsupported, ObjectStore, is_url, redacted

__all__ = ["ConditionalPutUnsupported", "ObjectStore", "is_url", "redacted"]
