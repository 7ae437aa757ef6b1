"""The DPO family's losses against TRL's own implementations, on the same policy and reference log-probabilities:
TRL's DPOTrainer computes DPO (sigmoid) and IPO from a real model's forward pass on the same batch; its CPOTrainer's
loss function gives SimPO and the label-smoothed (conservative) sigmoid, which TRL's DPO no longer offers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ftdist.train.objectives.preference_loss import completion_logps, preference_loss
from tests.conftest import QS

PAIRS, LENGTH, PROMPT = 3, 9, 4


@pytest.fixture(scope="module")
def model_and_batch():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 320, (2 * PAIRS, LENGTH))  # [chosen; rejected], as TRL lays a batch out
    completion = torch.zeros_like(ids)
    for i, end in enumerate((9, 7, 8, 9, 6, 5)):  # completions of different lengths, the rest padding
        completion[i, PROMPT:end] = 1
    attention = torch.ones_like(ids)
    for i, end in enumerate((9, 7, 8, 9, 6, 5)):
        attention[i, end:] = 0
    ref = torch.tensor([-40.0, -35.5, -38.0, -41.0, -30.0, -25.0])
    return model, {"input_ids": ids, "attention_mask": attention, "completion_mask": completion,
                   "ref_chosen_logps": ref[:PAIRS], "ref_rejected_logps": ref[PAIRS:]}


def _trl_dpo(model, batch, loss_type: str | list, beta: float, out: str, weights=None) -> torch.Tensor:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(QS / "tokenizer")
    rows = Dataset.from_list([{"prompt": "Write 12 in words:", "chosen": " twelve", "rejected": " twenty"}] * 2)
    args = DPOConfig(output_dir=out, report_to=[], precompute_ref_log_probs=True, beta=beta,
                     loss_type=loss_type if isinstance(loss_type, list) else [loss_type], loss_weights=weights,
                     use_cpu=True, per_device_train_batch_size=2, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tok)
    with torch.no_grad():
        return trainer._compute_loss(trainer.model, batch, False)


def _ftdist(model, batch, loss_type: str, beta: float, **kw) -> torch.Tensor:
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, tokens = completion_logps(logits, labels)
    out = preference_loss(loss_type, beta, logps[:PAIRS], logps[PAIRS:], batch["ref_chosen_logps"],
                          batch["ref_rejected_logps"], tokens[:PAIRS], tokens[PAIRS:], **kw)
    return out.loss.mean()


@pytest.mark.parametrize("loss_type, beta, sft_weight", [
    ("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("ipo", 0.1, 0.0), ("ipo", 0.3, 0.0), ("sigmoid", 0.1, 0.7)])
def test_dpo_and_ipo_equal_trl(model_and_batch, loss_type, beta, sft_weight, tmp_path):
    """sft_weight: RPO, TRL's loss_type [sigmoid, sft] with loss_weights [1, w]."""
    model, batch = model_and_batch
    trl_types, weights = ([loss_type, "sft"], [1.0, sft_weight]) if sft_weight else (loss_type, None)
    expected = _trl_dpo(model, batch, trl_types, beta, str(tmp_path), weights)
    got = _ftdist(model, batch, loss_type, beta, sft_weight=sft_weight)
    assert got.item() == pytest.approx(expected.item(), abs=1e-6, rel=1e-6)


def _trl_cpo_loss(loss_type: str, beta: float, label_smoothing: float, gamma: float, chosen, rejected):
    from trl.experimental.cpo import CPOTrainer

    trainer = SimpleNamespace(alpha=0.0, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                              simpo_gamma=gamma, accelerator=SimpleNamespace(device="cpu"))
    return CPOTrainer.cpo_loss(trainer, chosen, rejected)


@pytest.mark.parametrize("beta, smoothing, gamma", [(2.0, 0.0, 0.5), (2.5, 0.1, 1.0)])
def test_simpo_equals_trl(beta, smoothing, gamma):
    torch.manual_seed(1)
    chosen, rejected = -torch.rand(5) * 30, -torch.rand(5) * 30
    tokens_c, tokens_r = torch.tensor([5, 9, 3, 7, 4]), torch.tensor([6, 2, 8, 7, 5])
    losses, chosen_rewards, rejected_rewards = _trl_cpo_loss("simpo", beta, smoothing, gamma, chosen / tokens_c,
                                                             rejected / tokens_r)  # TRL averages before the loss
    out = preference_loss("simpo", beta, chosen, rejected, None, None, tokens_c, tokens_r, label_smoothing=smoothing,
                          simpo_gamma=gamma)
    torch.testing.assert_close(out.loss, losses, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.chosen_rewards, chosen_rewards, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.rejected_rewards, rejected_rewards, atol=1e-6, rtol=1e-6)


def test_label_smoothed_dpo_is_conservative_dpo():
    """cDPO: TRL's sigmoid loss with label smoothing (kept in its CPO trainer) applied to the DPO log-ratios."""
    torch.manual_seed(2)
    pc, pr, rc, rr = (-torch.rand(4) * 20 for _ in range(4))
    tokens = torch.ones(4)
    losses, _, _ = _trl_cpo_loss("sigmoid", 0.1, 0.2, 0.0, pc - rc, pr - rr)
    out = preference_loss("sigmoid", 0.1, pc, pr, rc, rr, tokens, tokens, label_smoothing=0.2)
    torch.testing.assert_close(out.loss, losses, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.chosen_rewards, 0.1 * (pc - rc))


def test_reference_free_only_for_simpo():
    t = torch.zeros(2)
    with pytest.raises(ValueError, match="needs reference"):
        preference_loss("sigmoid", 0.1, t, t, None, None, t + 1, t + 1)
