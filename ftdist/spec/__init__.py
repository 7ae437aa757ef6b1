"""What a job is: the schemas (job, sweep, kubernetes) and how a job file becomes a frozen, validated `JobSpec`.

Pure: nothing here imports torch, ray or deepspeed, so `ftdist validate` answers in well under a second.
"""

from ftdist.spec.job import (CheckpointSpec, DataSource, DataSpec, DpoSpec, EncryptionSpec, EvalSpec, ExportSpec,
                             FreezeSpec, JobSpec, LoggingSpec, LoraSpec, ModelSpec, OptimSpec, ParallelSpec,
                             ResourcesSpec,
                             UploadSpec, ZeroSpec, parse_size)
from ftdist.spec.kubernetes import ENV_NAME_RE, KubernetesSpec, SecretEnvSpec
from ftdist.spec.load import (LOCAL_PATH_KEYS, check_local_inputs, load_spec, local_paths, missing_local_inputs,
                              spec_from_dict, spec_from_json, with_overrides)
from ftdist.spec.sweep import SchedulerSpec, SearchDim, SweepSpec

__all__ = [
    "CheckpointSpec", "DataSource", "DataSpec", "DpoSpec", "EncryptionSpec", "EvalSpec", "ExportSpec", "FreezeSpec",
    "JobSpec", "LoggingSpec", "LoraSpec", "ModelSpec", "OptimSpec", "ParallelSpec", "ResourcesSpec", "UploadSpec",
    "ZeroSpec", "ENV_NAME_RE",
    "KubernetesSpec", "SecretEnvSpec", "LOCAL_PATH_KEYS", "check_local_inputs", "load_spec", "local_paths",
    "missing_local_inputs", "spec_from_dict", "spec_from_json", "with_overrides", "SchedulerSpec", "SearchDim",
    "SweepSpec", "parse_size",
]
