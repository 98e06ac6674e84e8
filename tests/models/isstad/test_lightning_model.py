"""Isstad through the real anomalib Engine: two stages in one run, frozen encoder, resume, budgets, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.callbacks.checkpoint import ModelCheckpoint
from anomalib.data import MVTecAD
from lightning.pytorch import Callback, seed_everything

from isstad_plugin import Isstad
from tests.models.isstad.engine_helpers import METRICS, EncoderWatch, datamodule, encoder_state, engine


def test_train_and_test_end_to_end_on_real_slice(tile_root: Path, tiny_model_args: dict, tmp_path: Path) -> None:
    seed_everything(0)
    model = Isstad(**tiny_model_args, stage1_epochs=1, stage2_epochs=1)
    eng = engine(tmp_path)
    eng.fit(model=model, datamodule=datamodule(tile_root))
    assert eng.trainer.current_epoch == 2  # no max_epochs given: exactly stage 1 + stage 2
    results = eng.test(model=model, datamodule=datamodule(tile_root))[0]
    assert set(results) == METRICS
    assert all(0.0 <= value <= 1.0 for value in results.values())


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


def test_mixed_precision_with_clipping_uses_foreach_adamw(
    tile_root: Path, tiny_model_args: dict, tmp_path: Path,
) -> None:
    """Lightning refuses gradient clipping with a fused optimiser under mixed precision: ISSTAD trains with foreach."""
    model = Isstad(**tiny_model_args, stage1_epochs=1, stage2_epochs=1)
    eng = engine(tmp_path, precision="bf16-mixed", gradient_clip_val=1.0)
    eng.fit(model=model, datamodule=datamodule(tile_root))
    defaults = eng.trainer.optimizers[0].defaults
    assert defaults["foreach"] is True and not defaults["fused"]
