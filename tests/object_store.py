"""A local S3-compatible server for the tests: moto's server mode on 127.0.0.1, started once and stopped at exit.

The clients find it as a user's would find theirs: through the environment (``AWS_ENDPOINT_URL`` and test
credentials), read by s3fs/botocore, so the code under test passes nothing of it by hand.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

SERVER_ENV = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """``python -m moto.server`` on a free port of 127.0.0.1."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto's S3 server did not start on port {self.port}") from None
                time.sleep(0.1)

    def env(self) -> dict:
        return dict(SERVER_ENV, AWS_ENDPOINT_URL=self.endpoint)

    def new_bucket(self) -> str:
        """A fresh bucket's name (created on the server)."""
        import s3fs

        name = f"ddm-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(client_kwargs=dict(endpoint_url=self.endpoint), key="testing", secret="testing").mkdir(name)
        return name

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def environment_with(server: S3Server) -> dict:
    return dict(os.environ, **server.env())
