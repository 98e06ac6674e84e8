"""ISSTAD network: an MAE ViT with a reconstruction head and per-decoder-block pixel-status heads.

Parameter names follow the official MAE release (facebookresearch/mae ``models_mae.py``) plus ISSTAD's
``mask_pred``, so official and authors' checkpoints load by name. Input images are ``[B, 3, H, W]`` in
``[0, 1]``; normalisation happens here, so it is part of every exported graph.

Example:
    >>> model = IsstadModel("vit_tiny", image_size=(64, 64), decoder_embed_dim=64, decoder_depth=2,
    ...                     decoder_num_heads=4).eval()
    >>> out = model(torch.rand(2, 3, 64, 64))
    >>> out.anomaly_map.shape, out.pred_score.shape
    (torch.Size([2, 1, 64, 64]), torch.Size([2]))
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Literal, NamedTuple

import torch
from anomalib.data import InferenceBatch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from isstad_plugin.errors import input_error

from .anomaly_map import AnomalyMapGenerator, ImageScore, MapCalibration, MapKind
from .feature_memory import PatchFeatureMemory

# Isstad's options that IsstadModel takes under the same name (image_size and the normalisation are translated)
NETWORK_ARGUMENTS = ("backbone", "patch_size", "position_embedding", "decoder_embed_dim", "decoder_depth",
                     "decoder_num_heads", "score_sigma", "anomaly_map_kind", "image_score", "image_score_top_fraction",
                     "map_calibration", "image_score_map", "feature_memory_size")
IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)
PositionEmbedding = Literal["sincos", "learned"]


@dataclass(frozen=True)
class VitVariant:
    """Encoder size of a plain ViT."""

    embed_dim: int
    depth: int
    num_heads: int


VIT_VARIANTS: dict[str, VitVariant] = {
    "vit_tiny": VitVariant(192, 12, 3),
    "vit_small": VitVariant(384, 12, 6),
    "vit_base": VitVariant(768, 12, 12),
    "vit_large": VitVariant(1024, 24, 16),
}


def sincos_position_embedding(dim: int, grid_size: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding exactly as MAE's ``get_2d_sincos_pos_embed``.

    The first half of the channels encodes the column (x) index, the second half the row (y) index; each
    half is ``[sin(pos * omega), cos(pos * omega)]`` with ``omega = 10000 ** -(k / (dim / 4))``.

    Returns:
        ``[1, (1 if cls_token) + gh * gw, dim]`` float32, tokens in row-major order, cls slot all zeros.
    """
    if dim % 4:
        msg = f"Position-embedding width must be a multiple of 4, got {dim}."
        raise ValueError(msg)
    grid_h, grid_w = grid_size
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64),
        torch.arange(grid_w, dtype=torch.float64),
        indexing="ij",
    )
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    embedding = torch.cat([encode(cols), encode(rows)], dim=1)
    if cls_token:
        embedding = torch.cat([torch.zeros(1, dim, dtype=torch.float64), embedding], dim=0)
    return embedding.float().unsqueeze(0)


class MaskedReconstruction(NamedTuple):
    """Stage-1 training output: predicted and target patches ``[B, L, p*p*3]``, mask ``[B, L]`` (1 = hidden)."""

    prediction: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor


class PixelOutput(NamedTuple):
    """Full-token output: input and reconstruction ``[B, 3, H, W]`` (normalised), logits ``[D, B, 2, H, W]``, and
    the encoder's tokens ``[B, 1 + L, E]`` (cls first)."""

    image: torch.Tensor
    reconstruction: torch.Tensor
    block_logits: torch.Tensor
    latent: torch.Tensor


class IsstadModel(nn.Module):
    """MAE encoder/decoder with ISSTAD's heads.

    Args:
        backbone: Encoder size, one of :data:`VIT_VARIANTS`.
        image_size: ``(H, W)``, both multiples of ``patch_size``.
        patch_size: ViT patch size.
        position_embedding: The encoder's ``pos_embed`` ``[1, 1 + L, E]``: ``sincos`` (MAE's fixed 2-D sin-cos, a
            buffer recomputed for the grid) or ``learned`` (a parameter, as in timm's supervised and DINO ViTs:
            trained with the encoder, loaded from a file resampled to the grid; starts as the sin-cos values).
            The decoder's stays sin-cos either way (MAE's).
        decoder_embed_dim: Decoder width.
        decoder_depth: Number of decoder blocks (each gets a pixel-status map).
        decoder_num_heads: Decoder attention heads.
        mlp_ratio: MLP hidden width / token width.
        mean: Per-channel mean used to normalise ``[0, 1]`` inputs.
        std: Per-channel std used to normalise ``[0, 1]`` inputs.
        score_sigma: Gaussian sigma (pixels) of the fused scoring.
        anomaly_map_kind: Map fused by the scoring (see :class:`.anomaly_map.AnomalyMapGenerator`).
        image_score: Image score of the scoring (see :class:`.anomaly_map.AnomalyMapGenerator`).
        image_score_top_fraction: Fraction of the map's pixels averaged by ``image_score="top_k"``.
        map_calibration: ``none`` or ``per_pixel`` (see :class:`.anomaly_map.AnomalyMapGenerator`).
        image_score_map: Kind of map the image score is taken from; ``None``: the anomaly map.
        image_score_powers: ``(a, b)`` of ``image_score="extended"``.
        feature_memory_size: Training patch tokens kept for ``image_score="features"`` (:mod:`.feature_memory`).
    """

    def __init__(
        self,
        backbone: str = "vit_large",
        image_size: tuple[int, int] = (224, 224),
        patch_size: int = 16,
        position_embedding: PositionEmbedding = "sincos",
        decoder_embed_dim: int = 512,
        decoder_depth: int = 12,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        score_sigma: float = 4.0,
        anomaly_map_kind: MapKind = "product",
        image_score: ImageScore = "paper",
        image_score_top_fraction: float = 0.01,
        map_calibration: MapCalibration = "none",
        image_score_map: MapKind | None = None,
        image_score_powers: tuple[float, float] = (1.0, 1.0),
        feature_memory_size: int = 1024,
    ) -> None:
        super().__init__()
        if backbone not in VIT_VARIANTS:
            msg = f"Unknown backbone {backbone!r}: --model.backbone must be one of {sorted(VIT_VARIANTS)}."
            raise input_error(msg)
        height, width = image_size
        if patch_size <= 0 or height % patch_size or width % patch_size:
            msg = (
                f"image_size {tuple(image_size)} must be a multiple of patch_size {patch_size} on both sides; "
                f"use e.g. {_nearest_multiple(height, patch_size)}x{_nearest_multiple(width, patch_size)}."
            )
            raise input_error(msg)
        if position_embedding not in {"sincos", "learned"}:
            msg = f"position_embedding must be 'sincos' or 'learned', got {position_embedding!r}."
            raise input_error(msg)
        variant = VIT_VARIANTS[backbone]
        if decoder_embed_dim % decoder_num_heads:
            msg = f"decoder_embed_dim {decoder_embed_dim} must be divisible by decoder_num_heads {decoder_num_heads}."
            raise input_error(msg)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_size = patch_size
        self.grid_size = (height // patch_size, width // patch_size)

        # encoder
        self.patch_embed = PatchEmbed(img_size=(height, width), patch_size=patch_size, in_chans=3,
                                      embed_dim=variant.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, variant.embed_dim))
        self.position_embedding = position_embedding
        encoder_positions = sincos_position_embedding(variant.embed_dim, self.grid_size)
        if position_embedding == "learned":
            self.pos_embed = nn.Parameter(encoder_positions)
        else:
            self.register_buffer("pos_embed", encoder_positions)
        self.blocks = nn.ModuleList(
            Block(variant.embed_dim, variant.num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(variant.depth)
        )
        self.norm = norm_layer(variant.embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(variant.embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_position_embedding(decoder_embed_dim, self.grid_size))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * 3)
        self.mask_pred = nn.Linear(decoder_embed_dim, patch_size**2 * 2)

        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if min(height, width) <= int(4.0 * score_sigma + 0.5):
            msg = f"image_size {tuple(image_size)} is too small for score_sigma {score_sigma} (kernel radius)."
            raise ValueError(msg)
        self.anomaly_map_generator = AnomalyMapGenerator(score_sigma, anomaly_map_kind, image_score,
                                                         image_score_top_fraction, map_calibration, (height, width),
                                                         image_score_map, image_score_powers)
        # the encoder's own image score (only with image_score="features": other checkpoints keep their keys)
        self.feature_memory = (PatchFeatureMemory(feature_memory_size, variant.embed_dim)
                               if image_score == "features" else None)
        self.trainable_encoder_blocks = variant.depth  # blocks (from the last) that run with autograd
        self.initialize_weights()

    # ------------------------------------------------------------------ set-up
    def initialize_weights(self) -> None:
        """MAE initialisation: xavier-uniform linears and patch projection, N(0, 0.02) tokens."""
        weight = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def encoder_modules(self) -> list[nn.Module]:
        """Modules frozen in stage 2 (the cls token lives on the model itself)."""
        return [self.patch_embed, self.blocks, self.norm]

    def encoder_parameters(self) -> list[nn.Parameter]:
        """All encoder parameters: cls token, learned position embedding (if any), patch embedding, blocks, norm."""
        params = [self.cls_token, *([self.pos_embed] if isinstance(self.pos_embed, nn.Parameter) else [])]
        for module in self.encoder_modules():
            params.extend(module.parameters())
        return params

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW does not decay (timm's convention): a learned position embedding."""
        return {"pos_embed"} if self.position_embedding == "learned" else set()

    def decoder_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not part of the encoder (decoder and both heads)."""
        encoder_ids = {id(p) for p in self.encoder_parameters()}
        return [p for p in self.parameters() if id(p) not in encoder_ids]

    def freeze_encoder(self, frozen: bool = True, trainable_blocks: int = 0) -> None:
        """Freeze (stage 2) or unfreeze (stage 1) the encoder; frozen parts run without autograd.

        Args:
            frozen: Freeze the encoder (the paper's stage 2).
            trainable_blocks: With ``frozen``, keep the last this many blocks and the final norm trainable
                (0: all frozen, the paper); the block count or more keeps the whole encoder trainable.

        Freezing also drops the gradients of stage 1's last step: no optimiser holds the frozen parameters any
        more, so nothing else would clear them (and they would keep their memory).
        """
        if trainable_blocks < 0:
            msg = f"trainable encoder blocks must be >= 0, got {trainable_blocks}."
            raise ValueError(msg)
        depth = len(self.blocks)
        trainable = set()
        if not frozen or trainable_blocks >= depth:
            trainable = {id(p) for p in self.encoder_parameters()}
        elif trainable_blocks:
            trainable = {id(p) for m in [*self.blocks[depth - trainable_blocks:], self.norm] for p in m.parameters()}
        for param in self.encoder_parameters():
            param.requires_grad_(id(param) in trainable)
            if id(param) not in trainable:
                param.grad = None
        self.trainable_encoder_blocks = min(trainable_blocks, depth) if frozen else depth

    # ------------------------------------------------------------------ tensor plumbing
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> normalised network input."""
        return (images - self.mean) / self.std

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`."""
        return images * self.std + self.mean

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, L, p*p*C]`` in MAE's (row, col, channel) order."""
        b, c, _, _ = images.shape
        p = self.patch_size
        gh, gw = self.grid_size
        x = images.reshape(b, c, gh, p, gw, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, gh * gw, p * p * c)

    def unpatchify(self, tokens: torch.Tensor, channels: int) -> torch.Tensor:
        """``[..., L, p*p*C]`` -> ``[..., C, H, W]`` (inverse of :meth:`patchify`, leading dims kept)."""
        p = self.patch_size
        gh, gw = self.grid_size
        lead = tokens.shape[:-2]
        x = tokens.reshape(-1, gh, gw, p, p, channels)
        x = torch.einsum("nhwpqc->nchpwq", x).reshape(*lead, channels, gh * p, gw * p)
        return x

    @staticmethod
    def random_masking(
        tokens: torch.Tensor,
        mask_ratio: float,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random ``1 - mask_ratio`` of tokens per sample (argsort of uniform noise).

        Returns:
            ``(kept [B, L_keep, E], mask [B, L] with 1 = hidden, ids_restore [B, L])``.
        """
        b, length, dim = tokens.shape
        keep = int(length * (1 - mask_ratio))
        noise = torch.rand(b, length, device=tokens.device, generator=generator)
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        ids_keep = ids_shuffle[:, :keep]
        kept = tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(b, length, device=tokens.device)
        mask[:, :keep] = 0
        return kept, mask.gather(1, ids_restore), ids_restore

    # ------------------------------------------------------------------ network
    def forward_encoder(
        self,
        images: torch.Tensor,
        mask_ratio: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Encode normalised ``[B, 3, H, W]`` images.

        Returns:
            ``(latent [B, 1 + L_keep, E], mask [B, L] or None, ids_restore [B, L] or None)``.
        """
        # Training: the frozen part runs without autograd. Otherwise (eval, export) no grad-mode switch is traced:
        # each one is a higher-order op in torch.export's graph (14 of them doubled the ONNX export's trace time).
        grad = torch.is_grad_enabled() and self.training
        first_trained = len(self.blocks) - self.trainable_encoder_blocks  # blocks before it run without autograd
        with _grad_mode(grad, first_trained == 0):
            x = self.patch_embed(images) + self.pos_embed[:, 1:]
            mask = ids_restore = None
            if mask_ratio > 0:
                x, mask, ids_restore = self.random_masking(x, mask_ratio)
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
        for index, block in enumerate(self.blocks):
            with _grad_mode(grad, index >= first_trained):
                x = block(x)
        with _grad_mode(grad, self.trainable_encoder_blocks > 0):
            x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(
        self,
        latent: torch.Tensor,
        ids_restore: torch.Tensor | None = None,
        with_logits: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode encoder tokens; hidden positions (``ids_restore`` given) get the mask token.

        Returns:
            ``(pixel tokens [B, L, p*p*3], block logit tokens [D, B, L, p*p*2] or None)``.
        """
        x = self.decoder_embed(latent)
        if ids_restore is not None:
            b, kept, dim = x.shape
            mask_tokens = self.mask_token.expand(b, ids_restore.shape[1] + 1 - kept, -1)
            patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
            patches = patches.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
            x = torch.cat([x[:, :1], patches], dim=1)
        x = x + self.decoder_pos_embed
        hidden = []
        for block in self.decoder_blocks:
            x = block(x)
            hidden.append(x[:, 1:])
        logits = self.mask_pred(torch.stack(hidden)) if with_logits else None
        pixels = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        return pixels, logits

    def masked_reconstruction(self, images: torch.Tensor, mask_ratio: float) -> MaskedReconstruction:
        """Stage 1: MAE on ``[B, 3, H, W]`` images in [0, 1]; targets are raw (normalised) patches."""
        normalized = self.normalize(images)
        latent, mask, ids_restore = self.forward_encoder(normalized, mask_ratio)
        prediction, _ = self.forward_decoder(latent, ids_restore, with_logits=False)
        return MaskedReconstruction(prediction, self.patchify(normalized), mask)

    def pixel_outputs(self, images: torch.Tensor) -> PixelOutput:
        """All tokens visible: reconstruction and every block's pixel-status logits."""
        normalized = self.normalize(images)
        latent, _, _ = self.forward_encoder(normalized)
        pixels, logits = self.forward_decoder(latent)
        return PixelOutput(normalized, self.unpatchify(pixels, 3), self.unpatchify(logits, 2), latent)

    def forward(
        self,
        images: torch.Tensor,
        mask_ratio: float = 0.0,
    ) -> MaskedReconstruction | PixelOutput | InferenceBatch:
        """Training: stage-1 MAE output when ``mask_ratio > 0``, else full pixel outputs. Eval: scores.

        Args:
            images: ``[B, 3, H, W]`` in [0, 1].
            mask_ratio: Fraction of patches hidden from the encoder (training only).

        Returns:
            In eval mode ``InferenceBatch(pred_score [B], anomaly_map [B, 1, H, W])``.
        """
        if self.training:
            return self.masked_reconstruction(images, mask_ratio) if mask_ratio > 0 else self.pixel_outputs(images)
        output = self.pixel_outputs(images)
        anomaly_map, pred_score = self.anomaly_map_generator(output.reconstruction, output.image, output.block_logits)
        if self.feature_memory is not None:
            pred_score = self.feature_memory(output.latent[:, 1:])
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    @torch.no_grad()
    def raw_score_maps(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` images in [0, 1] -> ``[B, H, W]`` uncalibrated score maps (for the calibration)."""
        output = self.pixel_outputs(images)
        return self.anomaly_map_generator.raw_score_map(output.reconstruction, output.image, output.block_logits)


def _grad_mode(managed: bool, enabled: bool) -> AbstractContextManager:
    """``torch.set_grad_enabled(enabled)`` while training with autograd on (``managed``), else no switch at all."""
    return torch.set_grad_enabled(enabled) if managed else nullcontext()


def _nearest_multiple(value: int, base: int) -> int:
    return max(base, round(value / base) * base)
