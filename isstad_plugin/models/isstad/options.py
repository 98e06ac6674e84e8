"""``Isstad``'s constructor options: their checks, and the small pieces built from them.

:func:`check_options` refuses bad values when the model is built, naming the option and a value that works (the
rules shared with CutPaste are :func:`isstad_plugin.models.components.arguments.check_numbers`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from kornia.augmentation import RandomHorizontalFlip, RandomResizedCrop
from torch import nn

from isstad_plugin.errors import input_error
from isstad_plugin.models.components.arguments import check_numbers

from .torch_model import IMAGENET_MEAN, IMAGENET_STD

ReconstructionTarget = Literal["input", "clean"]
Normalization = Literal["imagenet", "symmetric"]
NORMALIZATIONS: dict[str, dict[str, tuple[float, float, float]]] = {
    "imagenet": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD},  # MAE release, timm MAE, authors' stage 1
    "symmetric": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},  # [-1, 1]: authors' stage 2 (net_ad.pth)
}

# The reference page's notes beyond each option's one-line docstring (docs/configuration.md, isstad_plugin.docs).
OPTION_DETAILS = {
    "position_embedding": "``learned`` is a parameter, trained with the encoder in stage 1 and frozen with it in "
                          "stage 2; weights from a file are resampled to the model's grid (timm's "
                          "``resample_abs_pos_embed``); a from-scratch one starts as the sin-cos values. Weights "
                          "trained with learned positions (timm's supervised, DeiT and DINO ViTs) need it.",
    "decoder_depth": "ISSTAD's stage-2 network has 12.",
    "stage2_encoder_blocks": "They train with the final norm; the encoder depth or more trains all of it.",
    "corruption_masks": "``shapes``: the paper's rectangles/ellipses/polygons; ``perlin``: Perlin-noise blobs as in "
                        "DRAEM; ``mixed``: either, half the time each.",
    "corruption_fills": "One fill is drawn per image; ``shift`` is the image itself rolled and rotated, ``other`` "
                        "another image of the batch.",
    "anomaly_map_kind": "``p`` is the pixel-status probability and ``r`` the reconstruction error; ``probability`` "
                        "is ``G(p)``.",
    "image_score": "``max``: the score map's maximum; ``top_k``: the mean of its top ``image_score_top_fraction`` "
                   "pixels.",
    "map_calibration": "Before each validation, the score maps of the training images (normal by definition) give a "
                       "per-pixel mean and std, and the score map becomes ``(map - mean) / std`` (so does the anomaly "
                       "map when it is the score map); kept in the checkpoint and the export. Costs one pass over the "
                       "training set per validation.",
    "weights": "Loaded when the first fit/validate/test/predict starts (never in ``__init__``, so construction, "
               "``load_from_checkpoint`` and export stay offline). Files: the official MAE release "
               "``{'model': ...}``, the authors' stage-1 checkpoint or stage-2 ``net_ad.pth``, a timm-style state "
               "dict, or one of our Lightning checkpoints; ``timm:<tag>`` is fetched by timm (e.g. "
               "``timm:vit_base_patch16_224.mae``), ``timm:<tag>@<file>`` read from a local file. ``None``: from "
               "scratch. A model restored from a Lightning checkpoint keeps the checkpoint's weights. See "
               "``docs/pretrained-weights.md``.",
    "normalization": "Must match the weights: ``imagenet`` for the MAE release, timm MAE and the authors' stage 1; "
                     "``symmetric`` (mean = std = 0.5) for the authors' stage-2 ``net_ad.pth``.",
    "val_every_n_epochs": "Never in stage 1. Not applied (Lightning validates every epoch, as configured) when the "
                          "trainer has another ``check_val_every_n_epoch``/``val_check_interval``, a "
                          "``max_steps``/``max_time`` budget, or an ``EarlyStopping``/monitored checkpoint callback.",
    "checkpoint_every_n_epochs": "0: stage ends only. Applies to anomalib's default checkpoint; a user's "
                                 "``ModelCheckpoint`` is kept.",
    "train_cache_gb": "At 0 anomalib decodes them every epoch, as it always does; the cache is skipped with random "
                      "train augmentations.",
}


def check_options(options: Mapping[str, Any]) -> None:
    """Refuse ``Isstad`` options (its constructor's arguments by name) that cannot train or score.

    Raises:
        ValueError: naming the first bad option, its value and what would work.
    """
    o = options
    if o["stage1_epochs"] < 0 or o["stage2_epochs"] < 1:
        msg = (f"stage1_epochs must be >= 0 and stage2_epochs >= 1, got {o['stage1_epochs']} and "
               f"{o['stage2_epochs']}.")
        raise input_error(msg)
    if not 0 < o["mask_ratio"] < 1:
        msg = f"mask_ratio must be in (0, 1), got {o['mask_ratio']}."
        raise input_error(msg)
    if o["reconstruction_target"] not in {"input", "clean"}:
        msg = f"reconstruction_target must be 'input' or 'clean', got {o['reconstruction_target']!r}."
        raise input_error(msg)
    image_size, patch_size = o["image_size"], o["patch_size"]
    if patch_size <= 0 or image_size % patch_size:
        lower = max(patch_size, image_size // max(patch_size, 1) * patch_size)
        msg = (f"image_size={image_size} is not a multiple of patch_size={patch_size}; "
               f"use e.g. image_size={lower} or {lower + patch_size}.")
        raise input_error(msg)
    betas = {f"{stage}_betas[{i}]": b for stage in ("stage1", "stage2") for i, b in enumerate(o[f"{stage}_betas"])}
    check_numbers(
        positive={name: o[name] for name in ("stage1_base_lr", "stage2_lr", "score_sigma", "image_score_top_fraction")},
        non_negative={name: o[name] for name in (
            "val_every_n_epochs", "checkpoint_every_n_epochs", "train_cache_gb", "stage2_encoder_blocks",
            "stage2_encoder_lr_scale", "stage1_weight_decay", "stage2_weight_decay", "stage2_min_lr",
            "stage1_warmup_epochs", "mse_weight", "ssim_weight")},
        fractions={"corruption_probability": o["corruption_probability"],
                   "image_score_top_fraction": o["image_score_top_fraction"], **betas},
    )
    if o["normalization"] not in NORMALIZATIONS:
        msg = f"normalization must be one of {sorted(NORMALIZATIONS)}, got {o['normalization']!r}."
        raise input_error(msg)


def stage1_augmentation(image_size: int) -> nn.Module:
    """MAE's stage-1 augmentation on the batch: random resized crop (scale 0.2-1, bicubic) and horizontal flip."""
    return nn.Sequential(
        RandomResizedCrop((image_size, image_size), scale=(0.2, 1.0), resample="bicubic", cropping_mode="resample"),
        RandomHorizontalFlip(),
    )
