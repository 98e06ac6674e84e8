"""One benchmark row in its own process: train, test, export to OpenVINO, time both runtimes.

The row's metrics are scored at each image's original resolution (:mod:`.scoring`, the same code for every model);
anomalib's own test figures, at the model's input size, are kept beside them as ``<metric>_anomalib``.

``python -m isstad_plugin.benchmark.job SPEC.json RESULT.json`` (``isstad-benchmark`` calls it). The
result is written only when every step finished, so a crashed or killed row leaves no result behind.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

import torch

from isstad_plugin.data_checks import IMAGE_SUFFIXES

from .report import METRICS
from .scoring import score_module
from .timing import cpu_label, time_calls

# anomalib's Evaluator names of the metrics (``image_F1Score``), as the test run reports them
ANOMALIB_NAMES = {"image_F1": "image_F1Score", "pixel_F1": "pixel_F1Score"}


def resolve_backbone(run: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's init_args with the chosen backbone merged in, and what the report says about it."""
    init_args = dict(run["model"].get("init_args") or {})
    if run["backbones"]:
        from isstad_plugin.backbones import pick_backbone, weights_source

        chosen = pick_backbone([candidate["backbone"] for candidate in run["backbones"]])
        init_args.update(next(c for c in run["backbones"] if c["backbone"] == chosen))
        return init_args, {"backbone": chosen, "pretrained": "yes", "weights": weights_source(chosen)}
    weights = init_args.get("weights")
    return init_args, {"backbone": str(init_args.get("backbone", "-")),
                       "pretrained": "yes" if weights else "no",
                       "weights": str(weights) if weights else "random init, trained here"}


def build_datamodule(data: dict[str, Any], split_seed: int) -> Any:
    """anomalib's ``get_datamodule`` on ``{class_path, init_args}``; its random splits use ``split_seed`` (an explicit
    integer: ``data.init_args.seed`` is refused, the benchmark's ``seed`` sets the split)."""
    from anomalib.data import get_datamodule

    if "seed" in (data.get("init_args") or {}):
        msg = "data.init_args.seed is set by the benchmark (its top-level 'seed' makes the split); remove it."
        raise ValueError(msg)
    init_args = {**(data.get("init_args") or {}), "seed": int(split_seed)}
    folder = Path(init_args.get("root", ".")) / init_args.get("category", "")
    if "root" in init_args and not folder.is_dir():
        msg = f"Data folder {folder} does not exist; set data.init_args.root."
        raise FileNotFoundError(msg)
    datamodule = get_datamodule({"class_path": data["class_path"], "init_args": init_args})
    if str(getattr(datamodule, "val_split_mode", "")).lower().endswith("same_as_test"):
        msg = ("data.init_args.val_split_mode is same_as_test: thresholds would be chosen on the test images. "
               "Use val_split_mode: from_test (a disjoint half of the test folder) or synthetic.")
        raise ValueError(msg)
    return datamodule


def first_test_image(root: Path, size: tuple[int, int]) -> torch.Tensor:
    """A real test image of the category as ``[1, 3, H, W]`` float in [0, 1] at the export size."""
    from isstad_plugin.deploy import prepare, read_rgb

    files = sorted(p for p in (root / "test").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        msg = f"No test images under {root / 'test'} to time inference on."
        raise FileNotFoundError(msg)
    return torch.from_numpy(prepare(read_rgb(files[0]), size)).contiguous()  # resized as the model's pre-processor


def export_size(model: Any) -> tuple[int, int]:
    """The input size timed for both runtimes: Isstad's fixed training size, else anomalib's 256 px default."""
    size = getattr(model.hparams, "image_size", None)
    return (int(size), int(size)) if size else (256, 256)


def inference_ms(
    model: Any, ir_path: Path, image: torch.Tensor, threads: int, repeats: int,
) -> tuple[float, float]:
    """Median batch-1 latency (ms) of torch eager and of OpenVINO FP32, whole pipeline incl. pre/post-processing."""
    import openvino as ov

    from isstad_plugin.deploy import openvino_config
    from isstad_plugin.signal_stack import keep_signal_stack

    model.eval()
    with torch.inference_mode():
        torch_ms = median(time_calls(lambda: model(image), repeats, warmup=3)) * 1e3
    core = ov.Core()
    # FP32 named explicitly: on CPUs with BF16 instructions OpenVINO would otherwise compute in BF16.
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", **openvino_config("f32")}
    with keep_signal_stack():  # OpenVINO's compiled model must not leave the thread a freed signal stack
        compiled = core.compile_model(ir_path, "CPU", config)
    array = image.numpy()
    openvino_ms = median(time_calls(lambda: compiled(array), repeats, warmup=3)) * 1e3
    return torch_ms, openvino_ms


def load_trained(model: Any, source: Path) -> tuple[float, float, float | None]:  # noqa: ANN401
    """Load the network another run trained (its newest ``model.ckpt`` under ``source``) into ``model``; only what a
    scoring learns at validation (the feature memory) may be missing. Returns that run's training seconds, peak
    memory (MB) and the other processes' load during its training (%, None if unrecorded), which a rescoring row
    reports as its own (the load: the larger of the two)."""
    result = source / "result.json"
    checkpoints = sorted(source.rglob("model.ckpt"), key=lambda path: path.stat().st_mtime)
    if not result.is_file() or not checkpoints:
        msg = f"{source} holds no finished row to rescore: run that row first (it is listed before this one)."
        raise FileNotFoundError(msg)
    from isstad_plugin.models.components.checkpoints import read_checkpoint

    state = read_checkpoint(checkpoints[-1])["state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not key.startswith("model.feature_memory.") for key in missing):
        msg = (f"{checkpoints[-1]} does not fit this run's network (missing {missing}, unexpected {unexpected}): a "
               "rescoring run may change scoring options only.")
        raise ValueError(msg)
    row = json.loads(result.read_text())
    load = row.get("other_load_pct")
    return float(row["train_min"]) * 60, float(row["peak_rss_MB"]), (float(load) if load is not None else None)


def run_job(spec: dict[str, Any], work_dir: Path) -> dict[str, Any]:
    """Train and test one (model, category) row; return its report row."""
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine
    from anomalib.models import get_model
    from lightning.pytorch import seed_everything

    from isstad_plugin.models.components.evaluation import image_and_pixel_evaluator

    run, threads = spec["run"], spec["threads"]
    torch.set_num_threads(threads)
    seed_everything(spec["seed"], workers=True)
    init_args, backbone = resolve_backbone(run)
    # anomalib's name lookup (every AnomalibModule subclass, ours included); plain keyword arguments.
    model = get_model(run["model"]["class_path"].rpartition(".")[2], **init_args, evaluator=image_and_pixel_evaluator())
    datamodule = build_datamodule(spec["data"], spec["split_seed"])
    engine = Engine(default_root_dir=work_dir, max_epochs=run["max_epochs"], logger=False, **spec["trainer"])

    if run.get("rescores"):  # the trained network of another run, scored with this run's options
        train_s, source_peak_mb, source_load = load_trained(model, Path(spec["rescores_dir"]))
        engine.validate(model=model, datamodule=datamodule)  # what the scoring learns; thresholds
    else:
        start = time.perf_counter()
        engine.fit(model=model, datamodule=datamodule)
        train_s, source_peak_mb, source_load = time.perf_counter() - start, 0.0, None
    anomalib_metrics = engine.test(model=model, datamodule=datamodule)[0]  # at the input size (anomalib's default)
    peak_rss_mb = max(source_peak_mb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    metrics = score_module(model, datamodule)  # at each image's original size: the benchmark's figures

    size = export_size(model)
    # A static batch-1 graph: the latency measured is batch 1, and anomalib's dynamic-batch PatchCore export
    # bakes the example batch into its upsampling (its IR cannot be reshaped to batch 1).
    ir_path = engine.export(model=model, export_type=ExportType.OPENVINO, export_root=work_dir / "export",
                            input_size=size, onnx_kwargs={"dynamic_shapes": None})
    image = first_test_image(Path(spec["data"]["init_args"]["root"]) / spec["category"], size)
    torch_ms, openvino_ms = inference_ms(model, Path(ir_path), image, threads, spec["latency_repeats"])

    def metric(source: dict[str, float], name: str) -> float:
        if name not in source:
            msg = f"The test run reported no {name} (got {sorted(source)})."
            raise KeyError(msg)
        return round(float(source[name]), 4)

    return {
        "model": run["name"],
        "category": spec["category"],
        "class": run["model"]["class_path"].rpartition(".")[2],
        **backbone,
        **{name: metric(metrics, name) for name in METRICS},
        **{f"{name}_anomalib": metric(anomalib_metrics, ANOMALIB_NAMES.get(name, name)) for name in METRICS},
        "epochs": run["max_epochs"],
        "train_min": round(train_s / 60, 2),
        "torch_ms": round(torch_ms, 1),
        "openvino_ms": round(openvino_ms, 1),
        "input_px": f"{size[0]}x{size[1]}",
        "peak_rss_MB": round(peak_rss_mb),
        "params_M": round(sum(p.numel() for p in model.model.parameters()) / 1e6, 2),
        "seed": spec["seed"],
        "torch": torch.__version__,
        "cpu": cpu_label(),
        **({"source_other_load_pct": source_load} if run.get("rescores") else {}),
    }


def main(argv: list[str] | None = None) -> None:
    spec_path, result_path = map(Path, argv or sys.argv[1:])
    spec = json.loads(spec_path.read_text())
    row = run_job(spec, spec_path.parent)
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    tmp.replace(result_path)


if __name__ == "__main__":
    main()
