"""ISSTAD's stage machine (``stages.py``) through the real anomalib Engine: the switch and its frozen encoder, budgets,
resume mid-stage, validation and checkpoint pacing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from anomalib.callbacks.checkpoint import ModelCheckpoint
from lightning.pytorch import Callback, seed_everything

from isstad_plugin import Isstad
from isstad_plugin.models.isstad.stages import StagePlan
from tests.models.isstad.engine_helpers import METRICS, EncoderWatch, Recorder, datamodule, encoder_state, engine


class Cadence(Callback):
    """Records the epochs after which validation ran and checkpoints were written."""

    def __init__(self) -> None:
        self.validated: list[int] = []
        self.saved: list[int] = []

    def on_validation_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.validated.append(trainer.current_epoch)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:  # noqa: ANN001
        self.saved.append(trainer.current_epoch)


class FailAt(Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        if trainer.current_epoch == 1:
            raise RuntimeError("stop here")


def test_stage_switch_freezes_encoder_bit_identically(tile_root: Path, tiny_model_args: dict, tmp_path: Path) -> None:
    seed_everything(0)
    model = Isstad(**tiny_model_args, stage1_epochs=1, stage2_epochs=2)
    watch, recorder = EncoderWatch(), Recorder()
    decoder_before = model.model.decoder_pred.weight.detach().clone()
    eng = engine(tmp_path, callbacks=[watch, recorder])
    eng.fit(model=model, datamodule=datamodule(tile_root))
    assert [stage for _, stage, _ in recorder.trace] == [1, 1, 2, 2, 2, 2]  # 2 batches per epoch
    assert watch.snapshot is not None and watch.stage2_backwards == 4
    for name, value in encoder_state(model).items():
        assert torch.equal(value, watch.snapshot[name]), name
    assert not torch.equal(model.model.decoder_pred.weight, decoder_before)
    assert all(not p.requires_grad for p in model.model.encoder_parameters())
    # stage 2 starts a fresh AdamW at stage2_lr over the decoder only
    assert recorder.trace[2][2] == pytest.approx(model.hparams.stage2_lr)
    optimizer = eng.trainer.optimizers[0]
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained.isdisjoint(id(p) for p in model.model.encoder_parameters())


def test_stage1_epochs_zero_skips_stage1(tile_root: Path, tiny_model_args: dict, tmp_path: Path) -> None:
    model = Isstad(**tiny_model_args, stage1_epochs=0, stage2_epochs=1)
    before = {k: v.clone() for k, v in encoder_state(model).items()}
    recorder = Recorder()
    engine(tmp_path, callbacks=[recorder]).fit(model=model, datamodule=datamodule(tile_root))
    assert {stage for _, stage, _ in recorder.trace} == {2}
    assert all(torch.equal(v, before[k]) for k, v in encoder_state(model).items())


def test_shorter_trainer_budget_scales_both_stages(
    tile_root: Path, tiny_model_args: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    model = Isstad(**tiny_model_args, stage1_epochs=2, stage2_epochs=2)
    recorder = Recorder()
    eng = engine(tmp_path, max_epochs=2, callbacks=[recorder])
    with caplog.at_level(logging.INFO):
        eng.fit(model=model, datamodule=datamodule(tile_root))
    assert eng.trainer.current_epoch == 2  # the user's budget, not overridden
    assert sorted({(epoch, stage) for epoch, stage, _ in recorder.trace}) == [(0, 1), (1, 2)]
    assert "scaled both stages to 1 + 1" in caplog.text


def test_budget_plan_arithmetic() -> None:
    configured = StagePlan(305, 200, 40, 30)
    plan, message = configured.fitted_to(None)
    assert (plan.stage1_epochs, plan.stage2_epochs, message) == (305, 200, None)
    plan, message = configured.fitted_to(101)
    assert (plan.stage1_epochs, plan.stage2_epochs) == (61, 40)
    assert plan.stage1_warmup_epochs == pytest.approx(40 * 61 / 305)
    assert plan.stage2_cosine_epochs == 6
    plan, _ = configured.fitted_to(1)  # Engine(max_epochs=1): stage 2 only
    assert (plan.stage1_epochs, plan.stage2_epochs) == (0, 1)
    assert [plan.stage_at(e) for e in range(1)] == [2]


@pytest.mark.parametrize("resume_after_epoch", [0, 2], ids=["mid-stage-1", "mid-stage-2"])
def test_resume_continues_stage_and_schedule(
    tile_root: Path, tiny_model_args: dict, tmp_path: Path, resume_after_epoch: int,
) -> None:
    args = {**tiny_model_args, "stage1_epochs": 2, "stage2_epochs": 2, "stage1_warmup_epochs": 1,
            "stage2_cosine_epochs": 2}
    seed_everything(0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    full = Recorder()
    engine(tmp_path / "full", callbacks=[full, checkpoints]).fit(model=Isstad(**args), datamodule=datamodule(tile_root))

    resumed = Recorder()
    model = Isstad(**args)
    eng = engine(tmp_path / "resumed", callbacks=[resumed])
    eng.fit(model=model, datamodule=datamodule(tile_root),
            ckpt_path=tmp_path / "ckpt" / f"epoch={resume_after_epoch}.ckpt")
    assert eng.trainer.current_epoch == 4
    assert model.stage == 2
    assert all(not p.requires_grad for p in model.model.encoder_parameters())
    tail = [row for row in full.trace if row[0] > resume_after_epoch]
    assert [(e, s) for e, s, _ in resumed.trace] == [(e, s) for e, s, _ in tail]
    assert [lr for *_, lr in resumed.trace] == pytest.approx([lr for *_, lr in tail], rel=1e-9)


@pytest.mark.parametrize(("val_every", "validated"), [(0, [4]), (2, [3, 4])], ids=["at-the-end", "every-2"])
def test_validation_and_checkpoints_follow_the_stages(
    tile_root: Path, tiny_model_args: dict, tmp_path: Path, val_every: int, validated: list[int],
) -> None:
    """No validation in stage 1; model.ckpt at each stage end (plus stage1.ckpt), not after every epoch."""
    model = Isstad(**tiny_model_args, stage1_epochs=2, stage2_epochs=3, val_every_n_epochs=val_every,
                   checkpoint_every_n_epochs=0)
    cadence = Cadence()
    eng = engine(tmp_path, callbacks=[cadence])
    eng.fit(model=model, datamodule=datamodule(tile_root))
    assert cadence.validated == validated
    assert cadence.saved == [1, 1, 4]  # stage1.ckpt and model.ckpt after stage 1, model.ckpt after the last epoch
    (weights,) = {path.parent for path in tmp_path.rglob("*.ckpt")}  # <root>/Isstad/MVTecAD/<category>/v0/...
    assert weights.parts[-2:] == ("weights", "lightning")
    assert sorted(p.name for p in weights.iterdir()) == ["model.ckpt", "stage1.ckpt"]
    assert torch.load(weights / "stage1.ckpt", weights_only=True)["isstad_stage"] == 1
    final = torch.load(weights / "model.ckpt", weights_only=True)
    assert (final["isstad_stage"], final["epoch"]) == (2, 4)
    assert eng.trainer.limit_val_batches == 1.0  # the trainer's own setting is given back
    metrics = eng.test(model=model, datamodule=datamodule(tile_root), ckpt_path=weights / "model.ckpt")[0]
    assert set(metrics) == METRICS


def test_a_cadence_the_user_chose_is_kept(tile_root: Path, tiny_model_args: dict, tmp_path: Path) -> None:
    """trainer.check_val_every_n_epoch and a user's ModelCheckpoint win over the model's defaults: validation in
    stage 1 too, and the user's callback saves as Lightning makes it (after each validation, at this cadence)."""
    model = Isstad(**tiny_model_args, stage1_epochs=2, stage2_epochs=2)
    cadence = Cadence()
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "mine", filename="{epoch}", save_top_k=-1)
    engine(tmp_path, callbacks=[cadence, every_epoch], check_val_every_n_epoch=2).fit(
        model=model, datamodule=datamodule(tile_root))
    assert cadence.validated == [1, 3]
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["epoch=1.ckpt", "epoch=3.ckpt"]
    assert [p.name for p in tmp_path.rglob("*.ckpt") if p.parent.name != "mine"] == []  # no model.ckpt of ours


def test_early_stopping_keeps_lightnings_cadence(tile_root: Path, tiny_model_args: dict, tmp_path: Path) -> None:
    """A callback that reads metrics every epoch (EarlyStopping, monitored checkpoints) gets them every epoch."""
    from lightning.pytorch.callbacks import EarlyStopping

    cadence = Cadence()
    model = Isstad(**tiny_model_args, stage1_epochs=1, stage2_epochs=2)
    eng = engine(tmp_path, callbacks=[cadence, EarlyStopping(monitor="train_loss", patience=100)])
    eng.fit(model=model, datamodule=datamodule(tile_root))
    assert cadence.validated == [0, 1, 2]


def test_a_failed_fit_gives_the_validation_limit_back(tile_root: Path, tiny_model_args: dict, tmp_path: Path) -> None:
    model = Isstad(**tiny_model_args, stage1_epochs=2, stage2_epochs=2)
    eng = engine(tmp_path, callbacks=[FailAt()])
    with pytest.raises(RuntimeError, match="stop here"):
        eng.fit(model=model, datamodule=datamodule(tile_root))
    assert eng.trainer.limit_val_batches == 1.0  # a later validate/test on this trainer is not silently skipped

