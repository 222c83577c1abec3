"""A real S3-compatible server for the tests: moto's server mode (`moto_server`), started on
a free port in its own process group and stopped by that group's id. It speaks S3 over
HTTP, so the server's boto3 code reads it exactly as it reads a team's bucket: the
endpoint and credentials reach it through the standard AWS environment (`env`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from adapterserve.server_process import free_port


class S3Server:
    def __init__(self, log_path: Path, require_auth: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        # moto checks credentials only when told to: with 0 free calls, every call from an
        # unknown key is refused with 403, as a bucket the credentials may not read
        self.require_auth = require_auth
        self.process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS environment that points boto3 (ours and any user's) here."""
        return {
            "AWS_ENDPOINT_URL_S3": self.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> "S3Server":
        binary = Path(sys.executable).parent / "moto_server"
        env = {**os.environ}
        if self.require_auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self.log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [str(binary), "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True, env=env,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited: {self.log_path.read_text()[-2000:]}")
            try:
                httpx.get(self.url + "/moto-api/", timeout=2)
                return self
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("moto_server did not answer within 60 s")

    def client(self):
        import boto3

        return boto3.session.Session().client(
            "s3", endpoint_url=self.url, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1",
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if self.process is not None:
            self.log.close()
        self.process = None


def upload_folder(client, bucket: str, prefix: str, folder: Path) -> None:
    """Put every file of `folder` under `<prefix>/<file name>`."""
    for file in sorted(Path(folder).iterdir()):
        if file.is_file():
            client.put_object(Bucket=bucket, Key=f"{prefix}/{file.name}", Body=file.read_bytes())


def delete_prefix(client, bucket: str, prefix: str) -> None:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
    for item in listed.get("Contents", []):
        client.delete_object(Bucket=bucket, Key=item["Key"])


def serving(log_dir: Path, bucket: str):
    """An S3 server holding `bucket`, for a fixture to `yield from` (stopped after)."""
    server = S3Server(Path(log_dir) / "moto.log").start()
    try:
        server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        server.stop()
