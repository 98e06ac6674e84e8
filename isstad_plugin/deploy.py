"""``isstad-predict``: run a trained model on image files or folders, write overlays.

The model is an exported graph (OpenVINO IR or ONNX) or the Lightning checkpoint (``.ckpt``) an ``anomalib train``
of ISSTAD or CutPaste wrote. The exported graph already holds pre-processing, the network, the model's scoring and
anomalib's post-processing; this command only reads images, resizes them to the graph's fixed input size, runs
``anomalib.deploy.OpenVINOInferencer`` (or ONNX Runtime) and draws the anomaly map over each image. A checkpoint
runs the same pipeline in torch (the model rebuilt from the options it holds, on the CPU, in FP32).

Besides ``predictions.csv`` and the overlays, each run writes ``report.html`` (:mod:`isstad_plugin.report`): one
offline page with the run's model, threshold and source, a score histogram and a gallery sorted by score, flagged
images first, filterable; ``--no-report`` leaves it out.

Every image is checked before any work: unreadable files (truncated, or not an image) are all named in one error.
With ``--skip-unreadable`` the rest are scored and those files are listed as unreadable in ``predictions.csv`` and
the report, never dropped in silence.

Outputs mirror the inputs: a folder input ``test/`` gives ``<output>/test/<its relative path>.png`` overlays, a
file input ``<output>/<stem>.png`` (with as many parent folders as it takes to tell file inputs of the same name
apart); two inputs that would still write the same name are refused before any work. Every
file is first written to ``<output>.partial`` and the folder is moved into place only when the run completes, so a
failed run leaves no output looking complete (and an earlier output untouched). An existing, non-empty output
folder is refused unless ``--overwrite``, which replaces it wholly. Files in input folders that are not images are
listed, never skipped in silence.

Example:
    isstad-predict results/weights/openvino/model.xml ../shared/data/magnetic_tile/test/crack --output overlays
    isstad-predict results/Isstad/MVTecAD/magnetic_tile/latest/weights/lightning/model.ckpt images/
"""

from __future__ import annotations

import argparse
import csv
import inspect
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from isstad_plugin.data_checks import IMAGE_SUFFIXES, unreadable_reason
from isstad_plugin.report import THUMBNAILS, ReportEntry, RunInfo, write_report, write_thumbnail

# OpenVINO's CPU plugin computes in BF16 by default on CPUs that have it (AVX-512 BF16, AMX) and in FP32
# elsewhere, so the same model scores differently from one machine to the next unless the precision is named.
# f32 (the default here) matches torch on every CPU; bf16 is faster on CPUs with BF16 instructions at a cost
# measured in docs/benchmarks/precision.md (python -m benchmarks.precision); f16 is for GPUs.
# The model cache is switched off: anomalib's OpenVINOInferencer caches compiled models in ./openvino_cache, and
# OpenVINO (2026.4) keys that cache without the precision hint, so a model compiled at f32 and then loaded at bf16
# (or the reverse) reused the other's blob: every bf16 score came out 0.0, every "f32" score was bf16's.
PRECISIONS = ("f32", "bf16", "f16")


def openvino_config(precision: str = "f32") -> dict[str, str]:
    """OpenVINO compile config that fixes the inference precision (``f32``, ``bf16`` or ``f16``), uncached."""
    if precision not in PRECISIONS:
        msg = f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}."
        raise ValueError(msg)
    return {"INFERENCE_PRECISION_HINT": precision, "CACHE_DIR": ""}


@dataclass
class PredictionPlan:
    """What a prediction run reads and writes: ``(image, overlay name relative to the output)`` pairs, and the
    files of input folders that are not images (listed to the user, never predicted)."""

    images: list[tuple[Path, Path]] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


def plan_predictions(inputs: Sequence[Path]) -> PredictionPlan:
    """Images of ``inputs`` and collision-free overlay names mirroring them (see the module docstring).

    Raises:
        FileNotFoundError: an input does not exist, or a folder holds no image.
        ValueError: two inputs would write the same overlay (e.g. two folders of the same name).
    """
    plan, owners = PredictionPlan(), {}
    file_names = _shortest_unique_names([path for path in inputs if path.is_file()])
    for path in inputs:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
            plan.skipped.extend(p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES)
            if not images:
                msg = f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {path}."
                raise FileNotFoundError(msg)
            named = [(p, Path(path.resolve().name) / p.relative_to(path).with_suffix(".png")) for p in images]
        elif path.is_file():
            named = [(path, file_names[path])]
        else:
            msg = f"Input {path} does not exist."
            raise FileNotFoundError(msg)
        for image, name in named:
            if name in owners and owners[name] != image:
                msg = (f"{owners[name]} and {image} would both write {name}: give inputs with distinct names "
                       "(e.g. the common parent folder instead of two folders of the same name).")
                raise ValueError(msg)
            owners[name] = image
            plan.images.append((image, name))
    return plan


def read_rgb(path: Path) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB; grayscale, RGBA and 16-bit files are converted. Fails on unreadable files."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        msg = f"Cannot read image {path} (corrupt, truncated or not an image)."
        raise ValueError(msg)
    if image.dtype == np.uint16:
        image = (image / 257).round().astype(np.uint8)
    elif image.dtype != np.uint8:
        msg = f"Unsupported pixel type {image.dtype} in {path}; expected 8- or 16-bit."
        raise ValueError(msg)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class ExportedModel:
    """An exported anomalib model; ``__call__`` takes ``[B, 3, H, W]`` float32 in [0, 1], returns its outputs."""

    def __init__(self, path: Path, runtime: str = "openvino", device: str = "CPU", precision: str = "f32") -> None:
        if not path.is_file():
            msg = f"Model file {path} does not exist."
            raise FileNotFoundError(msg)
        self.runtime = runtime
        if runtime == "openvino":
            from anomalib.deploy import OpenVINOInferencer

            from isstad_plugin.signal_stack import keep_signal_stack

            with keep_signal_stack():  # OpenVINO's compiled model must not leave the thread a freed signal stack
                self.inferencer = OpenVINOInferencer(path, device=device, config=openvino_config(precision))
            shape = self.inferencer.input_blob.get_partial_shape()
            dims = [d.get_length() if d.is_static else None for d in shape]
        elif runtime == "onnxruntime":
            import onnxruntime as ort

            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            dims = [d if isinstance(d, int) else None for d in self.session.get_inputs()[0].shape]
        else:
            msg = f"runtime must be 'openvino' or 'onnxruntime', got {runtime!r}."
            raise ValueError(msg)
        self.input_size = (dims[2], dims[3]) if dims[2] and dims[3] else None
        kind = "OpenVINO IR" if path.suffix == ".xml" else "ONNX file"
        where = f"OpenVINO on {device}, {precision}" if runtime == "openvino" else "ONNX Runtime on the CPU, f32"
        self.source = f"{kind}, {where}"
        # the graph holds anomalib's post-processing, which normalises the scores so that the model's learned image
        # threshold lands on 1 - sensitivity (0.5: the sensitivity our models keep at anomalib's default)
        self.threshold = 0.5
        self.threshold_note = "on normalised scores: the exported graph maps the model's learned threshold there"

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self.runtime == "openvino":
            result = self.inferencer.predict(batch)
            return {k: np.asarray(getattr(result, k)) for k in ("pred_score", "pred_label", "anomaly_map", "pred_mask")}
        names = [o.name for o in self.session.get_outputs()]
        outputs = self.session.run(None, {self.session.get_inputs()[0].name: batch})
        return dict(zip(names, outputs, strict=True))


class CheckpointModel:
    """A trained ISSTAD or CutPaste from its Lightning checkpoint, run in torch eval on the CPU in FP32: the same
    pipeline as its export (pre-processing, network, scoring, post-processing); ``__call__`` as
    :class:`ExportedModel`'s."""

    def __init__(self, path: Path) -> None:
        self.module = load_trained_model(path).eval()
        self.input_size = (int(self.module.hparams.image_size),) * 2
        self.source = f"Lightning checkpoint of {type(self.module).__name__}, torch on the CPU, f32"
        post = self.module.post_processor
        self.threshold = float(post.normalized_image_threshold)
        self.threshold_note = (f"on normalised scores; the learned image threshold is {float(post.image_threshold):.4g} "
                               "in the model's raw scores")

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            result = self.module(torch.from_numpy(batch))
        return {k: getattr(result, k).float().numpy() for k in ("pred_score", "pred_label", "anomaly_map", "pred_mask")}


def load_trained_model(path: Path) -> Any:  # noqa: ANN401 (an AnomalibModule; imported lazily)
    """The ISSTAD or CutPaste model a Lightning checkpoint holds, with the options it was trained with.

    Read as anomalib's Engine reads it (``weights_only`` with anomalib's allow-list, our file checks); the model is
    chosen by the options the checkpoint holds, built with them and given the trained state.
    """
    from isstad_plugin.models import Cutpaste, Isstad
    from isstad_plugin.models.components.checkpoints import read_checkpoint

    if not path.is_file():
        msg = f"Model file {path} does not exist."
        raise FileNotFoundError(msg)
    checkpoint = read_checkpoint(path)
    options = set(checkpoint.get("hyper_parameters") or {})
    fitting = [cls for cls in (Isstad, Cutpaste) if options and options <= set(inspect.signature(cls).parameters)]
    if len(fitting) != 1 or "state_dict" not in checkpoint:
        msg = (f"{path} is not a checkpoint of ISSTAD or CutPaste (its options: {sorted(options)[:8]}); pass the "
               "model.ckpt an `anomalib train` of one of them wrote, or an exported .xml/.onnx.")
        raise ValueError(msg)
    model = fitting[0]()
    model.adopt_checkpoint_options(checkpoint)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    return model


def load_model(path: Path, runtime: str = "openvino", device: str = "CPU",
               precision: str = "f32") -> CheckpointModel | ExportedModel:
    """:class:`CheckpointModel` for a ``.ckpt`` (torch, FP32, CPU), else :class:`ExportedModel`."""
    if path.suffix != ".ckpt":
        return ExportedModel(path, runtime, device, precision)
    if precision != "f32" or device != "CPU":
        msg = f"A checkpoint runs in torch on the CPU in FP32: leave out --precision and --device for {path}."
        raise ValueError(msg)
    return CheckpointModel(path)


def prepare(image: np.ndarray, input_size: tuple[int, int] | None) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` -> ``[1, 3, h, w]`` float32 in [0, 1] at the model's input size.

    Resized as the models' pre-processor resizes what they are trained and tested on (torchvision's bilinear
    ``Resize(antialias=True)`` on [0, 1] floats): Pillow's bilinear resize of float images is the same filter
    (equal within 1e-5), without torch. OpenCV's ``INTER_AREA``, used before, differed by up to 0.006 on average per
    pixel on magnetic_tile, most on images scaled up.
    """
    pixels = image.astype(np.float32) / 255.0
    if input_size is not None and pixels.shape[:2] != tuple(input_size):
        size = (input_size[1], input_size[0])
        pixels = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(pixels[..., channel])).resize(
            size, Image.Resampling.BILINEAR)) for channel in range(pixels.shape[2])], axis=-1)
    return pixels.transpose(2, 0, 1)[None]


def overlay(image: np.ndarray, anomaly_map: np.ndarray, pred_mask: np.ndarray, score: float, label: bool) -> np.ndarray:
    """Original image | anomaly map blended over it with the predicted region outlined, as BGR uint8."""
    height, width = image.shape[:2]
    amap = cv2.resize(np.clip(anomaly_map.squeeze(), 0, 1).astype(np.float32), (width, height))
    heat = cv2.applyColorMap((amap * 255).astype(np.uint8), cv2.COLORMAP_JET)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    blended = cv2.addWeighted(bgr, 0.55, heat, 0.45, 0)
    mask = cv2.resize(pred_mask.squeeze().astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(blended, contours, -1, (255, 255, 255), max(1, min(height, width) // 200))
    text = f"{'ANOMALOUS' if label else 'normal'} {score:.3f}"
    cv2.putText(blended, text, (5, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return np.hstack([bgr, blended])


def _shortest_unique_names(files: list[Path]) -> dict[Path, Path]:
    """Overlay names of file inputs: the file name, or as many parent folders as it takes to tell the files
    apart (``blowhole/000.png`` and ``crack/000.png``)."""
    names = {}
    for file in files:
        parts = file.resolve().with_suffix(".png").parts
        depth = 1
        while depth < len(parts) and any(other.resolve().with_suffix(".png").parts[-depth:] == parts[-depth:]
                                         for other in files if other.resolve() != file.resolve()):
            depth += 1
        names[file] = Path(*parts[-depth:])
    return names


def unreadable_images(plan: PredictionPlan) -> list[tuple[Path, str]]:
    """``(file, why)`` for every image of ``plan`` that cannot be read, checked before any work."""
    reasons = ((path, unreadable_reason(path)) for path, _ in plan.images)
    return [(path, reason) for path, reason in reasons if reason is not None]


def predict_paths(
    model_path: Path,
    inputs: Sequence[Path],
    output: Path,
    runtime: str = "openvino",
    device: str = "CPU",
    precision: str = "f32",
    overwrite: bool = False,
    plan: PredictionPlan | None = None,
    skip_unreadable: bool = False,
    report: bool = True,
) -> list[dict[str, object]]:
    """Predict every image; write overlays mirroring the inputs, ``predictions.csv`` and ``report.html`` into
    ``output``, and return the CSV's rows.

    ``precision`` is OpenVINO's inference precision (see :data:`PRECISIONS`); ONNX Runtime runs in FP32. Files
    go to ``<output>.partial`` first; ``output`` appears (or is replaced, with ``overwrite``) only when all are
    written. A non-empty ``output`` without ``overwrite`` is refused before any work, and so are unreadable images
    (all named in one error) unless ``skip_unreadable``, which scores the rest and lists them as unreadable.
    """
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        msg = (f"Output folder {output} exists and is not empty: choose another --output, or pass --overwrite to "
               "replace it wholly (its current files are deleted when the new run completes).")
        raise FileExistsError(msg)
    started, clock = datetime.now().astimezone(), time.perf_counter()
    plan = plan or plan_predictions(inputs)
    unreadable = dict(unreadable_images(plan))
    if unreadable and not skip_unreadable:
        listed = "\n  ".join(f"{path}: {reason}" for path, reason in unreadable.items())
        msg = (f"{len(unreadable)} unreadable image file(s):\n  {listed}\nFix or remove them, or pass "
               "--skip-unreadable to score the rest (they are then listed as unreadable in predictions.csv and "
               "report.html); nothing was predicted.")
        raise ValueError(msg)
    model = load_model(model_path, runtime, device, precision)
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # a crashed earlier run's leftovers
    rows, entries = [], []
    try:
        for path, name in plan.images:
            shown = name.with_suffix(path.suffix).as_posix()  # the card's name: the input's path, as mirrored
            try:
                if path in unreadable:
                    raise ValueError(unreadable[path])
                image = read_rgb(path)
            except ValueError as error:  # read_rgb's: a file that passed the check but does not decode
                if not skip_unreadable:
                    raise
                rows.append({"image": str(path), "pred_score": "", "pred_label": "", "overlay": "",
                             "status": f"unreadable: {error}"})
                entries.append(ReportEntry(image=str(path), name=shown, problem=str(error)))
                continue
            result = model(prepare(image, model.input_size))
            score, label = float(result["pred_score"].reshape(-1)[0]), bool(result["pred_label"].reshape(-1)[0])
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            drawn = overlay(image, result["anomaly_map"][0], result["pred_mask"][0], score, label)
            if not cv2.imwrite(str(target), drawn):
                msg = f"Could not write {target} (disk full or folder not writable?)."
                raise OSError(msg)
            rows.append({"image": str(path), "pred_score": score, "pred_label": int(label),
                         "overlay": str(output / name), "status": "scored"})
            if report:
                thumbnail = THUMBNAILS / name.with_suffix(".jpg")
                size = write_thumbnail(drawn, staging / thumbnail)
                entries.append(ReportEntry(image=str(path), name=shown, score=score, flagged=label, overlay=name,
                                           thumbnail=thumbnail, thumbnail_size=size))
        with (staging / "predictions.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        if report:
            disagree = sum((e.score >= model.threshold) != e.flagged for e in entries if e.problem is None)
            note = model.threshold_note + (f"; {disagree} label(s) disagree with it" if disagree else "")
            write_report(staging, entries, RunInfo(
                model=model_path, source=model.source, threshold=model.threshold, threshold_note=note,
                started=started.isoformat(sep=" ", timespec="seconds"), seconds=time.perf_counter() - clock))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():  # --overwrite: the old folder goes only now that the new one is complete
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    staging.rename(output)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="isstad-predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="exported model (OpenVINO .xml or .onnx) or a Lightning .ckpt of "
                                                 "ISSTAD or CutPaste")
    parser.add_argument("inputs", type=Path, nargs="+", help="image files and/or folders")
    parser.add_argument("--output", type=Path, default=Path("predictions"), help="folder for overlays and CSV")
    parser.add_argument("--runtime", choices=["openvino", "onnxruntime"], default="openvino")
    parser.add_argument("--device", default="CPU", help="OpenVINO device (CPU, GPU, AUTO)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing, non-empty output folder (only once the new run completes)")
    parser.add_argument("--precision", choices=PRECISIONS, default="f32",
                        help="OpenVINO inference precision (default f32: the same scores as torch on every CPU; "
                             "bf16 is faster on CPUs with BF16 instructions, see docs/deployment.md)")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="score the readable images and list unreadable files (truncated, not an image) as "
                             "unreadable in predictions.csv and report.html (default: name them all and stop)")
    parser.add_argument("--no-report", action="store_true", help="write no report.html (and no thumbnails)")
    args = parser.parse_args(argv)
    try:
        plan = plan_predictions(args.inputs)
        for path in plan.skipped:
            print(f"skipped (not an image): {path}", file=sys.stderr)
        rows = predict_paths(args.model, args.inputs, args.output, args.runtime, args.device, args.precision,
                             args.overwrite, plan, skip_unreadable=args.skip_unreadable, report=not args.no_report)
    except (FileNotFoundError, FileExistsError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    scored = [row for row in rows if row["status"] == "scored"]
    flagged = sum(row["pred_label"] for row in scored)
    skipped = f"; {len(plan.skipped)} non-image files skipped (listed above)" if plan.skipped else ""
    unreadable = [row["image"] for row in rows if row["status"] != "scored"]
    for image in unreadable:
        print(f"unreadable (listed in predictions.csv and the report): {image}", file=sys.stderr)
    unread = f"; {len(unreadable)} unreadable (listed above)" if unreadable else ""
    written = "overlays, predictions.csv" + ("" if args.no_report else " and report.html")
    print(f"{len(scored)} images, {flagged} anomalous{unread}{skipped}; {written} in {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
