"""ISSTAD's fused scoring: pixel-status probabilities times reconstruction error, Gaussian-smoothed.

Used by the torch model's eval ``forward`` and therefore by every export: torch ops only, no branching on
tensor values, constants (the Gaussian kernel) built once as buffers.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

from isstad_plugin.models.components.smoothing import GaussianSmoothing

logger = logging.getLogger(__name__)


MapKind = Literal["product", "probability", "error"]
ImageScore = Literal["paper", "max", "top_k", "extended", "features"]
MapCalibration = Literal["none", "per_pixel"]
MAP_KINDS = ("product", "probability", "error")
IMAGE_SCORES = ("paper", "max", "top_k", "extended", "features")
MAP_CALIBRATIONS = ("none", "per_pixel")


class AnomalyMapGenerator(nn.Module):
    """Fuse per-block pixel-status logits and the reconstruction error into a map and an image score.

    ``p = mean_blocks softmax(logits)[anomalous]``, ``r = mean_channels (reconstruction - input)^2``.
    The method's (default) map is ``G(p * minmax(r))`` (min-max per image) and its image score
    ``mean G(G(p) * G(r))``. Variants (measured in ``docs/benchmarks/isstad-recipe.md``): the map from ``G(p)``
    alone or ``G(r)`` alone; the image score as the maximum, or the mean of the top ``top_fraction`` pixels, of a
    *score map* (the anomaly map, or another kind); and ``per_pixel`` calibration of the score map: standardised
    per pixel by the mean and std of the score maps of normal training images (:meth:`calibrate`), so places where
    normal images always score high (borders, edges of an aligned object) stop outranking defects. When the score
    map is the anomaly map, the anomaly map returned is the calibrated one. The calibration is kept as buffers
    (checkpoint, export). ``extended`` is the authors' later image score (their ISSTAD_Extended code):
    ``(1 + topmean(G(p)))^a * (1 + topmean(G(r)))^b``, the means over the top ``top_fraction`` pixels, ``(a, b)`` =
    ``powers``. ``features`` scores images by the encoder's tokens instead (:mod:`.feature_memory`, set by the
    network); the score returned here is then the score map's maximum, which the network replaces.

    Args:
        sigma: Gaussian sigma in pixels (4 in the method).
        map_kind: ``product`` (the method), ``probability`` (``G(p)``) or ``error`` (``G(r)``).
        image_score: ``paper`` (the method), ``max`` or ``top_k`` (mean of the top pixels) of the score map.
        top_fraction: Fraction of the score map's pixels averaged by ``top_k`` (at least one pixel).
        calibration: ``none`` (the method) or ``per_pixel`` (see above; needs ``image_size``).
        image_size: ``(H, W)`` of the maps, for the calibration buffers.
        score_map_kind: Kind of the score map; ``None``: the anomaly map's kind.
        powers: ``(a, b)`` of the ``extended`` score.
        eps: Guards the min-max division for a constant error map.
    """

    def __init__(self, sigma: float = 4.0, map_kind: MapKind = "product", image_score: ImageScore = "paper",
                 top_fraction: float = 0.01, calibration: MapCalibration = "none",
                 image_size: tuple[int, int] | None = None, score_map_kind: MapKind | None = None,
                 powers: tuple[float, float] = (1.0, 1.0), eps: float = 1e-8) -> None:
        super().__init__()
        for name, value, allowed in (("anomaly_map_kind", map_kind, MAP_KINDS),
                                     ("image_score_map", score_map_kind or map_kind, MAP_KINDS),
                                     ("image_score", image_score, IMAGE_SCORES),
                                     ("map_calibration", calibration, MAP_CALIBRATIONS)):
            if value not in allowed:
                msg = f"{name} must be one of {allowed}, got {value!r}."
                raise ValueError(msg)
        if not 0 < top_fraction <= 1:
            msg = f"image_score_top_fraction must be in (0, 1], got {top_fraction}."
            raise ValueError(msg)
        if calibration != "none":
            if image_size is None:
                msg = "map_calibration='per_pixel' needs the map size (image_size)."
                raise ValueError(msg)
            # identity until calibrate() runs: (map - 0) / 1
            self.register_buffer("normal_mean", torch.zeros(image_size))
            self.register_buffer("normal_scale", torch.ones(image_size))
        self.blur = GaussianSmoothing(sigma)
        self.map_kind = map_kind
        self.score_map_kind = score_map_kind or map_kind
        self.image_score = image_score
        self.top_fraction = top_fraction
        self.calibration = calibration
        self.powers = tuple(float(power) for power in powers)
        self.eps = eps

    @staticmethod
    def anomalous_probability(block_logits: torch.Tensor) -> torch.Tensor:
        """``[D, B, 2, H, W]`` logits -> ``[B, H, W]`` mean anomalous-class probability over the D blocks."""
        return block_logits.softmax(dim=2)[:, :, 1].mean(dim=0)

    def forward(
        self,
        reconstruction: torch.Tensor,
        image: torch.Tensor,
        block_logits: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score a batch.

        Args:
            reconstruction: ``[B, 3, H, W]`` network reconstruction (normalised space).
            image: ``[B, 3, H, W]`` network input (same space).
            block_logits: ``[D, B, 2, H, W]`` pixel-status logits of every decoder block.

        Returns:
            ``(anomaly_map [B, 1, H, W], pred_score [B])``.
        """
        probability = self.anomalous_probability(block_logits)
        error = (reconstruction - image).pow(2).mean(dim=1)
        score_map = self._map(self.score_map_kind, probability, error)
        if self.calibration != "none":
            score_map = (score_map - self.normal_mean) / self.normal_scale
        same = self.map_kind == self.score_map_kind
        anomaly_map = score_map if same else self._map(self.map_kind, probability, error)
        if self.image_score == "paper":
            pred_score = self.blur(self.blur(probability) * self.blur(error)).mean(dim=(-2, -1))
        elif self.image_score == "extended":
            top_p, top_r = self._top_mean(self.blur(probability)), self._top_mean(self.blur(error))
            pred_score = (1 + top_p).pow(self.powers[0]) * (1 + top_r).pow(self.powers[1])
        elif self.image_score == "top_k":
            pred_score = self._top_mean(score_map)
        else:  # max (and features, whose score the network sets)
            pred_score = score_map.flatten(1).amax(dim=1)
        return anomaly_map.unsqueeze(1), pred_score

    def _top_mean(self, maps: torch.Tensor) -> torch.Tensor:
        """``[B, H, W]`` -> ``[B]``: the mean of each map's top ``top_fraction`` pixels (at least one)."""
        flat = maps.flatten(1)
        return flat.topk(max(1, round(self.top_fraction * flat.shape[1])), dim=1).values.mean(dim=1)

    def _map(self, kind: str, probability: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
        """``[B, H, W]`` map of ``kind`` from ``p`` and ``r`` (``[B, H, W]`` each)."""
        if kind == "product":
            low = error.amin(dim=(-2, -1), keepdim=True)
            high = error.amax(dim=(-2, -1), keepdim=True)
            return self.blur(probability * (error - low) / (high - low + self.eps))
        return self.blur(probability if kind == "probability" else error)

    def raw_score_map(self, reconstruction: torch.Tensor, image: torch.Tensor,
                      block_logits: torch.Tensor) -> torch.Tensor:
        """The uncalibrated score map ``[B, H, W]`` (what :meth:`calibrate` takes)."""
        error = (reconstruction - image).pow(2).mean(dim=1)
        return self._map(self.score_map_kind, self.anomalous_probability(block_logits), error)

    @torch.no_grad()
    def calibrate(self, normal_maps: torch.Tensor) -> None:
        """Set the per-pixel calibration from ``[N, H, W]`` raw score maps (:meth:`raw_score_map`) of normal images.

        The scale is the per-pixel std plus a tenth of its mean over the image, so that pixels where the normal
        maps hardly vary are not amplified without bound.
        """
        if self.calibration == "none":
            return
        if normal_maps.ndim != 3 or normal_maps.shape[1:] != self.normal_mean.shape or len(normal_maps) < 2:
            msg = f"calibration needs [N >= 2, {tuple(self.normal_mean.shape)}] maps, got {tuple(normal_maps.shape)}."
            raise ValueError(msg)
        maps = normal_maps.to(self.normal_mean)
        std = maps.std(dim=0)
        self.normal_mean.copy_(maps.mean(dim=0))
        self.normal_scale.copy_(std + 0.1 * std.mean() + self.eps)


def calibrate_on_training_images(network: nn.Module, pre_processor: nn.Module, datamodule: object,
                                 device: torch.device) -> None:
    """What the scoring learns from the datamodule's training images (normal by definition), in one pass: with
    ``map_calibration``, the score maps' per-pixel mean and std; with the ``features`` image score, the memory bank
    of the encoder's patch tokens (:mod:`.feature_memory`). Without training images both stay as they were (from
    the checkpoint, else none), with a warning. Nothing to do when the scoring learns neither."""
    generator, memory = network.anomaly_map_generator, network.feature_memory
    if generator.calibration == "none" and memory is None:
        return
    if datamodule is None or getattr(datamodule, "train_data", None) is None:
        logger.warning("ISSTAD: map_calibration=%r / image_score=%r need the datamodule's training images; none "
                       "here, so they stay as they were (from the checkpoint, else none).", generator.calibration,
                       generator.image_score)
        return
    learn_from(network, *training_maps_and_tokens(network, pre_processor, datamodule, device))


def training_maps_and_tokens(network: nn.Module, pre_processor: nn.Module, datamodule: object, device: torch.device,
                             tokens: bool | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One pass over the training images: their raw score maps ``[N, H, W]`` (None without ``map_calibration``) and
    encoder patch tokens ``[N * L, D]`` (by default only for the ``features`` image score, else None)."""
    generator = network.anomaly_map_generator
    with_tokens = network.feature_memory is not None if tokens is None else tokens
    maps, latents = [], []
    with torch.no_grad():
        for batch in datamodule.train_dataloader():
            output = network.pixel_outputs(pre_processor.transform(batch.image.to(device)))
            if generator.calibration != "none":
                maps.append(generator.raw_score_map(output.reconstruction, output.image, output.block_logits))
            if with_tokens:
                latents.append(output.latent[:, 1:].flatten(0, 1).float())
    return (torch.cat(maps) if maps else None), (torch.cat(latents) if latents else None)


def learn_from(network: nn.Module, maps: torch.Tensor | None, tokens: torch.Tensor | None) -> None:
    """Set the map calibration from training ``maps`` and the feature memory from training ``tokens``, where the
    network's scoring uses them (:func:`training_maps_and_tokens`)."""
    if maps is not None:
        network.anomaly_map_generator.calibrate(maps)
    if tokens is not None and network.feature_memory is not None:
        network.feature_memory.fit(tokens)
