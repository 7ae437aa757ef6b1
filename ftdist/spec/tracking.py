"""`tracking:` where a run's parameters and metric histories go besides its checkpoints: MLflow, TensorBoard event
files in the run folder, Weights & Biases. Pure: no torch, ray or I/O (the server is probed by `ftdist train`).

Credentials never go here: MLflow reads MLFLOW_TRACKING_TOKEN / MLFLOW_TRACKING_USERNAME + MLFLOW_TRACKING_PASSWORD
(or a Databricks profile) and W&B reads WANDB_API_KEY from the environment of the process that logs.
"""

from __future__ import annotations

import re
from typing import Literal, Optional
from urllib.parse import urlsplit

from pydantic import field_validator

from ftdist.redact import looks_like_secret
from ftdist.spec.base import FrozenSpec

MLFLOW_URI_ENV = "MLFLOW_TRACKING_URI"
_MLFLOW_SCHEMES = ("http", "https", "databricks", "file")
_WANDB_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class MlflowSpec(FrozenSpec):
    """An MLflow tracking server: one run per job (a resume continues it), one parent run per sweep."""

    tracking_uri: Optional[str] = None
    """http(s)://host:port, databricks, or a local folder (file:); default: MLFLOW_TRACKING_URI of the environment."""
    experiment: Optional[str] = None
    """Default: the job's name (a sweep's trials go to the sweep's experiment, under its parent run)."""
    run_name: Optional[str] = None
    """Default: the job's name."""

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            problem = mlflow_uri_problem(v)
            if problem:
                raise ValueError(problem)
        return v

    @field_validator("experiment", "run_name")
    @classmethod
    def _name(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and (not v.strip() or v != v.strip() or len(v) > 250):
            raise ValueError("must be a non-empty name of at most 250 characters, without surrounding spaces")
        return v


def mlflow_uri_problem(uri: str) -> Optional[str]:
    """Why an MLflow tracking URI cannot be used as written (None when it can). Credentials typed into it are
    refused: the URI is logged and shown; MLflow reads them from the environment."""
    if not uri or uri != uri.strip():
        return "an MLflow tracking URI must be non-empty, without surrounding spaces"
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if parts.username is not None or parts.password is not None or looks_like_secret(uri):
            return ("credentials do not go into the tracking URI: set MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment")
        if not parts.hostname:
            return f"{uri}: no host (e.g. http://mlflow.example.com:5000)"
        return None
    if scheme == "databricks" or scheme == "file" or scheme == "" or (len(scheme) == 1 and uri[1:3] == ":\\"):
        return None  # a Databricks profile, or a local folder
    return (f"{uri}: unsupported scheme {scheme}:// (use {', '.join(s + '://' for s in _MLFLOW_SCHEMES[:2])}, "
            "databricks or a local folder)")


class WandbSpec(FrozenSpec):
    """Weights & Biases, where the `wandb` package is installed (`pip install wandb`)."""

    project: str
    entity: Optional[str] = None
    mode: Literal["online", "offline"] = "online"
    """offline: runs are written under the run folder's wandb/ and synced later (`wandb sync`); WANDB_MODE in the
    environment wins, as wandb itself decides."""

    @field_validator("project", "entity")
    @classmethod
    def _name(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not _WANDB_NAME_RE.match(v):
            raise ValueError("must be a W&B name: letters, digits, '.', '_' or '-' (max 128)")
        return v


class TrackingSpec(FrozenSpec):
    """Rank 0 logs; the run folder keeps the metric history either way (checkpoint state, report/)."""

    mlflow: Optional[MlflowSpec] = None
    """`mlflow: {}` logs to MLFLOW_TRACKING_URI under the job's name."""
    tensorboard: bool = True
    """Event files in <run folder>/tensorboard (on s3:// storage: uploaded with each checkpoint and at the end)."""
    wandb: Optional[WandbSpec] = None
