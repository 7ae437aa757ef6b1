"""The torch-free parts of tracking and the run report: params, metric rows, URIs, error lines, report tables."""

from __future__ import annotations

import csv
import io

import pytest

from ftdist.spec import spec_from_dict
from ftdist.spec.tracking import mlflow_uri_problem
from ftdist.train.contracts import TrainState
from ftdist.train.obs.report import RunReport
from ftdist.train.obs.sinks import numeric_metrics
from ftdist.train.obs.tracking import describe_mlflow_error, flat_params
from tests.conftest import tiny_job_dict


def test_params_are_the_flattened_job_spec():
    spec = spec_from_dict(tiny_job_dict("/runs", tracking={"mlflow": {"tracking_uri": "http://m:5000"}}))
    p = flat_params(spec)
    assert p["optim.lr"] == "0.003" and p["zero.stage"] == "2" and p["model.from_config.model_type"] == "llama"
    assert p["optim.betas"] == "[0.9, 0.999]"  # lists as JSON
    assert p["tracking.mlflow.tracking_uri"] == "http://m:5000"
    assert "data.eval_fraction" in p and "sweep" not in p  # unset sections (None) are left out
    assert all(len(k) <= 250 and len(v) <= 6000 for k, v in p.items())


def test_metric_rows_flatten_the_startup_breakdown():
    row = {"step": 3, "loss": 1.5, "startup": {"s": 20.0, "model": 1.0}, "note": "x", "ok": True}
    assert numeric_metrics(row) == {"loss": 1.5, "startup/total": 20.0, "startup/model": 1.0}


@pytest.mark.parametrize("uri, problem", [
    ("http://mlflow:5000", None), ("https://mlflow.example.com/ml", None), ("databricks", None),
    ("databricks://profile", None), ("file:///tmp/mlruns", None), ("/tmp/mlruns", None),
    ("https://user:pw@mlflow.example.com", "credentials do not go into the tracking URI"),
    ("https://mlflow.example.com?token=abcdef012345", "credentials do not go into the tracking URI"),
    ("http:///x", "no host"), ("ftp://m/x", "unsupported scheme ftp://"), (" http://m", "without surrounding spaces"),
])
def test_tracking_uris(uri, problem):
    got = mlflow_uri_problem(uri)
    assert (got is None) if problem is None else (problem in got), got


@pytest.mark.parametrize("message, why", [
    ("API request to endpoint /api/2.0/mlflow/experiments/search failed with error code 401 != 200.",
     "refused the credentials"),
    ("HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded (Caused by NewConnectionError(...: "
     "[Errno 111] Connection refused))", "nothing accepts connections there"),
    ("Max retries exceeded (Caused by NameResolutionError(\"Failed to resolve 'nohost'\"))", "does not resolve"),
    ("API request to endpoint /api/2.0/mlflow/experiments/search failed with error code 404 != 200.",
     "not an MLflow tracking server"),
    ("Read timed out. (read timeout=5)", "no answer in 5 s"),
])
def test_tracking_errors_are_one_line(message, why):
    line = describe_mlflow_error(RuntimeError(message), "http://m:5000")
    assert line.startswith("tracking.mlflow: http://m:5000: ") and why in line and "\n" not in line


def _state(**kw) -> TrainState:
    history = [
        {"step": 0, "eval_loss": 4.0, "eval_ref_heldout_loss": 2.0},
        {"step": 10, "loss": 3.0, "lr": 1e-3, "startup": {"s": 5.0}},
        {"step": 20, "loss": 2.0, "lr": 1e-3, "eval_loss": 1.0, "eval_ref_heldout_loss": 3.0},
    ]
    return TrainState(step=20, tag="step_00000020", world_size=2, history=history, resumes=[10],
                      worker_seconds=7200.0, wall_seconds=3600.0, **kw)


def test_report_tables_forgetting_beside_the_task_gain(tmp_path):
    report = RunReport("job", str(tmp_path), _state())
    md = report.markdown()
    assert "| eval_loss | 4 | 1 | -3 (-75.0%) |" in md
    assert "| heldout | 2 | 3 | +1 (+50.0%) | -3 (-75.0%) |" in md
    assert "Run folder: `" in md and "resumed at: 10" in md and "60.0 min" in md and "2 worker-hours (2 workers)" in md
    assert "GPU-hours" not in md
    rows = list(csv.DictReader(io.StringIO(report.csv_text())))
    assert [r["step"] for r in rows] == ["0", "10", "20"] and rows[1]["startup/total"] == "5.0"
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "wise_ft.csv").write_text("alpha\n")  # the WiSE-FT curve's files stay beside it
    report.write()
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["curves.png", "metrics.csv", "report.md",
                                                                       "wise_ft.csv"]
    gpu = RunReport("job", "/runs/job", _state(gpu_seconds=7200.0)).markdown()
    assert "2 GPU-hours, 2 worker-hours" in gpu


def test_progress_off_a_terminal_is_one_line_per_interval(monkeypatch):
    import io as _io

    from ftdist import progress as p

    clock = iter(range(0, 1000, 10))  # every item takes 10 s
    monkeypatch.setattr(p.time, "monotonic", lambda: next(clock))
    out = _io.StringIO()
    assert list(p.progress(range(9), 9, "tokenising x", stream=out, interval_s=30)) == list(range(9))
    lines = out.getvalue().splitlines()
    assert lines[0] == "[ftdist] tokenising x: 3/9 (33%), 30s, eta 1m00s" and len(lines) == 4
    assert lines[-1] == "[ftdist] tokenising x: done, 9 in 1m40s"  # the clock read once more at the end
    quiet = _io.StringIO()
    assert list(p.progress(range(3), 3, "x", stream=quiet, show=False)) == [0, 1, 2] and quiet.getvalue() == ""
    assert p.duration(3725) == "1h02m" and p.eta(10, 240, 20.0) == "7m40s" and p.eta(0, 10, 1.0) is None


def test_rank_0_writes_at_most_once_per_interval_and_waits_for_a_sink_that_cannot_open_yet():
    """MetricsLog's thread: rows logged every step go out together, one write per interval (the first at once);
    sync and close write at once; a sink that fails to open (the server was down) is opened again at the next write
    and then receives every row it missed, in order."""
    import threading
    import time

    from ftdist.train.contracts import TrackingTarget
    from ftdist.train.obs.sinks import MetricsLog

    writes: list[list[int]] = []
    opened = threading.Event()
    attempts = []

    class Recording:
        name = "rec"

        def write(self, rows):
            writes.append([r["step"] for r in rows])

        def sync(self):
            writes.append(["sync"])

        def close(self):
            writes.append(["close"])

    def make():
        attempts.append(1)
        if not opened.is_set():
            raise ConnectionError("server down")
        return Recording()

    class Log(MetricsLog):
        def _makers(self):
            return [("rec", make)]

    def until(cond):
        deadline = time.monotonic() + 10
        while not cond() and time.monotonic() < deadline:
            time.sleep(0.01)

    said: list[str] = []
    log = Log(TrackingTarget(), "/unused", 0, said.append, flush_every_s=0.5)
    until(lambda: attempts)  # the first opening failed
    for step in range(1, 4):
        log.log({"step": step, "loss": 1.0})
    opened.set()
    log.sync()
    until(lambda: ["sync"] in writes)
    for step in range(4, 8):  # within one interval of the last write: one request
        log.log({"step": step, "loss": 1.0})
    log.close()
    assert writes == [[1, 2, 3], ["sync"], [4, 5, 6, 7], ["close"]], writes
    assert said == ["[ftdist] tracking: rec failed (server down); training goes on, rows are retried"]
