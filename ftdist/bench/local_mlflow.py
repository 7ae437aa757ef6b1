"""A throwaway MLflow tracking server for tests and `ftdist bench --only tracking`: `mlflow server` (the full `mlflow`
package, `pip install ftdist[test]`) on 127.0.0.1, a SQLite backend store and a local artifact root in its own
folder, MLflow's basic-auth app with a fresh admin password (so every client authenticates as a real deployment's
would, from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD; the benchmark also measures a server without it);
stopped by PID."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from typing import Optional

from ftdist.bench.local_s3 import stop_server

ADMIN = "admin"


@dataclass
class MlflowServer:
    uri: str
    username: str
    password: Optional[str]
    proc: subprocess.Popen
    workdir: str

    def env(self) -> dict[str, str]:
        """What a client process needs: the URI and the credentials (from its environment, as MLflow reads them)."""
        if self.password is None:
            return {"MLFLOW_TRACKING_URI": self.uri}
        return {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_TRACKING_USERNAME": self.username,
                "MLFLOW_TRACKING_PASSWORD": self.password}

    def files(self) -> list[str]:
        """Every file the server stores (backend database, artifacts, auth database): what a secret scan reads."""
        return [os.path.join(d, f) for d, _, names in os.walk(self.workdir) for f in names]

    def stop(self) -> None:
        stop_server(self.proc, self.workdir, grace_s=15)


def new_password() -> str:
    return secrets.token_hex(16)


def _free_port() -> int:
    with socket.socket() as s:  # Linux's ephemeral range (32768+): outside Ray's worker ports (10002-19999)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow(password: Optional[str], timeout: float = 90.0) -> MlflowServer:
    """Start the server with `password` for the admin user (None: without the basic-auth app, as a server behind a
    company proxy that authenticates runs) and wait until it answers."""
    workdir = tempfile.mkdtemp(prefix="ftdist-mlflow-")
    port = _free_port()
    args = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{workdir}/mlflow.db",
            "--artifacts-destination", f"{workdir}/artifacts", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]
    env = dict(os.environ)
    if password is not None:
        auth_ini = os.path.join(workdir, "basic_auth.ini")
        with open(auth_ini, "w") as fh:
            fh.write(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{workdir}/basic_auth.db\n"
                     f"admin_username = {ADMIN}\nauthorization_function = "
                     "mlflow.server.auth:authenticate_request_basic_auth\n")
        env.update({"MLFLOW_AUTH_CONFIG_PATH": auth_ini, "MLFLOW_AUTH_ADMIN_PASSWORD": password,
                    "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)})  # the auth app's CSRF key
        args += ["--app-name", "basic-auth"]
    log = open(os.path.join(workdir, "server.log"), "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir, env=env)
    server = MlflowServer(f"http://127.0.0.1:{port}", ADMIN, password, proc, workdir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{server.uri}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    with open(os.path.join(workdir, "server.log"), errors="replace") as fh:
        tail = fh.read()[-2000:]
    server.stop()
    why = f"exited with {proc.returncode}" if proc.poll() is not None else f"did not answer in {timeout:.0f} s"
    raise RuntimeError(f"mlflow server {why}: {tail}")
