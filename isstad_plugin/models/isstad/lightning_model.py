"""ISSTAD as an anomalib model: two training stages in one run, fused pixel scoring at test time.

Stage 1 (MAE on normal images) and stage 2 (frozen encoder; decoder and per-block pixel-status heads trained
on synthetically corrupted images) run back to back in one ``fit``; see :mod:`.stages`.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from isstad_plugin import Isstad
    >>> model = Isstad(backbone="vit_tiny", image_size=128, stage1_epochs=4, stage2_epochs=4)
    >>> Engine().train(model=model, datamodule=MVTecAD(root="datasets/MVTecAD", category="bottle"))
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from kornia.augmentation import RandomHorizontalFlip, RandomResizedCrop
from lightning.pytorch import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torchvision.transforms.v2 import Compose, Normalize, Resize

from isstad_plugin.data_cache import cache_train_data, release_train_cache
from isstad_plugin.data_checks import check_data_folder, check_dataset
from isstad_plugin.errors import input_error
from isstad_plugin.models.arguments import check_numbers
from isstad_plugin.models.checkpoints import (
    VERSION_KEY,
    check_compatible,
    check_writable,
    plugin_version,
    use_safe_checkpoint_io,
)
from isstad_plugin.models.evaluation import image_and_pixel_evaluator
from isstad_plugin.models.export import SafeFilesMixin
from isstad_plugin.models.resume import keep_trained_network, remember_fit
from isstad_plugin.transforms import transform_leaves

from .anomaly_map import ImageScore, MapCalibration, MapKind
from .corruption import MVTEC_AD_PRESETS, PAPER_TRANSFORMS, Fill, MaskKind, SyntheticCorruption, preset_for_category
from .loss import Stage2Loss, masked_patch_mse
from .optim import adamw, weight_decay_groups
from .stages import StageCheckpoint, StagePlan, TwoStageSchedule, warmup_cosine_factor
from .torch_model import IMAGENET_MEAN, IMAGENET_STD, IsstadModel
from .weights import WeightsNotFoundError, load_weights

logger = logging.getLogger(__name__)

ReconstructionTarget = Literal["input", "clean"]
Normalization = Literal["imagenet", "symmetric"]
NORMALIZATIONS: dict[str, dict[str, tuple[float, float, float]]] = {
    "imagenet": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD},  # MAE release, timm MAE, authors' stage 1
    "symmetric": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},  # [-1, 1]: authors' stage 2 (net_ad.pth)
}


class Isstad(SafeFilesMixin, AnomalibModule):
    """ISSTAD: incremental self-supervised learning based on transformer for anomaly detection.

    Defaults are the paper's setting (ViT-L/16 at 224 px, 305 + 200 epochs).

    Args:
        backbone: Encoder size: ``vit_tiny``, ``vit_small``, ``vit_base`` or ``vit_large``.
        patch_size: ViT patch size.
        image_size: Square input side in pixels; must be a multiple of ``patch_size``.
        decoder_embed_dim: Decoder width.
        decoder_depth: Decoder blocks; each one has a pixel-status map (12 in ISSTAD's stage-2 network).
        decoder_num_heads: Decoder attention heads.
        stage1_epochs: MAE epochs on normal images (0 skips stage 1, e.g. with stage-1 weights loaded).
        stage2_epochs: Pixel-level self-supervised epochs.
        mask_ratio: Fraction of patches hidden in stage 1.
        stage1_base_lr: Stage-1 base learning rate; the rate is ``base_lr * effective_batch / 256``.
        stage1_weight_decay: Stage-1 AdamW weight decay (not on biases and norm weights).
        stage1_betas: Stage-1 AdamW betas.
        stage1_warmup_epochs: Linear warm-up epochs before stage 1's half-cycle cosine.
        stage1_augment: Random resized crop (scale 0.2-1, bicubic) + horizontal flip in stage 1.
        stage2_lr: Stage-2 AdamW learning rate.
        stage2_weight_decay: Stage-2 AdamW weight decay (not on biases and norm weights).
        stage2_betas: Stage-2 AdamW betas.
        stage2_cosine_epochs: ``T_max`` of stage 2's per-epoch cosine annealing.
        stage2_min_lr: ``eta_min`` of stage 2's cosine annealing.
        stage2_encoder_blocks: Encoder blocks (the last ones, with the final norm) trained in stage 2; 0 freezes the
            whole encoder (the paper), the encoder depth or more trains all of it.
        stage2_encoder_lr_scale: Stage-2 learning rate of those encoder blocks, as a fraction of ``stage2_lr``.
        corruption_probability: Probability that a stage-2 training image is corrupted.
        max_shapes: Most shapes per corruption mask; ``None``: MVTec AD preset for the category, else 3.
        restrict_to_foreground: Draw masks inside the object's Otsu box; ``None``: preset, else on.
        remove_dark: Make the pasted copy from the image with dark pixels replaced; ``None``: preset, else off.
        corruption_seed: Seed of the corruption generator; ``None`` follows the global seed.
        corruption_masks: ``shapes`` (the paper's rectangles/ellipses/polygons), ``perlin`` (Perlin-noise blobs, as
            DRAEM) or ``mixed`` (either, half the time each).
        corruption_fills: Fills pasted through the mask, one drawn per image: the paper's ``color``, ``flip``,
            ``noise``; beyond it ``shift`` (the image itself rolled and rotated) and ``other`` (another image).
        ce_class_weights: Cross-entropy weights ``(normal, anomalous)``.
        mse_weight: Weight of the reconstruction MSE in stage 2.
        ssim_weight: Weight of ``1 - SSIM`` in stage 2.
        reconstruction_target: ``input`` (upstream: the corrupted network input) or ``clean`` (the repaired
            image, as the paper's wording suggests).
        score_sigma: Gaussian sigma (pixels) of the fused scoring.
        anomaly_map_kind: Pixel map: ``product`` (the paper: ``G(p * minmax(r))`` of the pixel-status probability
            ``p`` and the reconstruction error ``r``), ``probability`` (``G(p)``) or ``error`` (``G(r)``).
        image_score: ``paper`` (mean of ``G(G(p) * G(r))``), ``max`` (the score map's maximum) or ``top_k`` (the
            mean of its top ``image_score_top_fraction`` pixels).
        image_score_top_fraction: Fraction of the score map's pixels averaged by ``image_score="top_k"``.
        image_score_map: Kind of map (as ``anomaly_map_kind``) that ``max``/``top_k`` score; ``None``: the anomaly
            map itself.
        map_calibration: ``none`` (the paper) or ``per_pixel``: before each validation, the score maps of the
            training images (normal by definition) give a per-pixel mean and std, and the score map becomes
            ``(map - mean) / std`` (so does the anomaly map when it is the score map); kept in the checkpoint and
            the export. Costs one pass over the training set per validation.
        weights: Pretrained or reference weights loaded when the first fit/validate/test/predict starts (never
            in ``__init__``, so construction, ``load_from_checkpoint`` and export stay offline): a local file
            (official MAE release ``{'model': ...}``, the authors' stage-1 checkpoint or stage-2 ``net_ad.pth``,
            a timm-style state dict, or one of our Lightning checkpoints), ``timm:<tag>`` (e.g.
            ``timm:vit_base_patch16_224.mae``, fetched by timm) or ``timm:<tag>@<file>`` (the same from a local
            file). ``None``: start from scratch. A model restored from a Lightning checkpoint keeps the
            checkpoint's weights. See :mod:`.weights` and ``docs/pretrained-weights.md``.
        normalization: Input scaling inside the network; must match the weights: ``imagenet`` (ImageNet
            mean/std: MAE release, timm MAE, the authors' stage 1) or ``symmetric`` (mean = std = 0.5, i.e.
            [-1, 1]: the authors' stage-2 ``net_ad.pth``).
        val_every_n_epochs: Validation (thresholds, metrics) every this many stage-2 epochs; 0: only after the
            last epoch. Never in stage 1. Not applied (Lightning validates every epoch, as configured) when the
            trainer has another ``check_val_every_n_epoch``/``val_check_interval``, a ``max_steps``/``max_time``
            budget, or an ``EarlyStopping``/monitored checkpoint callback.
        checkpoint_every_n_epochs: Besides the end of each stage, rewrite ``model.ckpt`` every this many epochs
            (0: stage ends only). Applies to anomalib's default checkpoint; a user's ``ModelCheckpoint`` is kept.
        train_cache_gb: Decode and resize the training images once and keep them in memory when they fit in this
            many GB (0: decode them every epoch, as anomalib does). Skipped with random train augmentations.
        pre_processor: Pre-processor; the default resizes only (normalisation is inside the torch model).
        post_processor: Post-processor (thresholds and normalisation learnt on the validation split).
        evaluator: Evaluator; the default computes image AUROC/F1 and pixel AUROC/F1/AUPRO.
        visualizer: Visualizer.
    """

    def __init__(
        self,
        backbone: str = "vit_large",
        patch_size: int = 16,
        image_size: int = 224,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 12,
        decoder_num_heads: int = 16,
        stage1_epochs: int = 305,
        stage2_epochs: int = 200,
        mask_ratio: float = 0.75,
        stage1_base_lr: float = 1e-3,
        stage1_weight_decay: float = 0.05,
        stage1_betas: tuple[float, float] = (0.9, 0.95),
        stage1_warmup_epochs: float = 40,
        stage1_augment: bool = True,
        stage2_lr: float = 1e-3,
        stage2_weight_decay: float = 0.05,
        stage2_betas: tuple[float, float] = (0.9, 0.95),
        stage2_cosine_epochs: int = 30,
        stage2_min_lr: float = 1e-6,
        stage2_encoder_blocks: int = 0,
        stage2_encoder_lr_scale: float = 0.1,
        corruption_probability: float = 2 / 3,
        max_shapes: int | None = None,
        restrict_to_foreground: bool | None = None,
        remove_dark: bool | None = None,
        corruption_seed: int | None = None,
        corruption_masks: MaskKind = "shapes",
        corruption_fills: Sequence[Fill] = PAPER_TRANSFORMS,
        ce_class_weights: tuple[float, float] = (3.0, 1.0),
        mse_weight: float = 0.5,
        ssim_weight: float = 0.1,
        reconstruction_target: ReconstructionTarget = "input",
        score_sigma: float = 4.0,
        anomaly_map_kind: MapKind = "product",
        image_score: ImageScore = "paper",
        image_score_top_fraction: float = 0.01,
        image_score_map: MapKind | None = None,
        map_calibration: MapCalibration = "none",
        weights: str | None = None,
        normalization: Normalization = "imagenet",
        val_every_n_epochs: int = 0,
        checkpoint_every_n_epochs: int = 10,
        train_cache_gb: float = 2.0,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        _check_arguments(stage1_epochs, stage2_epochs, mask_ratio, reconstruction_target, image_size, patch_size)
        check_numbers(
            positive={"stage1_base_lr": stage1_base_lr, "stage2_lr": stage2_lr, "score_sigma": score_sigma,
                      "image_score_top_fraction": image_score_top_fraction},
            non_negative={"val_every_n_epochs": val_every_n_epochs,
                          "checkpoint_every_n_epochs": checkpoint_every_n_epochs, "train_cache_gb": train_cache_gb,
                          "stage2_encoder_blocks": stage2_encoder_blocks,
                          "stage2_encoder_lr_scale": stage2_encoder_lr_scale, "stage1_weight_decay": stage1_weight_decay,
                          "stage2_weight_decay": stage2_weight_decay, "stage2_min_lr": stage2_min_lr,
                          "stage1_warmup_epochs": stage1_warmup_epochs, "mse_weight": mse_weight,
                          "ssim_weight": ssim_weight},
            fractions={"corruption_probability": corruption_probability, "image_score_top_fraction":
                       image_score_top_fraction, **{f"stage1_betas[{i}]": b for i, b in enumerate(stage1_betas)},
                       **{f"stage2_betas[{i}]": b for i, b in enumerate(stage2_betas)}},
        )
        if normalization not in NORMALIZATIONS:
            msg = f"normalization must be one of {sorted(NORMALIZATIONS)}, got {normalization!r}."
            raise input_error(msg)
        if pre_processor is True:
            pre_processor = self.configure_pre_processor((image_size, image_size))
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model = IsstadModel(
            backbone=backbone,
            image_size=(image_size, image_size),
            patch_size=patch_size,
            decoder_embed_dim=decoder_embed_dim,
            decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads,
            score_sigma=score_sigma,
            anomaly_map_kind=anomaly_map_kind,
            image_score=image_score,
            image_score_top_fraction=image_score_top_fraction,
            map_calibration=map_calibration,
            image_score_map=image_score_map,
            **NORMALIZATIONS[normalization],
        )
        self.loss = Stage2Loss(ce_class_weights, mse_weight, ssim_weight)
        self.stage1_augmentation = nn.Sequential(
            RandomResizedCrop((image_size, image_size), scale=(0.2, 1.0), resample="bicubic",
                              cropping_mode="resample"),
            RandomHorizontalFlip(),
        )
        self.corruption = SyntheticCorruption(
            probability=corruption_probability,
            max_shapes=max_shapes or 3,
            restrict_to_foreground=True if restrict_to_foreground is None else restrict_to_foreground,
            remove_dark=bool(remove_dark),
            seed=corruption_seed,
            masks=corruption_masks,
            transforms=tuple(corruption_fills),
        )
        self.stage_plan = StagePlan(stage1_epochs, stage2_epochs, stage1_warmup_epochs, stage2_cosine_epochs)
        self.stage = 0
        self.enter_stage(self.stage_plan.stage_at(0))
        # "pending" -> "loaded" (from `weights`) | "checkpoint" (a Lightning checkpoint filled the network)
        # | "missing" (file absent at setup: only a ckpt_path restore may still provide the network).
        self._weights_status = "pending"

    # ------------------------------------------------------------------ anomalib contract
    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize only: corruption works on [0, 1] images and the torch model normalises itself."""
        return PreProcessor(transform=Compose([Resize(image_size or (224, 224), antialias=True)]))

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Image AUROC and F1; pixel AUROC, F1 and AUPRO."""
        return image_and_pixel_evaluator()

    def to_onnx(self, export_root: Path | str, model_file_name: str = "model",
                input_size: tuple[int, int] | None = None, **kwargs) -> Path:
        """Export with a fixed spatial size (the training size unless given) and a dynamic batch, written
        atomically (:class:`~isstad_plugin.models.export.SafeFilesMixin`).

        The network's position embeddings are built for ``image_size``; the graph holds the resize to it.
        """
        size = tuple(input_size) if input_size is not None else (self.hparams.image_size,) * 2
        kwargs.setdefault("opset_version", 18)  # the dynamo exporter's own opset: no lossy down-conversion step
        return super().to_onnx(export_root, model_file_name, size, **kwargs)

    @property
    def learning_type(self) -> LearningType:
        """ISSTAD learns from normal images only."""
        return LearningType.ONE_CLASS

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation (stage-2 heads are untrained then); the epoch budget stays the user's."""
        return {"num_sanity_val_steps": 0}

    def configure_callbacks(self) -> Sequence[Callback]:
        """anomalib's component callbacks, the two-stage schedule, and per-stage checkpoints in place of the
        Engine's every-epoch default (a user's own checkpoint callback is kept); checks the data first."""
        self._check_datamodule()
        callbacks = [*super().configure_callbacks(), TwoStageSchedule()]
        default = StageCheckpoint.replaces(self.trainer) if self._trainer is not None else None
        if default is not None:  # Lightning replaces the trainer's checkpoint callback by this one
            callbacks.append(StageCheckpoint(default.dirpath, self.hparams.checkpoint_every_n_epochs))
        return callbacks

    # ------------------------------------------------------------------ weights
    def teardown(self, stage: str) -> None:
        """Give the datamodule its own training subset and loader back after a fit."""
        if stage == "fit" and self._trainer is not None and self.trainer.datamodule is not None:
            release_train_cache(self.trainer.datamodule)

    def setup(self, stage: str) -> None:
        """Checkpoints are written atomically and read with clear errors (:mod:`..checkpoints`). For fit: check
        that the output folder is writable, check the training files and cache them (see
        :mod:`isstad_plugin.data_cache`). Load ``weights`` into the network once, when the first
        fit/validate/test/predict starts.

        The cache is made here, after the datamodule's own setup and before Lightning first builds the train
        loader (stage 1's schedule asks for the number of steps while the optimisers are configured).
        Later calls on the same object, and a model restored by ``load_from_checkpoint``, do not load ``weights``
        again. Lightning restores a ``ckpt_path`` only after ``setup``: a file present then is loaded and
        overwritten by the checkpoint; a missing file is tolerated until the restore, and the run fails in its
        first ``on_*_start`` hook if no checkpoint provided the network.
        """
        if self._trainer is not None:
            use_safe_checkpoint_io(self.trainer)
        if stage == "fit" and self._trainer is not None:
            checkpoint = self.trainer.checkpoint_callback
            check_writable(getattr(checkpoint, "dirpath", None) or self.trainer.default_root_dir)
        if stage == "fit" and self._trainer is not None and self.trainer.datamodule is not None:
            self._check_data("train", "val")
            logger.info("ISSTAD: %s", cache_train_data(self.trainer.datamodule, self.hparams.train_cache_gb))
        if self.hparams.weights is None or self._weights_status in {"loaded", "checkpoint"}:
            return
        try:
            load_weights(self.model, self.hparams.weights)
        except WeightsNotFoundError as error:
            self._weights_status = "missing"
            self._weights_error = error
            logger.info("ISSTAD: %s Continuing only if a checkpoint (ckpt_path) provides the network.", error)
            return
        self._weights_status = "loaded"

    def _require_network(self) -> None:
        """Fail when ``weights`` could not be read and no checkpoint was restored instead."""
        if self._weights_status == "missing":
            msg = f"{self._weights_error} No Lightning checkpoint was restored in its place."
            raise FileNotFoundError(msg) from self._weights_error

    def on_validation_start(self) -> None:
        """Check that the network has its weights (see :meth:`setup`)."""
        self._require_network()

    def on_test_start(self) -> None:
        """Check that the network has its weights (see :meth:`setup`) and the test files."""
        self._require_network()
        self._check_data("test")

    def on_predict_start(self) -> None:
        """Check that the network has its weights (see :meth:`setup`)."""
        self._require_network()

    # ------------------------------------------------------------------ stages
    def enter_stage(self, stage: int) -> None:
        """Make ``stage`` current: stage 2 freezes the encoder (no autograd through it), stage 1 trains it."""
        if stage not in {1, 2}:
            msg = f"ISSTAD has stages 1 and 2, got {stage}."
            raise ValueError(msg)
        self.model.freeze_encoder(stage == 2, self.hparams.stage2_encoder_blocks)
        self.stage = stage

    def on_fit_start(self) -> None:
        """Check the weights; pick the corruption preset for the datamodule's category and seed per rank."""
        self._require_network()
        remember_fit(self, finished=False)
        category = getattr(self.trainer.datamodule, "category", None)
        preset = preset_for_category(category)
        hp = self.hparams
        self.corruption.max_shapes = hp.max_shapes if hp.max_shapes is not None else preset.max_shapes
        self.corruption.restrict_to_foreground = (
            hp.restrict_to_foreground if hp.restrict_to_foreground is not None else preset.restrict_to_foreground
        )
        self.corruption.remove_dark = hp.remove_dark if hp.remove_dark is not None else preset.remove_dark
        if hp.corruption_seed is not None:
            self.corruption.reseed(hp.corruption_seed + self.global_rank)
        elif self.trainer.world_size > 1:  # same global seed on every rank: give each rank its own stream
            self.corruption.reseed(torch.initial_seed() + self.global_rank)
        source = f"MVTec AD preset for {category!r}" if category in MVTEC_AD_PRESETS else "defaults"
        logger.info(
            "ISSTAD corruption (%s, config overrides applied): max_shapes=%d, restrict_to_foreground=%s, "
            "remove_dark=%s, probability=%.3f.",
            source,
            self.corruption.max_shapes,
            self.corruption.restrict_to_foreground,
            self.corruption.remove_dark,
            self.corruption.probability,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the current stage and the stage plan."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[VERSION_KEY] = plugin_version()
        checkpoint["isstad_stage"] = self.stage
        checkpoint["isstad_stage_plan"] = self.stage_plan.to_dict()

    def on_fit_end(self) -> None:
        """Remember that the fit finished (see :mod:`isstad_plugin.models.resume`)."""
        remember_fit(self, finished=True)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume in the recorded stage and with the recorded plan; the checkpoint's network replaces ``weights``.

        A test right after a resumed fit, given the checkpoint it resumed from (anomalib's ``train``), keeps the
        trained network instead (see :mod:`isstad_plugin.models.resume`).
        """
        _check_is_isstad_checkpoint(checkpoint)
        check_compatible(self, checkpoint, NETWORK_OPTIONS,
                         path=self._trainer.ckpt_path if self._trainer is not None else None)
        if keep_trained_network(self, checkpoint):
            checkpoint["isstad_stage"] = self.stage
            checkpoint["isstad_stage_plan"] = self.stage_plan.to_dict()
        super().on_load_checkpoint(checkpoint)
        if self.hparams.weights is not None and self._weights_status != "checkpoint":
            logger.info("ISSTAD: the Lightning checkpoint provides the network; it replaces weights=%r.",
                        self.hparams.weights)
        self._weights_status = "checkpoint"
        if "isstad_stage_plan" in checkpoint:
            self.stage_plan = StagePlan(**checkpoint["isstad_stage_plan"])
            if self._trainer is not None and self.trainer.max_epochs not in {None, -1}:
                self.trainer.fit_loop.max_epochs = min(self.trainer.max_epochs, self.stage_plan.total_epochs)
        if "isstad_stage" in checkpoint:
            self.enter_stage(checkpoint["isstad_stage"])

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW for the current stage with its schedule (stage 1 per step, stage 2 per epoch)."""
        hp = self.hparams
        if self.stage == 1:
            steps_per_epoch = self._steps_per_epoch()
            lr = hp.stage1_base_lr * self._effective_batch_size() / 256
            groups = weight_decay_groups(self.model, hp.stage1_weight_decay, lambda _: True)
            optimizer = adamw(groups, self.device, self._fused_allowed(), lr=lr, betas=tuple(hp.stage1_betas))
            warmup = self.stage_plan.stage1_warmup_epochs * steps_per_epoch
            total = self.stage_plan.stage1_epochs * steps_per_epoch
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                lambda step: warmup_cosine_factor(step, warmup, total),
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        encoder = {id(p) for p in self.model.encoder_parameters()}
        groups = [  # frozen parameters are skipped; trained encoder blocks get their own learning rate
            *weight_decay_groups(self.model, hp.stage2_weight_decay, lambda p: id(p) not in encoder),
            *weight_decay_groups(self.model, hp.stage2_weight_decay, lambda p: id(p) in encoder,
                                 lr=hp.stage2_lr * hp.stage2_encoder_lr_scale),
        ]
        optimizer = adamw(groups, self.device, self._fused_allowed(), lr=hp.stage2_lr, betas=tuple(hp.stage2_betas))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer,
            T_max=self.stage_plan.stage2_cosine_epochs,
            eta_min=hp.stage2_min_lr,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def _fused_allowed(self) -> bool:
        """Lightning refuses gradient clipping with a fused optimiser under mixed precision (its AMP scaler)."""
        trainer = self.trainer
        return not (isinstance(trainer.precision_plugin, MixedPrecision) and trainer.gradient_clip_val)

    def _steps_per_epoch(self) -> int:
        trainer = self.trainer
        if not trainer.max_epochs or trainer.max_epochs < 1:
            return 1
        return max(1, trainer.estimated_stepping_batches // trainer.max_epochs)

    def _effective_batch_size(self) -> int:
        batch_size = getattr(self.trainer.datamodule, "train_batch_size", None) or 32
        return batch_size * self.trainer.accumulate_grad_batches * self.trainer.world_size

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Stage 1: masked reconstruction loss. Stage 2: corrupt, then CE + MSE + SSIM."""
        del args, kwargs
        images = batch.image
        if self.stage == 1:
            if self.hparams.stage1_augment:
                images = self.stage1_augmentation(images)
            output = self.model(images, mask_ratio=self.hparams.mask_ratio)
            loss = masked_patch_mse(*output)
            self._check_finite(loss, "stage-1 masked reconstruction loss")
            self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(images))
            self.log("stage", 1.0, on_step=False, on_epoch=True, batch_size=len(images))
            return {"loss": loss}

        corrupted, anomaly_mask = self.corruption(images)
        output = self.model(corrupted)
        target_01 = corrupted if self.hparams.reconstruction_target == "input" else images
        terms = self.loss(
            output.block_logits,
            anomaly_mask,
            output.reconstruction,
            self.model.normalize(target_01),
            self.model.denormalize(output.reconstruction),
            target_01,
        )
        self._check_finite(terms.total, "stage-2 loss (CE + MSE + SSIM)")
        size = len(images)
        self.log("train_loss", terms.total, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        self.log_dict(
            {"train_ce": terms.cross_entropy, "train_mse": terms.mse, "train_ssim": terms.ssim},
            on_step=False,
            on_epoch=True,
            batch_size=size,
        )
        self.log("stage", 2.0, on_step=False, on_epoch=True, batch_size=size)
        return {"loss": terms.total}

    def on_validation_epoch_start(self) -> None:
        """With ``map_calibration``, calibrate the maps on the training images before scoring the validation set."""
        calibration = self.model.anomaly_map_generator.calibration
        if calibration == "none":
            return
        datamodule = self.trainer.datamodule
        if datamodule is None or getattr(datamodule, "train_data", None) is None:
            logger.warning("ISSTAD: map_calibration=%r needs the datamodule's training images; none here, so the "
                           "calibration stays as it was (from the checkpoint, else none).", calibration)
            return
        maps = []
        for batch in datamodule.train_dataloader():
            images = self.pre_processor.transform(batch.image.to(self.device))
            maps.append(self.model.raw_score_maps(images))
        self.model.anomaly_map_generator.calibrate(torch.cat(maps))

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score the batch (anomaly maps and image scores) for thresholds and metrics."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    # ------------------------------------------------------------------ checks
    def _check_finite(self, loss: torch.Tensor, what: str) -> None:
        """Stop training on a NaN or infinite loss, naming the step and the likely causes."""
        if not torch.isfinite(loss):
            msg = (
                f"ISSTAD: the {what} is {loss.item()} at global step {self.global_step} (epoch "
                f"{self.current_epoch}, stage {self.stage}). Likely causes: a learning rate too high for this "
                "batch size (lower stage1_base_lr / stage2_lr), images with NaN/inf values, or fp16 overflow "
                "(use bf16-mixed or 32-true precision)."
            )
            raise FloatingPointError(msg)

    def _check_data(self, *splits: str) -> None:
        """Check every file of the named splits once per run, before the first batch (see data_checks)."""
        datamodule = self.trainer.datamodule
        for split in splits:
            dataset = getattr(datamodule, f"{split}_data", None)
            if dataset is not None and self.global_rank == 0:
                check_dataset(dataset, split)

    def on_train_start(self) -> None:
        """Corruption needs [0, 1] images: refuse a pre-processor that normalises."""
        transform = getattr(self.pre_processor, "transform", None)
        if transform is not None and any(isinstance(t, Normalize) for t in transform_leaves(transform)):
            msg = (
                "Isstad normalises inside its torch model (corruption works on [0, 1] images); "
                "remove Normalize from the pre_processor transform."
            )
            raise ValueError(msg)

    def _check_datamodule(self) -> None:
        """Fail before anomalib reads or tries to download the data when its folder is unusable."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        check_data_folder(datamodule)


# hyper-parameters that shape the network's tensors: a checkpoint loads only into a model built with its values
NETWORK_OPTIONS = ("backbone", "image_size", "patch_size", "decoder_embed_dim", "decoder_depth", "decoder_num_heads")


def _check_is_isstad_checkpoint(checkpoint: dict[str, Any]) -> None:
    """Refuse a Lightning checkpoint written by another model, saying which one it looks like."""
    state = checkpoint.get("state_dict", {})
    if any(key.startswith("model.patch_embed.") for key in state):
        return
    prefixes = sorted({".".join(key.split(".")[:2]) for key in state})[:6]
    hyper = sorted(checkpoint.get("hyper_parameters", {}))[:8]
    msg = (
        "This checkpoint was not written by Isstad: its network has no ISSTAD encoder (state keys start with "
        f"{prefixes}; hyper-parameters {hyper}). Pass the checkpoint to the model that trained it, or use "
        "--model.weights for MAE/ISSTAD weight files."
    )
    raise ValueError(msg)




def _check_arguments(
    stage1_epochs: int,
    stage2_epochs: int,
    mask_ratio: float,
    reconstruction_target: str,
    image_size: int,
    patch_size: int,
) -> None:
    if stage1_epochs < 0 or stage2_epochs < 1:
        msg = f"stage1_epochs must be >= 0 and stage2_epochs >= 1, got {stage1_epochs} and {stage2_epochs}."
        raise input_error(msg)
    if not 0 < mask_ratio < 1:
        msg = f"mask_ratio must be in (0, 1), got {mask_ratio}."
        raise input_error(msg)
    if reconstruction_target not in {"input", "clean"}:
        msg = f"reconstruction_target must be 'input' or 'clean', got {reconstruction_target!r}."
        raise input_error(msg)
    if patch_size <= 0 or image_size % patch_size:
        lower = max(patch_size, image_size // max(patch_size, 1) * patch_size)
        msg = (
            f"image_size={image_size} is not a multiple of patch_size={patch_size}; "
            f"use e.g. image_size={lower} or {lower + patch_size}."
        )
        raise input_error(msg)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Isstad"]
