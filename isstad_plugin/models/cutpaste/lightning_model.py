"""CutPaste as an anomalib model: 3-way self-supervised training, Gaussian density scoring at test time.

Training classifies every image, its CutPaste copy and its scar copy (and, for localisation, the same on one
random ``patch_size`` crop per image). When training ends, a Gaussian is fitted on the backbone embeddings of all
training images (no augmentation) and another on the embeddings of all their patches; the Mahalanobis
distances are the image score and the anomaly map.

Epoch budget: the trainer's ``max_epochs`` governs and the cosine schedule spans it. When the trainer was given
no epoch or step budget (Lightning's default of 1000 epochs), the model's ``max_epochs`` is used instead.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from isstad_plugin import Cutpaste
    >>> model = Cutpaste(pretrained=False, image_size=128, patch_size=32, patch_stride=8, max_epochs=10)
    >>> Engine().train(model=model, datamodule=MVTecAD(root="datasets/MVTecAD", category="bottle"))
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import Batch
from anomalib.data.transforms.utils import extract_transforms_by_type
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import Resize

from isstad_plugin.errors import input_error
from isstad_plugin.models.components.arguments import check_numbers
from isstad_plugin.models.components.base import PluginModel, describe_data, user_epoch_budget
from isstad_plugin.models.components.smoothing import gaussian_radius
from isstad_plugin.models.components.thresholds import DEFAULT_FALSE_ALARM_RATE

from .augmentation import PAPER_SIZE, CutPaste, random_crops
from .torch_model import PAPER_HEAD, CutpasteModel

logger = logging.getLogger(__name__)


class Cutpaste(PluginModel, AnomalibModule):
    """CutPaste: self-supervised learning for anomaly detection and localisation (Li et al., CVPR 2021).

    Defaults are the paper's setting (ResNet-18 from ImageNet, 256 px, 32 px patches at stride 4, SGD 0.03).

    Args:
        backbone: timm CNN name (``resnet18`` in the paper).
        pretrained: start from timm's ImageNet weights (downloaded from the Hub when training starts).
        backbone_weights: local timm weights file to start from instead (offline); overrides ``pretrained``.
        head_layers: widths of the MLP projection head (``Linear, BatchNorm, ReLU`` each).
        image_size: square side the pre-processor resizes to.
        patch_size: side of the patches of the patch-level task and of the anomaly map, in input pixels.
        patch_stride: step between the patches scored for the anomaly map.
        patch_loss_weight: weight of the patch-level 3-way loss (0: image-level training only).
        jitter: colour-jitter strength of the pasted rectangles.
        augmentation_seed: seed of the CutPaste generator; ``None`` follows the global seed.
        lr: SGD learning rate (cosine-annealed to 0 over the run).
        backbone_lr_scale: the backbone's learning rate is ``lr * backbone_lr_scale`` (paper: 1, the whole network
            is fine-tuned); 0 freezes the backbone, so only the projection head and classifier learn and the
            Gaussians are fitted on the pretrained features as they are.
        freeze_batchnorm: keep the backbone's BatchNorm layers in eval mode while training (their ImageNet
            running statistics stay; the paper fine-tunes them).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        max_epochs: epochs used when the trainer was given no budget (see the module docstring).
        score_sigma: Gaussian sigma (pixels) of the anomaly-map smoothing.
        false_alarm_rate: With no defective image in the validation split (good images only), the thresholds flag
            at most this share of its good images (and pixels); with defective images they maximise F1.
        pre_processor: Pre-processor; the default resizes only (normalisation is inside the torch model).
        post_processor: Post-processor (thresholds and normalisation learnt on the validation split).
        evaluator: Evaluator; the default computes image AUROC/F1 and pixel AUROC/F1/AUPRO.
        visualizer: Visualizer.
    """

    DEFAULT_IMAGE_SIZE = PAPER_SIZE
    CPU_CONFIG = "configs/cutpaste_cpu.yaml (minutes on 2 cores) or configs/cutpaste_tiny.yaml"
    NETWORK_OPTIONS = ("backbone", "head_layers")
    BUDGET_OPTIONS = ("max_epochs",)

    def __init__(
        self,
        backbone: str = "resnet18",
        pretrained: bool = True,
        backbone_weights: str | None = None,
        head_layers: tuple[int, ...] = PAPER_HEAD,
        image_size: int = 256,
        patch_size: int = 32,
        patch_stride: int = 4,
        patch_loss_weight: float = 1.0,
        jitter: float = 0.1,
        augmentation_seed: int | None = None,
        lr: float = 0.03,
        backbone_lr_scale: float = 1.0,
        freeze_batchnorm: bool = False,
        momentum: float = 0.9,
        weight_decay: float = 3e-5,
        max_epochs: int = 256,
        score_sigma: float = 4.0,
        false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if not 0 < patch_size <= image_size:
            raise input_error(f"patch_size must be in [1, image_size={image_size}], got {patch_size}.")
        if max_epochs < 1:
            raise input_error(f"max_epochs must be >= 1, got {max_epochs}.")
        if score_sigma > 0 and (radius := gaussian_radius(score_sigma)) >= image_size:  # the reflected border
            raise input_error(f"score_sigma={score_sigma} smooths over {radius} px, which needs image_size > {radius} "
                              f"(got {image_size}): lower score_sigma (e.g. to patch_stride) or raise image_size.")
        check_numbers(positive={"lr": lr, "score_sigma": score_sigma, "patch_stride": patch_stride},
                      non_negative={"patch_loss_weight": patch_loss_weight, "weight_decay": weight_decay,
                                    "jitter": jitter, "backbone_lr_scale": backbone_lr_scale},
                      fractions={"momentum": momentum})
        super().__init__(pre_processor=self.sized_pre_processor(pre_processor, image_size),
                         post_processor=post_processor, evaluator=evaluator, visualizer=visualizer)
        self.model = self.build_network()
        self.augmentation = CutPaste(jitter=jitter, seed=augmentation_seed)
        self._backbone_initialised = False
        self._density_stale = False  # True once training changed the weights the Gaussians were fitted with
        self._score_validation = True

    def build_network(self) -> CutpasteModel:
        """The torch model of the options in ``hparams``."""
        hp = self.hparams
        return CutpasteModel(backbone=hp.backbone, head_layers=tuple(hp.head_layers), patch_size=hp.patch_size,
                             patch_stride=hp.patch_stride, score_sigma=hp.score_sigma)

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        """The shared checks (:class:`PluginModel`); without an epoch or step budget from the user, train for the
        model's ``max_epochs``. Runs before ``configure_optimizers``, so the cosine schedule spans the budget used."""
        super().setup(stage)
        trainer = self.trainer
        if stage == "fit" and user_epoch_budget(trainer) is None:
            logger.info("No max_epochs given to the trainer: CutPaste trains for max_epochs=%d.",
                        self.hparams.max_epochs)
            trainer.fit_loop.max_epochs = self.hparams.max_epochs
        if stage == "fit":
            hp = self.hparams
            logger.info("CutPaste: %s (%s) at %d px, %d px patches every %d px, on %s; %d epochs, backbone at %sx the "
                        "head's learning rate.", hp.backbone, "ImageNet weights" if hp.pretrained else "random init",
                        hp.image_size, hp.patch_size, hp.patch_stride, describe_data(trainer.datamodule),
                        trainer.max_epochs, hp.backbone_lr_scale)

    def on_fit_start(self) -> None:
        """The shared checks; the backbone's starting weights (not when resuming); the generator's seed."""
        super().on_fit_start()
        if not self._backbone_initialised and self.trainer.ckpt_path is None:
            hp = self.hparams
            if self.model.load_backbone_weights(hp.pretrained, hp.backbone_weights):
                logger.info("CutPaste backbone %s initialised from %s.", hp.backbone,
                            hp.backbone_weights or "timm's pretrained weights")
        self._backbone_initialised = True
        self.augmentation.reseed_for_rank(self.hparams.augmentation_seed, self.global_rank, self.trainer.world_size)

    def load_plugin_state(self, checkpoint: dict[str, Any], trained_network_kept: bool) -> None:
        """A model restored from a checkpoint keeps its weights when trained further."""
        del checkpoint, trained_network_kept
        self._backbone_initialised = True

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """SGD with momentum, cosine-annealed per step to 0 over the whole run; the backbone at
        ``lr * backbone_lr_scale`` (not at all when 0)."""
        hp = self.hparams
        frozen = hp.backbone_lr_scale == 0
        self.model.backbone.requires_grad_(not frozen)
        groups = [{"params": [*self.model.head.parameters(), *self.model.classifier.parameters()], "lr": hp.lr}]
        if not frozen:
            groups.append({"params": list(self.model.backbone.parameters()), "lr": hp.lr * hp.backbone_lr_scale})
        optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _keep_backbone_statistics(self) -> None:
        """A frozen backbone runs in eval mode, and so do its BatchNorm layers under ``freeze_batchnorm``.

        Set before every training step: Lightning switches modules back to train mode after each validation
        (restoring each submodule's flag directly, so overriding ``train()`` would not hold).
        """
        if self.hparams.backbone_lr_scale == 0:
            self.model.backbone.eval()
        elif self.hparams.freeze_batchnorm:
            for module in self.model.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """3-way cross-entropy on the images and, weighted by ``patch_loss_weight``, on one crop per image."""
        del args, kwargs
        self._keep_backbone_statistics()
        images = batch.image
        augmented, labels = self.augmentation(images)
        loss = F.cross_entropy(self.model(augmented).logits, labels)
        size = len(images)
        logs = {"train_image_ce": loss}
        if self.hparams.patch_loss_weight > 0:
            scale = min(images.shape[-2:]) / PAPER_SIZE  # scars keep their size relative to the full image
            crops = random_crops(images, self.hparams.patch_size, self.augmentation.generator(images.device))
            augmented, labels = self.augmentation(crops, scale=scale)
            patch_loss = F.cross_entropy(self.model(augmented).logits, labels)
            logs["train_patch_ce"] = patch_loss
            loss = loss + self.hparams.patch_loss_weight * patch_loss
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        self.log_dict(logs, on_step=False, on_epoch=True, batch_size=size)
        return {"loss": loss}

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score the batch (anomaly maps and image scores) for thresholds and metrics.

        While fitting, only the last epoch's validation is scored: the Gaussians are fitted once, when training
        ends, so earlier scores would mean nothing (and dense patch scoring is the costliest step of the method).
        A skipped batch returns ``None``, which anomalib's post-processor ignores.
        """
        del args, kwargs
        if not self._score_validation:
            return None
        return batch.update(**self.model(batch.image)._asdict())

    # ------------------------------------------------------------------ Gaussian density estimation
    def on_train_batch_end(self, *args, **kwargs) -> None:
        """The Gaussians describe the weights they were fitted with: a training step makes them stale."""
        del args, kwargs
        self._density_stale = True

    def on_validation_start(self) -> None:
        """Fit the Gaussians before the last epoch's validation (the post-processor learns its thresholds there).

        Earlier validations while fitting are skipped (see :meth:`validation_step`); a stand-alone ``validate``
        fits the Gaussians first if they never were.
        """
        super().on_validation_start()
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        self._score_validation = not fitting or self._last_training_epoch()
        if fitting:
            if self._score_validation and self._density_stale:
                self.fit_density()
        elif not self.model.image_density.fitted:
            self.fit_density()

    def on_train_end(self) -> None:
        """Fit the Gaussians if training stopped without validating its final weights (early stop, no val split)."""
        if self._density_stale:
            logger.warning("CutPaste training ended without validating its final weights: fitting the Gaussians "
                           "now. The post-processor has not learnt thresholds on them; run a validation (e.g. "
                           "engine.validate) before testing for meaningful F1 scores and normalised outputs.")
            self.fit_density()

    def on_test_start(self) -> None:
        """Check the test files; a model that was never fitted (e.g. trained without validation) is fitted on the
        training split."""
        super().on_test_start()
        if not self.model.image_density.fitted:
            self.fit_density()

    def on_predict_start(self) -> None:
        """As :meth:`on_test_start`, when a training split is available."""
        super().on_predict_start()
        if not self.model.image_density.fitted:
            self.fit_density()

    @torch.no_grad()
    def fit_density(self, dataloader: DataLoader | None = None) -> None:
        """Fit the image- and patch-level Gaussians on every training image, pre-processed, without augmentation.

        Args:
            dataloader: batches of normal images (``batch.image`` in [0, 1]); default: the datamodule's training
                split in order, its augmentations switched off but the pre-processor's resize, applied to each image
                on its own as anomalib does for the images scored later.
        """
        dataloader = dataloader or self._plain_train_dataloader()
        if dataloader is None:
            msg = ("CutPaste's Gaussians are not fitted and no training data is attached: train the model, or pass a "
                   "datamodule with a training split, or call fit_density(dataloader).")
            raise RuntimeError(msg)
        transform = getattr(self.pre_processor, "transform", None)
        was_training = self.model.training
        self.model.eval()
        self.model.image_density.reset()
        self.model.patch_density.reset()
        for batch in dataloader:
            images = batch.image.to(self.device)
            images = transform(images) if transform is not None else images
            self.model.image_density.update(self.model.embed(images))
            patch_embeddings = self.model.patch_embeddings(images)
            self.model.patch_density.update(patch_embeddings.flatten(0, 2))
        image_fit = self.model.image_density.compute()
        patch_fit = self.model.patch_density.compute()
        logger.info("CutPaste Gaussians fitted on %d images (%d patches); Ledoit-Wolf shrinkage %.4f (image), "
                    "%.4f (patch).", self.model.image_density._count, self.model.patch_density._count,
                    float(image_fit.shrinkage), float(patch_fit.shrinkage))
        self.model.image_density.reset()
        self.model.patch_density.reset()
        self.model.train(was_training)
        self._density_stale = False

    def _plain_train_dataloader(self) -> DataLoader | None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        dataset = getattr(datamodule, "train_data", None)
        if dataset is None and datamodule is not None:
            try:
                datamodule.setup("fit")
            except Exception:  # noqa: BLE001  (a predict-only datamodule has no training split)
                return None
            dataset = getattr(datamodule, "train_data", None)
        if dataset is None:
            return None
        dataset = copy.copy(dataset)
        # Without the per-image resize, a batch of differently sized images would be collated at its largest image's
        # size and resized twice: the densities would be fitted on other features than those scored
        resizes = extract_transforms_by_type(getattr(self.pre_processor, "transform", None), Resize)
        dataset.augmentations = resizes[0] if resizes else None
        return DataLoader(dataset, batch_size=getattr(datamodule, "eval_batch_size", 32), shuffle=False,
                          num_workers=getattr(datamodule, "num_workers", 0), collate_fn=dataset.collate_fn)

    def _last_training_epoch(self) -> bool:
        trainer = self.trainer
        if trainer.max_epochs not in {None, -1} and trainer.current_epoch + 1 >= trainer.max_epochs:
            return True
        return trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps




__all__ = ["Cutpaste"]
