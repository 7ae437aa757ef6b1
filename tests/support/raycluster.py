"""The local multi-node Ray cluster of ftdist/bench/local_ray.py, for the tests: started, then waited on until its
dashboard's Jobs API answers (`ftdist submit` talks to it)."""

from __future__ import annotations

import time

from ftdist.bench.local_ray import LocalRayCluster, free_port, free_ports, start_cluster as _start

__all__ = ["LocalRayCluster", "free_port", "free_ports", "start_cluster"]


def start_cluster(head_cpus: int = 1, worker_cpus: tuple[int, ...] = (2,)) -> LocalRayCluster:
    cluster = _start(head_cpus, worker_cpus)
    try:
        _wait_for_jobs_api(cluster)
    except Exception:
        cluster.stop()
        raise
    return cluster


def _wait_for_jobs_api(cluster: LocalRayCluster, timeout: float = 90.0) -> None:
    import urllib.request

    token = open(cluster.token_path).read().strip()
    req = urllib.request.Request(f"{cluster.dashboard}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Jobs API at {cluster.dashboard} did not come up in {timeout:.0f}s")
        time.sleep(1.0)
