"""IsstadModel: shapes, value ranges, MAE conventions and the fused scoring against a SciPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from isstad_plugin.models.isstad.anomaly_map import AnomalyMapGenerator, GaussianSmoothing
from isstad_plugin.models.isstad.loss import Stage2Loss, masked_patch_mse
from isstad_plugin.models.isstad.torch_model import IsstadModel, sincos_position_embedding


def tiny_model(image_size: int = 64, decoder_depth: int = 3) -> IsstadModel:
    torch.manual_seed(0)
    return IsstadModel("vit_tiny", image_size=(image_size, image_size), decoder_embed_dim=64,
                       decoder_depth=decoder_depth, decoder_num_heads=4)


def reference_scores(reconstruction, image, block_logits, sigma=4.0, eps=1e-8):
    """The method page's scoring written with NumPy and scipy.ndimage.gaussian_filter (float64)."""
    logits = block_logits.astype(np.float64)
    softmax = np.exp(logits - logits.max(axis=2, keepdims=True))
    softmax /= softmax.sum(axis=2, keepdims=True)
    probability = softmax[:, :, 1].mean(axis=0)
    error = ((reconstruction.astype(np.float64) - image) ** 2).mean(axis=1)
    maps, scores = [], []
    for p, r in zip(probability, error, strict=True):
        r01 = (r - r.min()) / (r.max() - r.min() + eps)
        maps.append(gaussian_filter(p * r01, sigma))
        scores.append(gaussian_filter(gaussian_filter(p, sigma) * gaussian_filter(r, sigma), sigma).mean())
    return np.stack(maps)[:, None], np.array(scores)


def mae_sincos_reference(dim: int, grid: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed (numpy), written from its definition."""
    grid_h = np.arange(grid, dtype=np.float32)
    grid_w = np.arange(grid, dtype=np.float32)
    mesh = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid, grid)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(dim // 2, mesh[0]), one_d(dim // 2, mesh[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def test_position_embedding_matches_mae_formula() -> None:
    ours = sincos_position_embedding(64, (5, 5))[0].numpy()
    np.testing.assert_allclose(ours, mae_sincos_reference(64, 5), rtol=0, atol=1e-6)


def test_eval_output_shapes_and_ranges() -> None:
    model = tiny_model().eval()
    with torch.no_grad():
        out = model(torch.rand(3, 3, 64, 64))
    assert out.anomaly_map.shape == (3, 1, 64, 64)
    assert out.pred_score.shape == (3,)
    assert torch.isfinite(out.anomaly_map).all()
    assert out.anomaly_map.min() >= 0
    assert out.anomaly_map.max() <= 1 + 1e-6
    assert (out.pred_score >= 0).all()


def test_training_outputs_for_both_stages() -> None:
    model = tiny_model(decoder_depth=3).train()
    images = torch.rand(2, 3, 64, 64)
    masked = model(images, mask_ratio=0.75)
    assert masked.prediction.shape == masked.target.shape == (2, 16, 16 * 16 * 3)
    assert masked.mask.sum(dim=1).tolist() == [12.0, 12.0]  # 75 % of 16 patches hidden per image
    full = model(images)
    assert full.reconstruction.shape == (2, 3, 64, 64)
    assert full.block_logits.shape == (3, 2, 2, 64, 64)  # one logit map per decoder block
    torch.testing.assert_close(model.denormalize(full.image), images)


def test_patchify_roundtrip_and_layout() -> None:
    model = tiny_model()
    images = torch.rand(2, 3, 64, 64)
    patches = model.patchify(images)
    torch.testing.assert_close(model.unpatchify(patches, 3), images, rtol=0, atol=0)
    # token 1 is the patch in row 0, column 1; its first value is pixel (0, 16), channel 0
    assert patches[0, 1, 0] == images[0, 0, 0, 16]


def test_scoring_equals_scipy_reference() -> None:
    generator = AnomalyMapGenerator(sigma=4.0)
    rng = np.random.default_rng(0)
    reconstruction = rng.normal(size=(2, 3, 48, 56)).astype(np.float32)
    image = rng.normal(size=(2, 3, 48, 56)).astype(np.float32)
    logits = rng.normal(scale=3, size=(4, 2, 2, 48, 56)).astype(np.float32)
    anomaly_map, score = generator(torch.from_numpy(reconstruction), torch.from_numpy(image), torch.from_numpy(logits))
    ref_map, ref_score = reference_scores(reconstruction, image, logits)
    np.testing.assert_allclose(anomaly_map.numpy(), ref_map, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(score.numpy(), ref_score, rtol=1e-4, atol=1e-7)


def test_model_eval_forward_equals_reference_on_its_own_outputs() -> None:
    model = tiny_model().eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = model(images)
        parts = model.pixel_outputs(images)
    ref_map, ref_score = reference_scores(parts.reconstruction.numpy(), parts.image.numpy(), parts.block_logits.numpy())
    np.testing.assert_allclose(out.anomaly_map.numpy(), ref_map, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.pred_score.numpy(), ref_score, rtol=1e-4, atol=1e-7)


def test_gaussian_smoothing_is_scipy_reflect_with_33_taps() -> None:
    blur = GaussianSmoothing(4.0)
    assert blur.kernel_x.numel() == 33
    x = np.zeros((1, 40, 40), np.float32)
    x[0, 0, 0] = 1.0  # a corner impulse exercises the border mode
    np.testing.assert_allclose(blur(torch.from_numpy(x)).numpy(), gaussian_filter(x[0], 4.0)[None], atol=1e-7)


def test_image_size_must_be_a_multiple_of_patch_size() -> None:
    with pytest.raises(ValueError, match=r"image_size \(100, 100\) must be a multiple of patch_size 16"):
        IsstadModel("vit_tiny", image_size=(100, 100), decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)


def test_frozen_encoder_gets_no_gradient() -> None:
    model = tiny_model().train()
    model.freeze_encoder()
    out = model(torch.rand(2, 3, 64, 64))
    loss = Stage2Loss()(out.block_logits, torch.zeros(2, 1, 64, 64), out.reconstruction, out.image,
                        model.denormalize(out.reconstruction), model.denormalize(out.image))
    loss.total.backward()
    assert all(p.grad is None for p in model.encoder_parameters())
    trained = [p for p in model.decoder_parameters() if p is not model.mask_token]  # no hidden tokens in stage 2
    assert all(p.grad is not None for p in trained)


@pytest.mark.parametrize("blocks", [1, 2, 12])
def test_stage2_trains_only_the_last_encoder_blocks(blocks: int) -> None:
    model = tiny_model().train()
    model.freeze_encoder(True, trainable_blocks=blocks)
    out = model(torch.rand(2, 3, 64, 64))
    (out.reconstruction.square().mean() + out.block_logits.square().mean()).backward()
    depth = len(model.blocks)
    trained = {id(p) for b in model.blocks[depth - blocks:] for p in b.parameters()} | {
        id(p) for p in model.norm.parameters()}
    if blocks >= depth:
        trained |= {id(p) for p in model.encoder_parameters()}
    for param in model.encoder_parameters():
        assert (param.grad is not None) == (id(param) in trained)
        assert param.requires_grad == (id(param) in trained)
    model.freeze_encoder(False)  # stage 1 again: everything trains
    assert all(p.requires_grad for p in model.encoder_parameters()) and model.trainable_encoder_blocks == depth
    with pytest.raises(ValueError, match="trainable encoder blocks"):
        model.freeze_encoder(True, trainable_blocks=-1)


@pytest.mark.parametrize("map_kind", ["product", "probability", "error"])
@pytest.mark.parametrize("image_score", ["paper", "max", "top_k"])
def test_scoring_variants_equal_their_formulas(map_kind: str, image_score: str) -> None:
    rng = np.random.default_rng(1)
    reconstruction = rng.normal(size=(2, 3, 40, 40)).astype(np.float32)
    image = rng.normal(size=(2, 3, 40, 40)).astype(np.float32)
    logits = rng.normal(scale=3, size=(3, 2, 2, 40, 40)).astype(np.float32)
    generator = AnomalyMapGenerator(4.0, map_kind, image_score, top_fraction=0.05)
    anomaly_map, score = generator(*(torch.from_numpy(a) for a in (reconstruction, image, logits)))
    paper_map, paper_score = reference_scores(reconstruction, image, logits)
    softmax = np.exp(logits - logits.max(axis=2, keepdims=True))
    probability = (softmax / softmax.sum(axis=2, keepdims=True))[:, :, 1].mean(axis=0)
    error = ((reconstruction - image) ** 2).mean(axis=1)
    expected_map = {"product": paper_map[:, 0], "probability": np.stack([gaussian_filter(p, 4.0) for p in probability]),
                    "error": np.stack([gaussian_filter(r, 4.0) for r in error])}[map_kind]
    np.testing.assert_allclose(anomaly_map[:, 0].numpy(), expected_map, rtol=1e-4, atol=1e-6)
    flat = np.sort(expected_map.reshape(2, -1), axis=1)[:, ::-1]
    expected_score = {"paper": paper_score, "max": flat[:, 0], "top_k": flat[:, :80].mean(axis=1)}[image_score]
    np.testing.assert_allclose(score.numpy(), expected_score, rtol=1e-4, atol=1e-6)


def test_per_pixel_calibration_standardises_against_normal_maps() -> None:
    model = IsstadModel("vit_tiny", image_size=(64, 64), decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                        image_score="max", map_calibration="per_pixel").eval()
    generator = model.anomaly_map_generator
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    raw = model.raw_score_maps(images)
    with torch.no_grad():
        assert torch.equal(model(images).anomaly_map[:, 0], raw)  # identity until calibrated
        generator.calibrate(raw)
        calibrated = model(images)
    std = raw.std(0)
    expected = (raw - raw.mean(0)) / (std + 0.1 * std.mean() + 1e-8)
    torch.testing.assert_close(calibrated.anomaly_map[:, 0], expected)
    torch.testing.assert_close(calibrated.pred_score, expected.flatten(1).amax(1))
    assert {"anomaly_map_generator.normal_mean", "anomaly_map_generator.normal_scale"} <= set(model.state_dict())
    assert not any("normal_" in key for key in tiny_model().state_dict())  # uncalibrated models keep their keys
    with pytest.raises(ValueError, match="calibration needs"):
        generator.calibrate(raw[:, :32])
    # the image score from another (calibrated) map; the anomaly map stays uncalibrated
    hybrid = AnomalyMapGenerator(4.0, "error", "max", calibration="per_pixel", image_size=(64, 64),
                                 score_map_kind="product")
    parts = model.pixel_outputs(images)
    hybrid.calibrate(generator.raw_score_map(parts.reconstruction, parts.image, parts.block_logits).detach())
    with torch.no_grad():
        anomaly_map, score = hybrid(parts.reconstruction, parts.image, parts.block_logits)
    error_map = AnomalyMapGenerator(4.0, "error")(parts.reconstruction, parts.image, parts.block_logits)[0]
    torch.testing.assert_close(anomaly_map, error_map)
    torch.testing.assert_close(score, expected.flatten(1).amax(1))
    with pytest.raises(ValueError, match="map_calibration"):
        AnomalyMapGenerator(calibration="global")


@pytest.mark.parametrize(("kwargs", "name"), [({"map_kind": "sum"}, "anomaly_map_kind"),
                                              ({"score_map_kind": "sum"}, "image_score_map"),
                                              ({"image_score": "median"}, "image_score"),
                                              ({"top_fraction": 0.0}, "image_score_top_fraction")])
def test_scoring_options_are_checked(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        AnomalyMapGenerator(**kwargs)


def test_masked_patch_mse_counts_hidden_patches_only() -> None:
    prediction = torch.zeros(1, 4, 3)
    target = torch.tensor([[[1.0] * 3, [2.0] * 3, [3.0] * 3, [4.0] * 3]])
    mask = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    assert masked_patch_mse(prediction, target, mask).item() == pytest.approx((4 + 16) / 2)


def test_stage2_cross_entropy_uses_class_weights() -> None:
    logits = torch.zeros(2, 1, 2, 16, 16)
    logits[:, :, 1] = 1.0  # every pixel predicted anomalous
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1  # half the pixels anomalous
    image = torch.zeros(1, 3, 16, 16)
    terms = Stage2Loss(class_weights=(3.0, 1.0), mse_weight=0.0, ssim_weight=0.0)(
        logits, mask, image, image, image, image)
    nll_right, nll_wrong = np.log1p(np.exp(-1.0)), np.log1p(np.exp(1.0))
    expected = (3 * nll_wrong + 1 * nll_right) / (3 + 1)  # equal pixel counts per class
    assert terms.cross_entropy.item() == pytest.approx(expected, rel=1e-5)


def test_extended_image_score_is_the_authors_formula() -> None:
    """``extended``: (1 + mean of the top fraction of G(p))^a * (1 + mean of the top fraction of G(r))^b."""
    from isstad_plugin.models.isstad.anomaly_map import AnomalyMapGenerator

    generator = AnomalyMapGenerator(sigma=1.0, map_kind="error", image_score="extended", top_fraction=0.1,
                                    powers=(2.0, 0.5))
    generator_max = AnomalyMapGenerator(sigma=1.0, map_kind="error", image_score="max")
    torch.manual_seed(0)
    image, reconstruction = torch.rand(2, 3, 20, 20), torch.rand(2, 3, 20, 20)
    logits = torch.randn(3, 2, 2, 20, 20)
    _, score = generator(reconstruction, image, logits)
    probability = generator.blur(logits.softmax(dim=2)[:, :, 1].mean(dim=0)).flatten(1)
    error = generator.blur((reconstruction - image).pow(2).mean(dim=1)).flatten(1)
    top_p, top_r = (x.sort(dim=1, descending=True).values[:, :40].mean(dim=1) for x in (probability, error))
    torch.testing.assert_close(score, (1 + top_p) ** 2 * (1 + top_r) ** 0.5)
    _, maximum = generator_max(reconstruction, image, logits)
    torch.testing.assert_close(maximum, error.amax(dim=1))


def test_feature_score_is_the_largest_distance_of_a_patch_token_to_the_training_tokens() -> None:
    from isstad_plugin.models.isstad.feature_memory import PatchFeatureMemory

    torch.manual_seed(0)
    normal = torch.randn(400, 8)
    memory = PatchFeatureMemory(size=50, dim=8)
    memory.fit(normal)
    assert bool(memory.fitted) and memory.bank.shape == (50, 8)
    assert all(any(torch.equal(row, token) for token in normal) for row in memory.bank)  # a subset of the tokens
    tokens = torch.randn(2, 5, 8)
    tokens[1, 3] += 10  # one far token in the second image
    expected = torch.cdist(tokens.flatten(0, 1), memory.bank).amin(dim=1).reshape(2, 5).amax(dim=1)
    torch.testing.assert_close(memory(tokens), expected, rtol=1e-4, atol=1e-4)
    assert memory(tokens)[1] > memory(tokens)[0] + 5
    few = PatchFeatureMemory(size=50, dim=8)
    few.fit(normal[:7])  # fewer tokens than the bank: all of them, repeated (the nearest distances are the same)
    torch.testing.assert_close(few(tokens), torch.cdist(tokens.flatten(0, 1), normal[:7]).amin(1).reshape(2, 5)
                               .amax(1), rtol=1e-4, atol=1e-4)


def test_the_lean_coreset_selects_what_anomalibs_selects() -> None:
    from anomalib.models.components.sampling import KCenterGreedy

    from isstad_plugin.models.isstad.feature_memory import LeanKCenterGreedy, PatchFeatureMemory

    tokens = torch.randn(3000, 96, generator=torch.Generator().manual_seed(1))
    picks = []
    for sampler_class in (KCenterGreedy, LeanKCenterGreedy):
        torch.manual_seed(3)  # the first centre
        np.random.seed(3)  # the projection (anomalib's SparseRandomProjection draws from NumPy's global state)
        picks.append(sampler_class(tokens, sampling_ratio=0.05).select_coreset_idxs())
    assert picks[1] == picks[0] and len(set(picks[1])) == 150  # the same greedy path, no token twice
    memory = PatchFeatureMemory(size=1000, dim=96)
    tokens = tokens[:1231]  # 1231 * (1000 / 1231) rounds down to 999 in floats
    memory.fit(tokens)
    assert len(torch.unique(memory.bank, dim=0)) == 1000
