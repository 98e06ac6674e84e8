"""The anomalib contract every plugin model keeps (one test, parametrised over the models): what anomalib's
look-ups, Engine, CLI and exporters rely on, and the checks shared through ``PluginModel``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from anomalib import LearningType
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.models import get_model
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Compose, Normalize, Resize

from isstad_plugin import Cutpaste, Isstad
from isstad_plugin.deploy import predict_paths, prepare, read_rgb
from isstad_plugin.models.components.checkpoints import VERSION_KEY
from tests.conftest import TINY_MODEL

# per model: tiny options, and one network option with another value (a checkpoint of another shape)
MODELS: dict[type, tuple[dict[str, Any], tuple[str, Any]]] = {
    Isstad: ({**TINY_MODEL, "stage1_epochs": 1, "stage2_epochs": 1}, ("image_size", 96)),
    Cutpaste: ({"backbone": "resnet18", "pretrained": False, "image_size": 64, "patch_size": 32, "patch_stride": 16,
                "head_layers": (64, 32), "max_epochs": 1}, ("head_layers", (64, 16))),
}
parametrised = pytest.mark.parametrize("model_class", list(MODELS), ids=lambda cls: cls.__name__)


@parametrised
def test_found_by_anomalib_by_name(model_class: type) -> None:
    assert AnomalibModule in model_class.__bases__  # anomalib's look-ups search direct subclasses only
    options, _ = MODELS[model_class]
    model = get_model(model_class.__name__.lower(), **options)
    assert type(model) is model_class
    assert model.learning_type == LearningType.ONE_CLASS
    assert model.trainer_arguments["num_sanity_val_steps"] == 0


@parametrised
def test_resizes_only_and_measures_image_and_pixel_metrics(model_class: type) -> None:
    options, _ = MODELS[model_class]
    model = model_class(**options)
    transforms = model.pre_processor.transform.transforms
    assert [type(t) for t in transforms] == [Resize]
    assert list(transforms[0].size) == [options["image_size"]] * 2
    names = {metric.name for metric in model.evaluator.test_metrics}
    assert names == {"image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score", "pixel_AUPRO"}


@parametrised
def test_a_normalising_pre_processor_is_refused(model_class: type, tile_root: Path, tmp_path: Path) -> None:
    options, _ = MODELS[model_class]
    size = options["image_size"]
    pre_processor = PreProcessor(transform=Compose([Resize((size, size)), Compose([Normalize([0.5] * 3, [0.5] * 3)])]))
    model = model_class(**options, pre_processor=pre_processor)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, max_epochs=1)
    datamodule = MVTecAD(root=tile_root, category="magnetic_tile", train_batch_size=8, eval_batch_size=8,
                         num_workers=0)
    with pytest.raises(ValueError, match=rf"{model_class.__name__} normalises inside its torch model.*remove Normalize"):
        engine.fit(model=model, datamodule=datamodule)


@parametrised
def test_checkpoints_name_the_version_and_refuse_another_network_shape(model_class: type) -> None:
    options, (option, other_value) = MODELS[model_class]
    other = model_class(**{**options, option: other_value})
    checkpoint: dict[str, Any] = {"state_dict": other.state_dict(), "hyper_parameters": dict(other.hparams)}
    other.on_save_checkpoint(checkpoint)
    assert checkpoint[VERSION_KEY]
    with pytest.raises(ValueError, match=rf"trained with {option}=.*pass --model.{option}"):
        model_class(**options).on_load_checkpoint(checkpoint)


@parametrised
def test_the_checkpoint_is_enough_to_test_it(model_class: type, tile_root: Path, tmp_path: Path) -> None:
    """``anomalib test --model <name> --ckpt_path CKPT`` with no other option scores exactly like the trained model,
    and so does ``isstad-predict CKPT images``; an option given with another value than the checkpoint's fails
    naming both."""
    options, (option, other_value) = MODELS[model_class]

    def engine(name: str) -> Engine:
        return Engine(default_root_dir=tmp_path / name, accelerator="cpu", devices=1, logger=False,
                      enable_progress_bar=False)

    def data() -> MVTecAD:
        return MVTecAD(root=tile_root, category="magnetic_tile", train_batch_size=8, eval_batch_size=8, num_workers=0)

    trained, training = model_class(**options), engine("train")
    training.fit(model=trained, datamodule=data())
    expected = training.test(model=trained, datamodule=data())[0]
    (checkpoint,) = (tmp_path / "train").rglob("model.ckpt")
    restored = model_class()  # the constructor's defaults: another network than the trained one
    assert restored.hparams[option] != trained.hparams[option]
    results = engine("test").test(model=restored, datamodule=data(), ckpt_path=checkpoint)[0]
    assert results == pytest.approx(expected, abs=1e-6)
    assert restored.hparams[option] == trained.hparams[option]
    with pytest.raises(ValueError, match=rf"trained with .*{option}=.*\(given: .*leave these options out"):
        engine("conflict").test(model=model_class(**{option: other_value}), datamodule=data(), ckpt_path=checkpoint)

    files = sorted((tile_root / "magnetic_tile" / "test").rglob("*.png"))[:4]
    rows = predict_paths(checkpoint, files, tmp_path / "predictions")  # isstad-predict CKPT files
    images = torch.from_numpy(np.concatenate([prepare(read_rgb(file), (options["image_size"],) * 2) for file in files]))
    with torch.inference_mode():
        reference = trained.eval()(images).pred_score
    assert [row["pred_score"] for row in rows] == pytest.approx(reference.tolist(), abs=1e-5)
