"""CutpasteModel: outputs, patch layout, anomaly-map alignment, backbone weights loaded only on request."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from isstad_plugin import Cutpaste
from isstad_plugin.models.cutpaste.torch_model import PAPER_HEAD, CutpasteModel


def small_model(**kwargs) -> CutpasteModel:
    torch.manual_seed(0)
    return CutpasteModel(**{"head_layers": (64, 32), "patch_size": 16, "patch_stride": 8, "score_sigma": 2.0,
                            **kwargs})


def test_paper_head_and_training_output() -> None:
    model = CutpasteModel()
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == list(PAPER_HEAD)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in model.head) == 9
    assert model.classifier.out_features == 3
    out = small_model().train()(torch.rand(6, 3, 64, 64))
    assert out.embedding.shape == (6, 512) and out.logits.shape == (6, 3)


def test_eval_output_shapes() -> None:
    model = small_model().eval()
    with torch.no_grad():
        out = model(torch.rand(3, 3, 64, 72))
    assert out.pred_score.shape == (3,)
    assert out.anomaly_map.shape == (3, 1, 64, 72)
    assert torch.isfinite(out.anomaly_map).all() and (out.pred_score >= 0).all()


def test_patches_are_the_strided_windows_row_major() -> None:
    model = small_model()
    images = torch.rand(2, 3, 40, 56)
    patches, grid_h, grid_w = model.patches(images)
    assert (grid_h, grid_w) == (4, 6)
    assert patches.shape == (2 * 4 * 6, 3, 16, 16)
    # image 1, row 2, column 3 -> rows 16..31, columns 24..39
    torch.testing.assert_close(patches[1 * 24 + 2 * 6 + 3], images[1, :, 16:32, 24:40], rtol=0, atol=0)


def test_anomaly_map_puts_each_patch_score_at_its_centre() -> None:
    model = small_model(patch_size=16, patch_stride=4, score_sigma=0.5)
    constant = model.anomaly_map(torch.full((1, 13, 13), 2.5), 64, 64)
    torch.testing.assert_close(constant, torch.full((1, 1, 64, 64), 2.5))
    scores = torch.zeros(1, 13, 13)
    scores[0, 3, 9] = 1.0  # patch covering rows 12..27, columns 36..51: centre (20, 44)
    peak = model.anomaly_map(scores, 64, 64)[0, 0]
    row, col = divmod(int(peak.argmax()), 64)
    assert abs(row - 20) <= 1 and abs(col - 44) <= 1


@pytest.mark.parametrize("sigma", [2.0, 16.0])
def test_map_smoothing_is_anomalib_gaussian_blur_made_separable(sigma: float) -> None:
    """The separable smoothing gives anomalib's GaussianBlur2d (reflect borders, 2 int(4 sigma + 0.5) + 1 taps), with
    which the recipe's numbers were measured; a checkpoint holding that blur's 2-D kernel still loads."""
    from anomalib.models.components import GaussianBlur2d

    model = small_model(score_sigma=sigma, patch_size=32, patch_stride=16)
    scores = 40 * torch.rand(2, 13, 13, generator=torch.Generator().manual_seed(1))
    smoothed = model.anomaly_map(scores, 224, 224)
    unsmoothed = torch.nn.functional.pad(
        torch.nn.functional.interpolate(scores.unsqueeze(1), size=(193, 193), mode="bilinear", align_corners=True),
        (16, 15, 16, 15), mode="replicate")
    reference = GaussianBlur2d(sigma=sigma, channels=1)(unsmoothed)
    torch.testing.assert_close(smoothed, reference, rtol=1e-4, atol=1e-4)

    state = model.state_dict()
    assert "blur.kernel" not in state  # rebuilt from score_sigma
    state["blur.kernel"] = GaussianBlur2d(sigma=sigma, channels=1).kernel  # as written before
    model.load_state_dict(state, strict=True)


def test_construction_never_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    random_init = timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict()
    torch.manual_seed(0)
    model = Cutpaste(pretrained=True, image_size=64, patch_size=16)  # weights come when training starts
    for name, value in model.model.backbone.state_dict().items():
        assert torch.equal(value, random_init[name]), name


def test_local_weights_file_is_loaded_into_the_backbone(tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = timm.create_model("resnet18", pretrained=False)  # a full timm checkpoint, classifier included
    path = tmp_path / "resnet18.safetensors"
    save_file(reference.state_dict(), str(path))
    model = small_model()
    assert not torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
    assert model.load_backbone_weights(pretrained=False, weights_file=str(path))
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, reference.state_dict()[name]), name
    assert not small_model().load_backbone_weights(pretrained=False, weights_file=None)  # random init stays


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="patch_size must be in"):
        Cutpaste(image_size=64, patch_size=96)
    with pytest.raises(ValueError, match="score_sigma"):
        CutpasteModel(score_sigma=0)
    with pytest.raises(ValueError, match=r"score_sigma=16.0 smooths over 64 px, which needs image_size > 64"):
        Cutpaste(pretrained=False, image_size=64, patch_size=32, score_sigma=16.0)


@pytest.mark.parametrize(("backbone", "mean", "std"), [
    ("resnet18", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("efficientnet_lite0.pypi_in1k", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # TensorFlow's weights: (x - 0.5) / 0.5
])
def test_inputs_are_normalised_as_the_backbone_weights_expect(backbone: str, mean: tuple, std: tuple) -> None:
    model = CutpasteModel(backbone=backbone, head_layers=(8,))
    torch.testing.assert_close(model.pixel_mean.flatten(), torch.tensor(mean))
    torch.testing.assert_close(model.pixel_std.flatten(), torch.tensor(std))
    images = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(model.normalize(images), (images - torch.tensor(mean).view(1, 3, 1, 1))
                               / torch.tensor(std).view(1, 3, 1, 1))
