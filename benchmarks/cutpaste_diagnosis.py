"""CutPaste diagnosis on magnetic_tile: the image-level Gaussian density before training and after every epoch.

Run by hand on a quiet machine (about 30 minutes on 2 cores)::

    python -m benchmarks.cutpaste_diagnosis             # every run below
    python -m benchmarks.cutpaste_diagnosis --only paper_lr0.03 backbone_frozen

Writes ``docs/benchmarks/cutpaste-diagnosis.md``. Every figure is on the **validation half** of magnetic_tile's test
folder (anomalib's ``val_split_mode: from_test``, ratio 0.5, split seed 42), never the test half.

What is measured. The offline ImageNet EfficientNet-Lite0 at 224 px, trained through the real ``Cutpaste`` module
and ``Engine.fit`` (image-level and patch-level 3-way task, SGD with a cosine schedule), one run per training
setting. Before training and after every epoch, a probe fits the paper's image-level Gaussian (Ledoit-Wolf, the
model's own :class:`GaussianDensity`) on the 300 plain training images and scores the validation images:

- ``pooled, eval``: the backbone's pooled features with BatchNorm in eval mode (running statistics), as the model
  scores: the image AUROC a user would get;
- ``pooled, BN batch stats``: the same with BatchNorm in train mode while embedding (each batch normalised by its
  own statistics), the mistake of fitting or scoring a network left in train mode (before training and after the
  last epoch);
- ``head``: the projection head's output instead of the pooled features (what some re-implementations fit on;
  after the last epoch);
- ``3-way CE``: the epoch's mean training loss (2 ln 3 = 2.20 for image + patch task at chance).

Before training, the probe also runs with the inputs normalised by ImageNet's mean and std instead of what the
offline weights expect (``(x - 0.5) / 0.5``, from timm's ``pretrained_cfg``): the first benchmark's bug.
Higher Mahalanobis distance means more anomalous throughout; an AUROC below 0.5 would mean the direction is wrong.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.utils.data
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from benchmarks.common import DOCS, machine, markdown_table, write_page

DATA = {"root": "../shared/data", "category": "magnetic_tile", "train_batch_size": 16, "eval_batch_size": 16,
        "num_workers": 2}
SPLIT_SEED = 42
BASE = {"backbone": "efficientnet_lite0.pypi_in1k", "pretrained": True, "image_size": 224, "patch_size": 64,
        "patch_stride": 16}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# name -> (Cutpaste overrides, what the run checks)
RUNS: dict[str, tuple[dict, str]] = {
    "paper_lr0.03": ({"lr": 0.03, "backbone_lr_scale": 1.0, "freeze_batchnorm": False, "max_epochs": 3},
                     "the paper's fine-tuning: every layer at SGD 0.03, BatchNorm statistics updated"),
    "paper_lr0.003": ({"lr": 0.003, "backbone_lr_scale": 1.0, "freeze_batchnorm": False, "max_epochs": 3},
                      "the same at a tenth of the learning rate"),
    "bn_frozen_lr0.03": ({"lr": 0.03, "backbone_lr_scale": 1.0, "freeze_batchnorm": True, "max_epochs": 3},
                         "BatchNorm kept in eval mode (ImageNet statistics) while fine-tuning at 0.03"),
    "backbone_1pct": ({"lr": 0.03, "backbone_lr_scale": 0.01, "freeze_batchnorm": True, "max_epochs": 3},
                      "the backbone at 1 % of the head's rate, BatchNorm kept (the recipe's alternative)"),
    "backbone_frozen": ({"lr": 0.03, "backbone_lr_scale": 0.0, "freeze_batchnorm": True, "max_epochs": 1},
                        "the backbone frozen, only the head learns (configs/cutpaste_cpu.yaml)"),
}


def load_images(datamodule) -> tuple[Tensor, Tensor, Tensor]:  # noqa: ANN001
    """Plain training images ``[N, 3, 224, 224]``, validation images and their labels ``[M]``, each image resized
    on its own as anomalib's datamodule does under a trainer (magnetic_tile's images differ in size)."""
    from isstad_plugin import Cutpaste
    from isstad_plugin.models.components.export import resize_like

    resize_like(datamodule, Cutpaste(**BASE).pre_processor)
    datamodule.setup("fit")
    train = torch.cat([batch.image for batch in datamodule.train_dataloader()])  # no augmentations but the resize
    val, labels = [], []
    for batch in datamodule.val_dataloader():
        val.append(batch.image)
        labels.append(batch.gt_label)
    return train, torch.cat(val), torch.cat(labels).int()


class DensityProbe(Callback):
    """Image AUROC of Gaussians fitted on the training images' embeddings, before training and after each epoch."""

    def __init__(self, train: Tensor, val: Tensor, labels: Tensor) -> None:
        self.train, self.val, self.labels = train, val, labels
        self.rows: list[dict[str, str]] = []
        self.max_epochs = 0  # of the run being probed: the head and BN columns are measured after its last epoch

    @torch.no_grad()
    def embeddings(self, network: nn.Module, images: Tensor, batchnorm_train: bool, head: bool) -> Tensor:
        """``[N, D]`` pooled (or head) embeddings, with the BatchNorm layers in train or eval mode."""
        was_training = network.training
        network.eval()
        if batchnorm_train:
            saved = {k: v.clone() for k, v in network.backbone.state_dict().items()}
            for module in network.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train()
        out = []
        for start in range(0, len(images), 16):
            embedding = network.embed(images[start:start + 16])
            out.append(network.head(embedding) if head else embedding)
        if batchnorm_train:  # train mode updated the running statistics: put them back
            network.backbone.load_state_dict(saved)
        network.train(was_training)
        return torch.cat(out)

    def auroc(self, network: nn.Module, batchnorm_train: bool = False, head: bool = False) -> float:
        """Image AUROC on the validation images of a Gaussian fitted on the training images."""
        from isstad_plugin.models.cutpaste.density import GaussianDensity

        fitted = self.embeddings(network, self.train, batchnorm_train, head)
        density = GaussianDensity(fitted.shape[1])
        density.fit(fitted)
        scores = density(self.embeddings(network, self.val, batchnorm_train, head))
        # sklearn, not torchmetrics: torchmetrics squashes scores outside [0, 1] through a sigmoid, which saturates
        # on Mahalanobis distances (tens to hundreds) and ties every image
        return float(roc_auc_score(self.labels.numpy(), scores.numpy()))

    def probe(self, network: nn.Module, epoch: str, loss: str) -> None:
        last = epoch == str(self.max_epochs)
        self.rows.append({"epoch": epoch, "pooled, eval": f"{self.auroc(network):.3f}",
                          "pooled, BN batch stats": f"{self.auroc(network, batchnorm_train=True):.3f}"
                          if epoch == "0" or last else "-",
                          "head": f"{self.auroc(network, head=True):.3f}" if last else "-",
                          "3-way CE": loss})
        print(self.rows[-1], flush=True)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer
        self.probe(pl_module.model, "0", "-")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loss = trainer.callback_metrics.get("train_loss_epoch")
        self.probe(pl_module.model, str(trainer.current_epoch + 1), "-" if loss is None else f"{float(loss):.2f}")


def normalisation_check(probe: DensityProbe) -> list[list[str]]:
    """The untrained backbone's image AUROC with the inputs its weights expect and with ImageNet's statistics."""
    from isstad_plugin import Cutpaste

    model = Cutpaste(**BASE)
    model.model.load_backbone_weights(pretrained=True)
    network = model.model
    expected = (tuple(network.pixel_mean.flatten().tolist()), tuple(network.pixel_std.flatten().tolist()))
    rows = [["weights' own (timm `pretrained_cfg`)", f"mean {expected[0]}, std {expected[1]}",
             f"{probe.auroc(network):.3f}"]]
    network.pixel_mean.copy_(torch.tensor(IMAGENET[0]).view(1, 3, 1, 1))
    network.pixel_std.copy_(torch.tensor(IMAGENET[1]).view(1, 3, 1, 1))
    rows.append(["ImageNet's (the first benchmark)", f"mean {IMAGENET[0]}, std {IMAGENET[1]}",
                 f"{probe.auroc(network):.3f}"])
    return rows


def resize_check(probe: DensityProbe, datamodule) -> list[list[str]]:  # noqa: ANN001
    """The untrained backbone's image AUROC with the Gaussian fitted on training images resized one by one (as the
    scored images are) and on batches collated at mixed sizes, then resized (what ``fit_density`` did before)."""
    import copy

    from isstad_plugin import Cutpaste

    model = Cutpaste(**BASE)
    model.model.load_backbone_weights(pretrained=True)
    dataset = copy.copy(datamodule.train_data)
    dataset.augmentations = None
    loader = torch.utils.data.DataLoader(dataset, batch_size=DATA["eval_batch_size"], collate_fn=dataset.collate_fn)
    collated = torch.cat([model.pre_processor.transform(batch.image) for batch in loader])
    return [["each image resized on its own (as the scored images; `fit_density` since 2026-11-30)",
             f"{probe.auroc(model.model):.3f}"],
            ["batches collated at their largest image's size, then resized (before)",
             f"{DensityProbe(collated, probe.val, probe.labels).auroc(model.model):.3f}"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="runs to make (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    from isstad_plugin import Cutpaste

    torch.set_num_threads(args.threads)
    datamodule = MVTecAD(**DATA, val_split_mode="from_test", val_split_ratio=0.5, seed=SPLIT_SEED)
    train, val, labels = load_images(datamodule)
    probe = DensityProbe(train, val, labels)
    normalisation = normalisation_check(probe)
    resizing = resize_check(probe, datamodule)
    sections = []
    for name in args.only or list(RUNS):
        overrides, meaning = RUNS[name]
        seed_everything(args.seed, workers=True)
        probe.rows, probe.max_epochs = [], overrides["max_epochs"]
        model = Cutpaste(**BASE, **overrides, augmentation_seed=args.seed)
        # no validation while fitting: the probe scores the validation half itself, and the patch maps (the costly
        # part of a validation) are not what is diagnosed here
        engine = Engine(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        max_epochs=overrides["max_epochs"], limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[probe], default_root_dir="results/cutpaste_diagnosis")
        start = time.perf_counter()
        engine.fit(model=model, datamodule=MVTecAD(**DATA, val_split_mode="from_test", val_split_ratio=0.5,
                                                   seed=SPLIT_SEED))
        minutes = (time.perf_counter() - start) / 60
        sections += [f"### `{name}`: {meaning}", "", f"Options: `{overrides}`; {minutes:.1f} min with the probes.", "",
                     markdown_table(list(probe.rows[0]), [list(row.values()) for row in probe.rows]), ""]
    write_page(DOCS / "cutpaste-diagnosis.md", [
        "# CutPaste diagnosis on magnetic_tile: the Gaussian density before and during training",
        "",
        f"Generated by `python -m benchmarks.cutpaste_diagnosis` (do not edit by hand). Machine: {machine()}.",
        "",
        f"Validation half of magnetic_tile's test folder ({len(labels)} images, {int(labels.sum())} defective; "
        f"anomalib's `from_test`, split seed {SPLIT_SEED}); training seed {args.seed}. Base options: `{BASE}`. "
        "Each table is one training run through `Engine.fit`; its rows are the image AUROC of the paper's Gaussian "
        "fitted on the 300 plain training images, before training (epoch 0) and after each epoch. What the columns "
        "mean: the module docstring of `benchmarks/cutpaste_diagnosis.py`; the reading: "
        "`isstad_plugin/models/cutpaste/README.md` (Diagnosis).",
        "",
        "## Input normalisation, untrained backbone",
        "",
        markdown_table(["inputs normalised with", "statistics", "image AUROC (val)"], normalisation),
        "",
        "## What the Gaussian is fitted on, untrained backbone",
        "",
        "magnetic_tile's images differ in size; anomalib resizes each scored image on its own.",
        "",
        markdown_table(["training images", "image AUROC (val)"], resizing),
        "",
        "## Training runs",
        "",
        *sections,
    ])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
