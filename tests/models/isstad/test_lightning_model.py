"""Isstad through the real anomalib Engine: two stages in one run, frozen encoder, resume, budgets, errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything
from anomalib.callbacks.checkpoint import ModelCheckpoint

from isstad_plugin import Isstad
from isstad_plugin.models.isstad.stages import StagePlan

METRICS = {"image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score", "pixel_AUPRO"}


def datamodule(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category="magnetic_tile", train_batch_size=8, eval_batch_size=8, num_workers=0)


def engine(tmp_path: Path, **kwargs) -> Engine:
    return Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                  enable_progress_bar=False, **kwargs)


class Recorder(Callback):
    """Records, per training batch, the epoch, the model's stage and the learning rate in use."""

    def __init__(self) -> None:
        self.trace: list[tuple[int, int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.trace.append((trainer.current_epoch, pl_module.stage, lr))


class EncoderWatch(Callback):
    """Snapshots the encoder when stage 2 starts and checks that no encoder gradient ever appears in stage 2."""

    def __init__(self) -> None:
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.stage2_backwards = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if pl_module.stage == 2 and self.snapshot is None:
            self.snapshot = {k: v.detach().clone() for k, v in encoder_state(pl_module).items()}

    def on_after_backward(self, trainer, pl_module) -> None:  # noqa: ANN001
        if pl_module.stage == 2:
            self.stage2_backwards += 1
            assert all(p.grad is None for p in pl_module.model.encoder_parameters())


def encoder_state(model: Isstad) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.model.state_dict().items() if k.startswith(("patch_embed", "blocks", "norm.", "cls_token"))}


def test_train_and_test_end_to_end_on_real_slice(tile_root: Path, tiny_model_args: dict, tmp_path: Path) -> None:
    seed_everything(0)
    model = Isstad(**tiny_model_args, stage1_epochs=1, stage2_epochs=1)
    eng = engine(tmp_path)
    eng.fit(model=model, datamodule=datamodule(tile_root))
    assert eng.trainer.current_epoch == 2  # no max_epochs given: exactly stage 1 + stage 2
    results = eng.test(model=model, datamodule=datamodule(tile_root))[0]
    assert set(results) == METRICS
    assert all(0.0 <= value <= 1.0 for value in results.values())


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
    plan, message = StagePlan.fit_budget(305, 200, 40, 30, budget=None)
    assert (plan.stage1_epochs, plan.stage2_epochs, message) == (305, 200, None)
    plan, message = StagePlan.fit_budget(305, 200, 40, 30, budget=101)
    assert (plan.stage1_epochs, plan.stage2_epochs) == (61, 40)
    assert plan.stage1_warmup_epochs == pytest.approx(40 * 61 / 305)
    assert plan.stage2_cosine_epochs == 6
    plan, _ = StagePlan.fit_budget(305, 200, 40, 30, budget=1)  # Engine(max_epochs=1): stage 2 only
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


def test_train_resumed_mid_stage2_reports_the_trained_model(
    tile_root: Path, tiny_model_args: dict, tmp_path: Path,
) -> None:
    """anomalib's train passes its ckpt_path on to test: the metrics must still be those of the trained model."""
    args = {**tiny_model_args, "stage1_epochs": 1, "stage2_epochs": 3, "stage2_cosine_epochs": 3}
    seed_everything(0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    engine(tmp_path / "first", callbacks=[checkpoints]).fit(model=Isstad(**args), datamodule=datamodule(tile_root))
    middle = tmp_path / "ckpt" / "epoch=2.ckpt"  # after the first of three stage-2 epochs

    model = Isstad(**args)
    eng = engine(tmp_path / "resumed")
    reported = eng.train(model=model, datamodule=datamodule(tile_root), ckpt_path=middle)[0]
    final = next((tmp_path / "resumed").rglob("model.ckpt"))
    assert torch.load(final, map_location="cpu", weights_only=False)["epoch"] == 3
    trained = Isstad.load_from_checkpoint(final, map_location="cpu")
    expected = engine(tmp_path / "check").test(model=trained, datamodule=datamodule(tile_root), verbose=False)[0]
    assert reported == pytest.approx(expected, abs=1e-6)
    old = engine(tmp_path / "old").test(model=Isstad(**args), datamodule=datamodule(tile_root), ckpt_path=middle,
                                        verbose=False)[0]
    assert old != pytest.approx(expected, abs=1e-6)  # the resumed-from checkpoint really scores differently
    # any other checkpoint still loads as asked
    again = eng.test(model=model, datamodule=datamodule(tile_root), ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt",
                     verbose=False)[0]
    assert again != pytest.approx(expected, abs=1e-6)


def test_missing_data_root_fails_early_with_the_path(tiny_model_args: dict, tmp_path: Path) -> None:
    model = Isstad(**tiny_model_args, stage1_epochs=0, stage2_epochs=1)
    with pytest.raises(FileNotFoundError, match=r"does-not-exist/magnetic_tile does not exist"):
        engine(tmp_path).fit(model=model, datamodule=datamodule(tmp_path / "does-not-exist"))


def test_image_size_not_divisible_by_patch_is_refused() -> None:
    with pytest.raises(ValueError, match=r"image_size=100 is not a multiple of patch_size=16; use e.g. image_size=96"):
        Isstad(backbone="vit_tiny", image_size=100)


class Cadence(Callback):
    """Records the epochs after which validation ran and checkpoints were written."""

    def __init__(self) -> None:
        self.validated: list[int] = []
        self.saved: list[int] = []

    def on_validation_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.validated.append(trainer.current_epoch)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:  # noqa: ANN001
        self.saved.append(trainer.current_epoch)


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


def test_stage2_trains_the_last_encoder_blocks_at_a_scaled_rate(
    tile_root: Path, tiny_model_args: dict, tmp_path: Path,
) -> None:
    seed_everything(0)
    model = Isstad(**tiny_model_args, stage1_epochs=1, stage2_epochs=1, stage2_encoder_blocks=1,
                   stage2_encoder_lr_scale=0.25)
    watch = EncoderWatch()
    watch.on_after_backward = lambda *_: None  # encoder gradients are expected here
    eng = engine(tmp_path, callbacks=[watch])
    eng.fit(model=model, datamodule=datamodule(tile_root))
    last, earlier = model.model.blocks[-1], model.model.blocks[:-1]
    trained = {id(p) for p in [*last.parameters(), *model.model.norm.parameters()]}
    rates = {id(p): group["initial_lr"] for group in eng.trainer.optimizers[0].param_groups for p in group["params"]}
    decoder_rates = {rates[id(p)] for p in model.model.decoder_parameters() if p.requires_grad}
    encoder_rates = {rates[i] for i in trained}
    assert len(decoder_rates) == len(encoder_rates) == 1
    assert encoder_rates.pop() == pytest.approx(0.25 * decoder_rates.pop())
    assert not any(id(p) in rates for p in earlier.parameters())
    state, last_qkv = encoder_state(model), f"blocks.{len(earlier)}.attn.qkv.weight"
    assert not torch.equal(state[last_qkv], watch.snapshot[last_qkv])
    assert torch.equal(state["blocks.0.attn.qkv.weight"], watch.snapshot["blocks.0.attn.qkv.weight"])
    assert torch.equal(state["patch_embed.proj.weight"], watch.snapshot["patch_embed.proj.weight"])


def test_map_calibration_comes_from_the_training_images_and_is_kept(
    tile_root: Path, tiny_model_args: dict, tmp_path: Path,
) -> None:
    seed_everything(0)
    model = Isstad(**tiny_model_args, stage1_epochs=1, stage2_epochs=1, map_calibration="per_pixel",
                   image_score="max")
    eng = engine(tmp_path)
    eng.fit(model=model, datamodule=datamodule(tile_root))
    generator = model.model.anomaly_map_generator
    dm = datamodule(tile_root)
    dm.setup()
    images = torch.cat([model.pre_processor.transform(b.image) for b in dm.train_dataloader()])
    with torch.no_grad():
        raw = model.model.eval().raw_score_maps(images)
    # the fit read the same images through its in-memory cache: equal up to the resize path (about 0.3 %)
    torch.testing.assert_close(generator.normal_mean, raw.mean(0), rtol=2e-2, atol=1e-3)
    checkpoint = next(tmp_path.rglob("model.ckpt"))
    restored = Isstad.load_from_checkpoint(checkpoint, map_location="cpu").model.anomaly_map_generator
    assert torch.equal(restored.normal_mean, generator.normal_mean)
    assert torch.equal(restored.normal_scale, generator.normal_scale)


def test_configure_optimizers_uses_the_fused_adamw(tile_root: Path, tiny_model_args: dict, tmp_path: Path) -> None:
    model = Isstad(**tiny_model_args, stage1_epochs=1, stage2_epochs=1)
    eng = engine(tmp_path)
    eng.fit(model=model, datamodule=datamodule(tile_root))
    assert eng.trainer.optimizers[0].defaults["fused"] is True


class LoaderWatch(Callback):
    """Records what the fit loop really iterates over in each epoch."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        loader = trainer.train_dataloader
        self.seen.append((type(loader.dataset).__name__, loader.num_workers))


def test_fit_trains_on_images_decoded_once(tile_root: Path, tiny_model_args: dict, tmp_path: Path) -> None:
    """The loader of every epoch, stage 1's included, is the in-memory one (no worker processes), though the
    datamodule asks for workers; train_cache_gb=0 keeps anomalib's loader."""
    watch = LoaderWatch()
    workers = MVTecAD(root=tile_root, category="magnetic_tile", train_batch_size=8, eval_batch_size=8, num_workers=2)
    engine(tmp_path / "cached", callbacks=[watch]).fit(
        model=Isstad(**tiny_model_args, stage1_epochs=1, stage2_epochs=1), datamodule=workers)
    assert watch.seen == [("InMemoryDataset", 0), ("InMemoryDataset", 0)]
    watch = LoaderWatch()
    engine(tmp_path / "plain", callbacks=[watch]).fit(
        model=Isstad(**tiny_model_args, stage1_epochs=1, stage2_epochs=1, train_cache_gb=0),
        datamodule=datamodule(tile_root))
    assert watch.seen == [("MVTecADDataset", 0), ("MVTecADDataset", 0)]


def test_early_stopping_keeps_lightnings_cadence(tile_root: Path, tiny_model_args: dict, tmp_path: Path) -> None:
    """A callback that reads metrics every epoch (EarlyStopping, monitored checkpoints) gets them every epoch."""
    from lightning.pytorch.callbacks import EarlyStopping

    cadence = Cadence()
    model = Isstad(**tiny_model_args, stage1_epochs=1, stage2_epochs=2)
    eng = engine(tmp_path, callbacks=[cadence, EarlyStopping(monitor="train_loss", patience=100)])
    eng.fit(model=model, datamodule=datamodule(tile_root))
    assert cadence.validated == [0, 1, 2]


class FailAt(Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        if trainer.current_epoch == 1:
            raise RuntimeError("stop here")


def test_a_failed_fit_gives_the_validation_limit_back(tile_root: Path, tiny_model_args: dict, tmp_path: Path) -> None:
    model = Isstad(**tiny_model_args, stage1_epochs=2, stage2_epochs=2)
    eng = engine(tmp_path, callbacks=[FailAt()])
    with pytest.raises(RuntimeError, match="stop here"):
        eng.fit(model=model, datamodule=datamodule(tile_root))
    assert eng.trainer.limit_val_batches == 1.0  # a later validate/test on this trainer is not silently skipped


def test_mixed_precision_with_clipping_uses_foreach_adamw(
    tile_root: Path, tiny_model_args: dict, tmp_path: Path,
) -> None:
    """Lightning refuses gradient clipping with a fused optimiser under mixed precision: ISSTAD trains with foreach."""
    model = Isstad(**tiny_model_args, stage1_epochs=1, stage2_epochs=1)
    eng = engine(tmp_path, precision="bf16-mixed", gradient_clip_val=1.0)
    eng.fit(model=model, datamodule=datamodule(tile_root))
    defaults = eng.trainer.optimizers[0].defaults
    assert defaults["foreach"] is True and not defaults["fused"]
