"""A real multi-node Ray cluster on loopback, for the benchmarks that lose a node (`ftdist bench --only elastic`) and
the tests of the cluster-facing commands: `ray start --head` plus worker nodes, each node with its own ports, one
temp dir, token auth on. Stopped by PID (the processes whose command line names this temp dir), never by `ray stop`,
which would kill every Ray on the machine."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct ports on 127.0.0.1 that nothing listens on. The sockets stay bound until all n are picked: asked
    one at a time, the OS may hand out the same just-released port twice, and `ray start` refuses two components on
    one port (a CI run failed that way)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


_NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
               "runtime-env-agent-port", "metrics-export-port")
_HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port")


def _cluster_ports(nodes: int) -> list[dict[str, int]]:
    """`ray start` port flags of each node (the head first): every port a node would otherwise take at a fixed
    default (two nodes on one host would collide), picked in one go so that no two components share one, and a
    worker-port range of its own (from the pid, away from the ephemeral range)."""
    names = [_HEAD_PORTS + _NODE_PORTS] + [_NODE_PORTS] * (nodes - 1)
    picked = iter(free_ports(sum(len(n) for n in names)))
    out = []
    for node, node_names in enumerate(names):
        out.append({**{name: next(picked) for name in node_names}, **_worker_port_range(node)})
    return out


def _worker_port_range(node: int) -> dict[str, int]:
    """Node `node`'s own range of Ray worker ports: from this process's pid, away from the ephemeral range and from
    the other nodes' (Ray's default 10002-19999 would be shared by every node on the host)."""
    base = 20000 + (os.getpid() * 401 + node * 200) % 12000
    return {"min-worker-port": base, "max-worker-port": base + 199}


def _flags(ports: dict[str, int]) -> list[str]:
    return [f"--{name}={port}" for name, port in ports.items()]


@dataclass
class LocalRayCluster:
    root: str
    gcs: str
    dashboard: str
    token_path: str
    env: dict = field(default_factory=dict)
    nodes: int = 1

    def add_node(self, cpus: int, name: str, env: Optional[dict] = None, gpus: int = 0,
                 wrap: tuple[str, ...] = ()) -> int:
        """Start one more worker node and return its raylet's port (ftdist names a node by `ip:port`). `env`: its own
        environment (what its processes inherit instead of this cluster's); `wrap`: a command the `ray start` runs
        under (e.g. `unshare` with a mount of its own)."""
        ports = {**dict(zip(_NODE_PORTS, free_ports(len(_NODE_PORTS)))), **_worker_port_range(self.nodes)}
        self.nodes += 1
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        _run([*wrap, ray, "start", f"--address={self.gcs}", f"--num-cpus={cpus}", f"--num-gpus={gpus}",
              "--object-store-memory=78643200", *self._common(), *_flags(ports)], env or self.env, self.root, name)
        return ports["node-manager-port"]

    def kill_node(self, port: int) -> int:
        """SIGKILL every process of the worker node whose raylet listens on `port` (add_node's return): the raylet
        and the workers it started, as a lost machine or a preempted pod goes. Returns how many were killed."""
        import psutil

        marks = (f"--node_manager_port={port}", f"--node-manager-port={port}")
        node = [p for p in psutil.process_iter(["pid", "cmdline"])
                if any(m in a for a in (p.info["cmdline"] or []) for m in marks)]
        for p in node:
            for child in [*p.children(recursive=True), p]:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
        return len(node)

    def _common(self) -> list[str]:
        return ["--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--temp-dir={self.root}/tmp"]

    def client_env(self, **extra: str) -> dict:
        """Environment for a client of this cluster (the ftdist CLI): token auth, no inherited RAY_ADDRESS."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=self.token_path)
        env.pop("RAY_AUTH_TOKEN", None)
        env.update(extra)
        return env

    def pids(self) -> list[int]:
        import psutil

        out = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(self.root in a for a in (p.info["cmdline"] or [])):
                    out.append(p.info["pid"])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while pids and self.pids() and time.monotonic() < deadline:
                time.sleep(0.2)
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(head_cpus: int = 1, worker_cpus: tuple[int, ...] = (2,)) -> LocalRayCluster:
    root = tempfile.mkdtemp(prefix="/tmp/ftc")  # short: Ray's socket paths live under it
    token_path = os.path.join(root, "auth_token")
    with open(os.open(token_path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as fh:
        fh.write(secrets.token_hex(32))
    bindir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path, PATH=f"{bindir}:{env.get('PATH', '')}",
               DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0")
    ray = os.path.join(bindir, "ray")
    head, *workers = _cluster_ports(1 + len(worker_cpus))
    cluster = LocalRayCluster(root, f"127.0.0.1:{head['port']}", f"http://127.0.0.1:{head['dashboard-port']}",
                              token_path, env, nodes=1 + len(worker_cpus))
    common = cluster._common()
    try:
        _run([ray, "start", "--head", f"--num-cpus={head_cpus}", "--include-dashboard=true",
              "--dashboard-host=127.0.0.1", *common, *_flags(head)], env, root, "head")
        for i, (cpus, ports) in enumerate(zip(worker_cpus, workers)):
            _run([ray, "start", f"--address={cluster.gcs}", f"--num-cpus={cpus}", *common, *_flags(ports)],
                 env, root, f"worker{i}")
    except Exception:
        cluster.stop()
        raise
    return cluster


def _run(cmd: list[str], env: dict, root: str, what: str) -> None:
    log = os.path.join(root, f"{what}.log")
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=180).returncode
    if rc != 0:
        with open(log) as fh:
            raise RuntimeError(f"ray start ({what}) failed:\n{fh.read()[-3000:]}")
