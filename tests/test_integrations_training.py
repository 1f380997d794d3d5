"""The training hook: a real transformers Trainer runs a few steps on a tiny tied Llama with TieAuditCallback.
Training that keeps the tie stays quiet; a step that unties the head in memory (a new Parameter for lm_head,
as code that "fixes" a shared weight does) is caught at the next checkpoint save, as a warning or an error."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from tieaudit import audit_many
from tieaudit.integrations import TieAuditCallback, TieBrokenError, assert_tied
from tieaudit.model import TieStatus


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


class Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


class UntieAt(TrainerCallback):
    """Replaces lm_head's weight by a separate copy after `step`: the model trains untied from then on."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())


def train(tmp_path, *callbacks: TrainerCallback, lr: float = 1e-2) -> LlamaForCausalLM:
    model = tiny_model()
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=lr,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=list(callbacks))
    trainer.train()
    return model


def test_tied_training_is_quiet(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    hook = TieAuditCallback(on_break="raise")
    with caplog.at_level(logging.WARNING, logger="tieaudit"):
        model = train(tmp_path, hook)
    events = [(step, event) for step, event, _ in hook.history]
    assert events == [(0, "train_begin"), (2, "save"), (4, "save")]  # fired by the real Trainer
    assert all(set(s.statuses.values()) == {TieStatus.TIED} for _, _, s in hook.history)  # tied throughout
    assert not caplog.records
    assert_tied(model)
    # the checkpoints the real Trainer wrote, audited as a batch (`tieaudit check run/`): clean
    batch = audit_many([tmp_path / "run"])
    assert [Path(r.target.path).name for r in batch.reports] == ["checkpoint-2", "checkpoint-4"]
    assert batch.exit_code == 0 and not batch.errors


def test_untied_mid_training_warns_at_the_next_save(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    hook = TieAuditCallback()
    with caplog.at_level(logging.WARNING, logger="tieaudit"):
        model = train(tmp_path, UntieAt(1), hook)
    messages = [r.getMessage() for r in caplog.records if r.name == "tieaudit"]
    assert messages and "checkpoint of step 2" in messages[0] and "lm_head.weight" in messages[0]
    assert "diverged" in messages[0]
    with pytest.raises(TieBrokenError, match="TIE001"):
        assert_tied(model)
    # what the Trainer saved: both checkpoints store a head that differs from the embedding under a true flag
    batch = audit_many([tmp_path / "run"])
    assert [[f.code for f in r.findings] for r in batch.reports] == [["TIE001"], ["TIE001"]]
    assert batch.exit_code == 1
    # and transformers really loads it untied, then the next tie_weights() throws the trained head away
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-4")
    assert reloaded.lm_head.weight.data_ptr() != reloaded.model.embed_tokens.weight.data_ptr()
    reloaded.tie_weights()
    assert torch.equal(reloaded.lm_head.weight, reloaded.model.embed_tokens.weight)
    assert not torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


def test_untied_mid_training_raises_when_asked(tmp_path) -> None:
    with pytest.raises(TieBrokenError, match="checkpoint of step 2"):
        train(tmp_path, UntieAt(1), TieAuditCallback(on_break="raise"))


def test_bad_option() -> None:
    with pytest.raises(ValueError, match="on_break"):
        TieAuditCallback(on_break="explode")
