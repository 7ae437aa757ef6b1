"""Rank 0's side of tracking: metric rows go into a queue and one thread writes them to MLflow, TensorBoard and W&B,
so the step loop never waits on a server (`ftdist bench --only tracking` measures the cost).

A resumed attempt replays the steps between its checkpoint and the point where the earlier attempt stopped: MLflow
rows at steps an earlier attempt already logged are skipped (per metric, read back from the server at start),
TensorBoard gets a purge step (its readers drop the earlier attempt's events from that step on), W&B skips steps
below the resumed run's step. A tracking server that fails mid-run costs a warning, never the run: rows are kept and
retried, and the checkpoint's history and the run report hold every row regardless.
"""

from __future__ import annotations

import math
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Optional

from ftdist.errors import last_line
from ftdist.redact import redact
from ftdist.storage.store import open_store
from ftdist.storage.uri import is_remote
from ftdist.train.contracts import TrackingTarget
from ftdist.train.obs.tracking import open_mlflow_run

MAX_PENDING_ROWS = 100_000
"""Rows kept for a tracking server that is down (a 100k-step run logging every step); older ones are dropped."""


def numeric_metrics(row: dict) -> dict[str, float]:
    """A history row's numbers: the step out, one level of nested dicts (the startup breakdown) flattened to
    `startup/model` (MLflow and TensorBoard group names by their prefix)."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if k == "step":
            continue
        if isinstance(v, dict):
            out.update({f"{k}/{'total' if kk == 's' else kk}": float(vv)
                        for kk, vv in v.items() if isinstance(vv, (int, float))})
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


class _MlflowSink:
    name = "MLflow"

    def __init__(self, target: TrackingTarget, run_dir: str) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=target.mlflow_uri)
        self.run_id, created = open_mlflow_run(target, run_dir)
        # Per metric, the last step the server holds (a new run holds none: nothing to read back).
        self.last: Optional[dict[str, int]] = {} if created else None

    def _logged_steps(self) -> dict[str, int]:
        keys = self.client.get_run(self.run_id).data.metrics.keys()
        return {k: max((m.step for m in self.client.get_metric_history(self.run_id, k)), default=-1) for k in keys}

    def write(self, rows: list[dict]) -> None:
        from mlflow.entities import Metric

        if self.last is None:
            self.last = self._logged_steps()
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, int(row["step"])) for row in rows for k, v in numeric_metrics(row).items()
                 if int(row["step"]) > self.last.get(k, -1)]
        for i in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per request
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])
        for m in batch:
            self.last[m.key] = max(self.last.get(m.key, -1), m.step)

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


class _TensorBoardSink:
    name = "TensorBoard"

    def __init__(self, target: TrackingTarget, start_step: int) -> None:
        from tensorboardX import SummaryWriter  # Ray Tune's own TensorBoard writer: no TensorFlow needed

        self.dest = target.tensorboard_dir
        self.local = tempfile.mkdtemp(prefix="ftdist-tb-") if is_remote(self.dest) else self.dest
        # A resume at step S: readers drop the earlier attempts' events from S + 1 on (they are replayed).
        self.writer = SummaryWriter(logdir=self.local, purge_step=start_step + 1 if start_step else None,
                                    flush_secs=30)

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            for k, v in numeric_metrics(row).items():
                if math.isfinite(v):
                    self.writer.add_scalar(k, v, int(row["step"]))

    def sync(self) -> None:
        """Flush; on s3:// storage, upload this attempt's event file (each attempt writes its own)."""
        self.writer.flush()
        if self.local != self.dest:
            names = sorted(os.listdir(self.local))
            open_store(self.dest).put_files([(os.path.join(self.local, n), n) for n in names])

    def close(self) -> None:
        self.writer.close()
        self.sync()
        if self.local != self.dest:
            shutil.rmtree(self.local, ignore_errors=True)


class _WandbSink:
    name = "W&B"

    def __init__(self, target: TrackingTarget, run_dir: str) -> None:
        import wandb

        local = run_dir if not is_remote(run_dir) else tempfile.mkdtemp(prefix="ftdist-wandb-")
        os.makedirs(local, exist_ok=True)
        self.run = wandb.init(project=target.wandb_project, entity=target.wandb_entity, id=target.wandb_id,
                              name=target.wandb_name, group=target.wandb_group, config=target.params,
                              mode=os.environ.get("WANDB_MODE", target.wandb_mode), resume="allow", dir=local,
                              settings=wandb.Settings(console="off", silent=True))

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            step = int(row["step"])
            if step >= self.run.step:  # W&B refuses steps below the resumed run's step
                self.run.log(numeric_metrics(row), step=step)

    def sync(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class MetricsLog:
    """Rank 0's asynchronous writer of metric rows to every configured tracking sink. The thread opens the sinks
    (creating or reopening the MLflow run) while the workers load data and model, and writes at most once per
    `flush_every_s` (a row logged every step is still one request per interval), at once on `sync` and `close`. A
    sink that cannot open yet is tried again at each write; its rows wait for it."""

    def __init__(self, target: TrackingTarget, run_dir: str, start_step: int,
                 say: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                 flush_every_s: float = 5.0) -> None:
        self.target, self.run_dir, self.start_step, self.say = target, run_dir, start_step, say
        self.flush_every_s = flush_every_s
        self.queue: queue.Queue = queue.Queue()
        self.pending: dict[str, list[dict]] = {}
        self.warned: set[str] = set()
        self.sinks: list[Any] = []
        self.unopened: list[tuple[str, Callable[[], Any]]] = []
        self.thread = threading.Thread(target=self._loop, name="ftdist-tracking", daemon=True)
        self.thread.start()

    def log(self, row: dict) -> None:
        self.queue.put(("row", dict(row)))

    def sync(self) -> None:
        """After a checkpoint: rows written now, and event files that live in s3:// storage uploaded (in the
        thread)."""
        self.queue.put(("sync", None))

    def close(self, timeout_s: float = 60.0) -> None:
        self.queue.put(("close", None))
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            self.say(f"[ftdist] tracking: still writing after {timeout_s:.0f} s at the end of the run; left behind "
                     "(the run report and checkpoints hold every metric)")

    def _warn(self, sink: str, e: BaseException) -> None:
        if sink not in self.warned:
            self.warned.add(sink)
            self.say(redact(f"[ftdist] tracking: {sink} failed ({last_line(e)}); training goes on, rows are retried"))

    def _makers(self) -> list[tuple[str, Callable[[], Any]]]:
        t = self.target
        makers: list[tuple[str, Callable[[], Any]]] = []
        if t.mlflow_uri:
            makers.append(("MLflow", lambda: _MlflowSink(t, self.run_dir)))
        if t.tensorboard_dir:
            makers.append(("TensorBoard", lambda: _TensorBoardSink(t, self.start_step)))
        if t.wandb_project:
            makers.append(("W&B", lambda: _WandbSink(t, self.run_dir)))
        return makers

    def _open(self) -> None:
        still = []
        for name, make in self.unopened:
            try:
                self.sinks.append(make())
            except Exception as e:  # noqa: BLE001  (checked before the run: a late failure must not stop it)
                self._warn(name, e)
                still.append((name, make))
        self.unopened = still

    def _flush(self, sync: bool = False) -> None:
        if self.unopened:
            self._open()
        for sink in self.sinks:
            rows = self.pending[sink.name]
            try:
                if rows:
                    sink.write(rows)
                    rows.clear()
                if sync:
                    sink.sync()
            except Exception as e:  # noqa: BLE001
                self._warn(sink.name, e)
        for rows in self.pending.values():
            del rows[:-MAX_PENDING_ROWS]

    def _loop(self) -> None:
        self.unopened = self._makers()
        self.pending = {name: [] for name, _ in self.unopened}
        self._open()
        last_write = -math.inf
        while True:
            waiting = any(self.pending.values()) or self.unopened
            wait = max(0.0, last_write + self.flush_every_s - time.monotonic()) if waiting else None
            try:
                batch = [self.queue.get(timeout=wait)]
            except queue.Empty:
                batch = []
            while not self.queue.empty():  # what queued up meanwhile goes in the same request per sink
                batch.append(self.queue.get())
            for k, r in batch:
                if k == "row":
                    for rows in self.pending.values():
                        rows.append(r)
            kinds = {k for k, _ in batch}
            if kinds & {"sync", "close"} or time.monotonic() - last_write >= self.flush_every_s:
                self._flush(sync="sync" in kinds)  # (close syncs each sink itself)
                last_write = time.monotonic()
            if "close" in kinds:
                for sink in self.sinks:
                    try:
                        sink.close()
                    except Exception as e:  # noqa: BLE001
                        self._warn(sink.name, e)
                return
