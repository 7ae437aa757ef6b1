
"""The model side without Ray: the freeze method's trainable set, and Liger's kernels as a one-line error where
the package is missing."""

from __future__ import annotations

import pytest

from ftdist.spec import spec_from_dict
from tests.conftest import tiny_job_dict


def test_freeze_trains_only_top_layers(tmp_path):
    from ftdist.train.modeling import apply_method, load_model

    spec = spec_from_dict(tiny_job_dict(str(tmp_path), method="freeze", freeze={"train_top_layers": 1}))
    model = apply_method(load_model(spec.model, None, None), spec)
    trainable = {n.split(".")[2] if n.startswith("model.layers") else n for n, p in model.named_parameters()
                 if p.requires_grad}
    assert trainable == {"3", "model.norm.weight", "lm_head.weight"}


def test_liger_kernel_without_the_package_is_a_one_line_error(tmp_path):
    """`model.use_liger_kernel` on a worker without liger-kernel (CPU CI has no Triton): a SpecError saying how to
    install it, not an ImportError traceback. The kernels themselves run in tests/test_gpu.py."""
    try:
        import liger_kernel.transformers  # noqa: F401
        pytest.skip("liger-kernel is importable here; tests/test_gpu.py covers it")
    except ImportError:
        pass
    from ftdist.errors import SpecError
    from ftdist.train.modeling import apply_kernels, load_model

    job = tiny_job_dict(str(tmp_path))
    job["model"]["use_liger_kernel"] = True
    job["resources"] = {**job["resources"], "gpus_per_worker": 1}
    spec = spec_from_dict(job)
    with pytest.raises(SpecError, match=r"model.use_liger_kernel: liger-kernel is not importable .*ftdist\[gpu\]"):
        apply_kernels(load_model(spec.model, None, None), spec)
