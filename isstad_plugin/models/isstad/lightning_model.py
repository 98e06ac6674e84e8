"""ISSTAD as an anomalib model: two training stages in one run, fused pixel scoring at test time.

Stage 1 (MAE on normal images) and stage 2 (frozen encoder; decoder and per-block pixel-status heads trained on
synthetically corrupted images) run back to back in one ``fit``; :mod:`.stages` owns the switch. Example:
``Engine().train(model=Isstad(backbone="vit_tiny", image_size=128), datamodule=MVTecAD(...))``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from isstad_plugin.data_cache import cache_train_data, release_train_cache
from isstad_plugin.models.components.base import PluginModel
from isstad_plugin.models.components.thresholds import DEFAULT_FALSE_ALARM_RATE as FALSE_ALARM_RATE

from .anomaly_map import ImageScore, MapCalibration, MapKind, calibrate_on_training_images
from .corruption import PAPER_TRANSFORMS, Fill, MaskKind, SyntheticCorruption
from .loss import FiniteLossGuard, Stage2Loss, masked_patch_mse
from .optim import stage_optimizer
from .options import NORMALIZATIONS, Normalization, ReconstructionTarget, check_options, stage1_augmentation
from .stages import StagePlan, stage_callbacks
from .torch_model import NETWORK_ARGUMENTS, IsstadModel, PositionEmbedding
from .weights import DeferredWeights

logger = logging.getLogger(__name__)


class Isstad(PluginModel, AnomalibModule):
    """ISSTAD: incremental self-supervised learning based on transformer for anomaly detection.

    Defaults are the paper's setting (ViT-L/16 at 224 px, 305 + 200 epochs); ``docs/configuration.md`` says more.

    Args:
        backbone: Encoder size: ``vit_tiny``, ``vit_small``, ``vit_base`` or ``vit_large``.
        patch_size: ViT patch size.
        position_embedding: The encoder's positions: ``sincos`` (MAE's fixed, the paper) or ``learned`` (timm's).
        image_size: Square input side in pixels; a multiple of ``patch_size``.
        decoder_embed_dim: Decoder width.
        decoder_depth: Decoder blocks; each has a pixel-status map.
        decoder_num_heads: Decoder attention heads.
        stage1_epochs: MAE epochs on normal images (0 skips stage 1, e.g. with stage-1 ``weights``).
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
        stage2_encoder_blocks: Last encoder blocks trained in stage 2 (0: frozen, the paper).
        stage2_encoder_lr_scale: Their stage-2 learning rate as a fraction of ``stage2_lr``.
        corruption_probability: Probability that a stage-2 training image is corrupted.
        max_shapes: Most shapes per corruption mask; ``None``: MVTec AD preset for the category, else 3.
        restrict_to_foreground: Draw masks inside the object's Otsu box; ``None``: preset, else on.
        remove_dark: Make the pasted copy with dark pixels replaced; ``None``: preset, else off.
        corruption_seed: Seed of the corruption generator; ``None`` follows the global seed.
        corruption_masks: ``shapes`` (the paper's), ``perlin`` (DRAEM's noise blobs) or ``mixed``.
        corruption_fills: The paper's ``color``, ``flip``, ``noise``; beyond it ``shift`` (the image moved), ``other``.
        ce_class_weights: Cross-entropy weights ``(normal, anomalous)``.
        mse_weight: Weight of the reconstruction MSE in stage 2.
        ssim_weight: Weight of ``1 - SSIM`` in stage 2.
        reconstruction_target: ``input`` (the corrupted network input, upstream) or ``clean`` (the repaired image).
        score_sigma: Gaussian sigma (pixels) of the fused scoring.
        anomaly_map_kind: ``product`` (the paper: ``G(p * minmax(r))``), ``probability`` or ``error`` (``G(r)``).
        image_score: ``paper`` (mean ``G(G(p) * G(r))``), ``max``, ``top_k``, ``extended`` (authors') or ``features``.
        image_score_top_fraction: Fraction of the score map averaged by ``top_k`` (and by ``extended``).
        image_score_map: Map kind that ``max``/``top_k`` score; ``None``: the anomaly map.
        image_score_powers: ``(a, b)``: ``extended`` is ``(1 + topmean G(p))^a * (1 + topmean G(r))^b``.
        feature_memory_size: Training patch tokens kept to score ``features`` (encoder tokens' distance to them).
        map_calibration: ``none`` (the paper) or ``per_pixel`` (standardised by the training images' maps).
        weights: A local MAE/ISSTAD/timm/Lightning file, ``timm:<tag>`` or ``timm:<tag>@<file>`` (:mod:`.weights`).
        normalization: Input scaling the weights expect: ``imagenet`` or ``symmetric`` ([-1, 1], ``net_ad.pth``).
        val_every_n_epochs: Validate every this many stage-2 epochs (0: after the last only); see :mod:`.stages`.
        checkpoint_every_n_epochs: Rewrite ``model.ckpt`` every this many epochs besides the stage ends.
        train_cache_gb: Keep decoded training images in memory up to this many GB (0: decode every epoch).
        false_alarm_rate: Share of held-out good images the thresholds flag when validation has no defective image.
        pre_processor: Pre-processor; the default resizes only (the torch model normalises).
        post_processor: Post-processor (thresholds and normalisation learnt on the validation split).
        evaluator: Evaluator; the default computes image AUROC/F1 and pixel AUROC/F1/AUPRO.
        visualizer: Visualizer.
    """

    CHECKPOINT_MARKER = ("model.patch_embed.", "use --model.weights for MAE/ISSTAD weight files")
    CPU_CONFIG = "configs/isstad_cpu.yaml (minutes on 2 cores) or configs/isstad_tiny.yaml"
    QUANTIZE_AS_TRANSFORMER = True
    NETWORK_OPTIONS = ("backbone", "image_size", "patch_size", "decoder_embed_dim", "decoder_depth",
                       "decoder_num_heads")
    BUDGET_OPTIONS = ("stage1_epochs", "stage2_epochs")

    def __init__(
        self,
        backbone: str = "vit_large",
        patch_size: int = 16,
        position_embedding: PositionEmbedding = "sincos",
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
        image_score_powers: tuple[float, float] = (1.0, 1.0),
        feature_memory_size: int = 1024,
        map_calibration: MapCalibration = "none",
        weights: str | None = None,
        normalization: Normalization = "imagenet",
        val_every_n_epochs: int = 0,
        checkpoint_every_n_epochs: int = 10,
        train_cache_gb: float = 2.0,
        false_alarm_rate: float = FALSE_ALARM_RATE,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        check_options(locals())
        super().__init__(pre_processor=self.sized_pre_processor(pre_processor, image_size),
                         post_processor=post_processor, evaluator=evaluator, visualizer=visualizer)
        self.model = self.build_network()
        self.loss, self.finite_loss = Stage2Loss(ce_class_weights, mse_weight, ssim_weight), FiniteLossGuard()
        self.stage1_augmentation = stage1_augmentation(image_size) if stage1_augment else nn.Identity()
        self.corruption = SyntheticCorruption.with_preset_options(
            max_shapes, restrict_to_foreground, remove_dark, probability=corruption_probability,
            seed=corruption_seed, masks=corruption_masks, transforms=tuple(corruption_fills))
        self.weights = DeferredWeights(weights)
        self.stage_plan = StagePlan.from_options(self.hparams)  # TwoStageSchedule fits it to the trainer
        self.enter_stage(self.stage_plan.stage_at(0))

    def build_network(self) -> IsstadModel:
        """The torch model of the options in ``hparams`` (those of :data:`.torch_model.NETWORK_ARGUMENTS` by name)."""
        hp = self.hparams
        return IsstadModel(image_size=(hp.image_size,) * 2, image_score_powers=tuple(hp.image_score_powers),
                           **{name: hp[name] for name in NETWORK_ARGUMENTS}, **NORMALIZATIONS[hp.normalization])

    def to_onnx(self, export_root: Path | str, model_file_name: str = "model",
                input_size: tuple[int, int] | None = None, **kwargs) -> Path:
        """Export at the training size unless given (the position embeddings are built for it), dynamic batch, opset
        18 unless given (the dynamo exporter's own: no lossy down-conversion step)."""
        size = tuple(input_size) if input_size is not None else (self.hparams.image_size,) * 2
        return super().to_onnx(export_root, model_file_name, size, **{"opset_version": 18, **kwargs})

    def configure_callbacks(self) -> Sequence[Callback]:
        """anomalib's callbacks and the stage machine's (:func:`.stages.stage_callbacks`)."""
        return [*super().configure_callbacks(), *stage_callbacks(self._trainer, self.hparams.checkpoint_every_n_epochs)]

    def setup(self, stage: str) -> None:
        """The shared checks; for fit, cache the training images; load ``weights`` once (a checkpoint replaces them)."""
        super().setup(stage)
        if stage == "fit" and self._trainer is not None and self.trainer.datamodule is not None:
            logger.info("ISSTAD: %s", cache_train_data(self.trainer.datamodule, self.hparams.train_cache_gb))
        self.weights.load_into(self.model)

    def teardown(self, stage: str) -> None:
        """Give the datamodule its own training subset and loader back after a fit."""
        if stage == "fit":
            release_train_cache(getattr(self._trainer, "datamodule", None))

    def on_fit_start(self) -> None:
        """The shared checks; the corruption preset of the category; a corruption stream per rank."""
        super().on_fit_start()
        logger.info(self.corruption.use_category(getattr(self.trainer.datamodule, "category", None)))
        self.corruption.reseed_for_rank(self.hparams.corruption_seed, self.global_rank, self.trainer.world_size)

    def require_network(self) -> None:
        """Before every run: the network is present (see :class:`.weights.DeferredWeights`)."""
        self.weights.require()

    def load_plugin_state(self, checkpoint: dict[str, Any], trained_network_kept: bool) -> None:  # noqa: ARG002
        """The checkpoint's network replaces ``weights``."""
        self.weights.replaced_by_checkpoint()

    def enter_stage(self, stage: int) -> None:
        """Make ``stage`` (1 or 2) current: stage 2 freezes the encoder (no autograd through it), stage 1 trains it."""
        self.model.freeze_encoder(stage == 2, self.hparams.stage2_encoder_blocks)
        self.stage = stage

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW for the current stage with its schedule (see :func:`.optim.stage_optimizer`)."""
        return stage_optimizer(self.model, self.model.encoder_parameters(), self.stage, self.stage_plan,
                               self.hparams, self.trainer, self.device)

    def training_step(self, batch: Batch, *_args, **_kwargs) -> STEP_OUTPUT:
        """Stage 1: masked reconstruction loss. Stage 2: corrupt, then CE + MSE + SSIM."""
        images, size = batch.image, len(batch.image)
        if self.stage == 1:
            loss = masked_patch_mse(*self.model(self.stage1_augmentation(images), mask_ratio=self.hparams.mask_ratio))
            what = "stage-1 masked reconstruction loss"
        else:
            corrupted, anomaly_mask = self.corruption(images)
            output = self.model(corrupted)
            target = corrupted if self.hparams.reconstruction_target == "input" else images
            terms = self.loss(output.block_logits, anomaly_mask, output.reconstruction, self.model.normalize(target),
                              self.model.denormalize(output.reconstruction), target)
            loss, what = terms.total, "stage-2 loss (CE + MSE + SSIM)"
            self.log_dict({"train_ce": terms.cross_entropy, "train_mse": terms.mse, "train_ssim": terms.ssim},
                          on_step=False, on_epoch=True, batch_size=size)
        self.finite_loss.check(loss, what, self)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        self.log("stage", float(self.stage), on_step=False, on_epoch=True, batch_size=size)
        return {"loss": loss}

    def on_validation_epoch_start(self) -> None:
        """What the scoring learns from the training images (map calibration, feature memory), before validating."""
        calibrate_on_training_images(self.model, self.pre_processor, self.trainer.datamodule, self.device)

    def validation_step(self, batch: Batch, *_args, **_kwargs) -> STEP_OUTPUT:
        """Score the batch (anomaly maps and image scores) for thresholds and metrics."""
        return batch.update(**self.model(batch.image)._asdict())
