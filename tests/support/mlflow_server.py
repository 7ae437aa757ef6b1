"""The MLflow server launcher lives in the package (ftdist bench uses it too)."""

from ftdist.bench.local_mlflow import ADMIN, MlflowServer, new_password, start_mlflow  # noqa: F401

__all__ = ["ADMIN", "MlflowServer", "new_password", "start_mlflow"]
