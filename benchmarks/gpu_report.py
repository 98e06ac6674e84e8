"""``docs/benchmarks/gpu.md`` from the files the GPU run wrote (``benchmarks/device_run.py``), or, before any run,
the page that says none was made and how to make one.

    python -m benchmarks.gpu_report [FOLDER]

FOLDER holds ``environment.json``, ``throughput.json`` and, if they got that far, ``training.json`` and
``training_cpu_recipe.json`` (the device tool puts a run's ``$OUT`` files under its ``files_at`` folder). They are
copied into ``docs/benchmarks/gpu/`` (the published results, as the benchmarks' CSVs are) and the page is written
from there; without FOLDER the page is written again from what is published.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.common import DOCS, markdown_table, write_page

PAGE, RESULTS = DOCS / "gpu.md", DOCS / "gpu"
RESULT_FILES = ("environment.json", "throughput.json", "training.json", "training_cpu_recipe.json")
HOW = [
    "## How to run it",
    "",
    "On this machine (no GPU needed), once per session: `python -m benchmarks.device_prepare` downloads the wheels",
    "the GPU machine lacks (named in `benchmarks/device_wheels.txt`, each at the version installed where it runs)",
    "into `.whl/`, with the resolved list beside them (`.whl/carried.txt`), copies `magnetic_tile` into",
    "`.device-data/` (both git-ignored), checks they fit the 64 MiB a device call carries, and prints the call.",
    "In a session lent a GPU, the device tool's",
    "`run(command=\"bash benchmarks/device_run.sh\", carry=[\".whl\", \".device-data\"], timeout_s=480)` runs",
    "everything in one call (its own budget, 400 s, stops starting new work well inside the 8 minutes); then",
    "`python -m benchmarks.gpu_report <files_at folder>` writes this page from the files it returned.",
    "`tests/test_device_run.py` runs the same command on the CPU at a tiny size, with only the GPU machine's",
    "packages and the carried wheels importable, so the call does not fail on a missing wheel or a typo.",
]


def load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}"


def throughput_table(data: dict[str, Any]) -> list[str]:
    rows = []
    for precision, row in data["precisions"].items():
        for stage in (1, 2):
            rate = row.get(f"stage{stage}")
            if rate is None:
                continue
            rows.append([precision, stage, fmt(rate["images_per_s"]), fmt(rate["seconds_per_epoch"]),
                         fmt(rate["achieved_tflops"]), f"{100 * rate['fraction_of_bf16_peak']:.1f} %",
                         fmt(row.get("peak_gpu_memory_gb"))])
    flops = data["flops_per_image"]
    return [
        "## Throughput of the paper's network (batch "
        f"{data['batch']}, {data['epochs_per_stage']} epochs of each stage per precision)", "",
        markdown_table(["precision", "stage", "images/s", "s/epoch", "achieved TFLOP/s",
                        f"of the {data['bf16_peak_tflops']:.0f} TFLOP/s bf16 peak", "peak GPU GB"], rows), "",
        f"FLOPs per training image (forward, loss, backward; `torch.utils.flop_counter`): stage 1 "
        f"{flops['1'] / 1e9:.1f} GFLOP, stage 2 {flops['2'] / 1e9:.1f} GFLOP. Speeds are medians over each stage's "
        "epochs after its first, timed on the real anomalib Engine (data loading, Lightning and the corruption "
        "included).",
    ]


def training_section(title: str, data: dict[str, Any]) -> list[str]:
    metrics = data["metrics"]
    planned, trained = data["planned_epochs"], data["trained_epochs"]
    lines = [f"## {title}", "",
             markdown_table(["category", "epochs (stage 1 + 2)", "train min", "image AUROC", "pixel AUROC", "AUPRO",
                             "peak GPU GB"],
                            [[data["category"], f"{trained[0]} + {trained[1]}", fmt(data["train_s"] / 60),
                              fmt(metrics.get("image_AUROC")), fmt(metrics.get("pixel_AUROC")),
                              fmt(metrics.get("pixel_AUPRO")), fmt(data.get("peak_gpu_memory_gb"))]]), ""]
    if data["shortened"]:
        lines.append(f"**Shortened:** planned {planned[0]} + {planned[1]} epochs; the measured speed (or the run's "
                     f"time limit) allowed {trained[0]} + {trained[1]}.")
    lines.append(f"{data['precision']}, batch {data['batch']}, from random initialisation (no MAE weights can be "
                 "fetched there); metrics on magnetic_tile's test half at each image's original resolution, "
                 "thresholds from the validation half (split seed 42), as in the CPU benchmark.")
    return lines


def page(folder: Path | None) -> list[str]:
    lines = ["# ISSTAD on one GPU: the paper's setting, end to end", ""]
    environment = load(folder, "environment.json") if folder else None
    if environment is None:
        return [*lines, "**No GPU run has been made yet**: the sessions so far had no GPU machine. The command below "
                "is ready and runs in the test suite on the CPU at a tiny size; the figures will be published here "
                "by the first session lent a GPU.", "", *HOW, ""]
    packages = ", ".join(f"{name} {version}" for name, version in environment["packages"].items())
    carried = ", ".join(f"{name} {version}" for name, version in environment.get("carried_wheels", {}).items())
    lines += [f"Machine: {environment.get('gpu', environment['device'])} "
              f"({environment.get('gpu_memory_gb', '-')} GB, driver {environment.get('driver', '-')}, CUDA "
              f"{environment.get('torch_cuda')}), {environment['cpu']} ({environment['cpu_count']} cores), Python "
              f"{environment['python']}.", f"Packages: {packages}.", "",
              f"Carried wheels (the versions of the environment `device_prepare` ran from): {carried or 'none'}.",
              "",
              "Command: `bash benchmarks/device_run.sh` (see below); page: `python -m benchmarks.gpu_report FOLDER`.",
              ""]
    if (throughput := load(folder, "throughput.json")) is not None:
        lines += [*throughput_table(throughput), ""]
    if (training := load(folder, "training.json")) is not None:
        lines += [*training_section("The paper's setting from scratch (ViT-L/16, 224 px)", training), ""]
    if (recipe := load(folder, "training_cpu_recipe.json")) is not None:
        lines += [*training_section("The CPU recipe with four times its epochs (ViT-tiny, 128 px)", recipe), ""]
    return [*lines, *HOW, ""]


def publish_results(folder: Path, results: Path) -> None:
    """Replace the published results with ``folder``'s (a run's files, logs left out)."""
    if not (folder / "environment.json").is_file():
        msg = f"{folder} holds no environment.json: not the output of benchmarks/device_run.sh"
        raise SystemExit(msg)
    results.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        (results / name).unlink(missing_ok=True)
        if (folder / name).is_file():
            (results / name).write_text((folder / name).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, nargs="?", help="the files a GPU run returned (none: the published)")
    parser.add_argument("--page", type=Path, default=PAGE)
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the published results are kept")
    args = parser.parse_args(argv)
    if args.folder is not None:
        publish_results(args.folder, args.results)
    write_page(args.page, page(args.results if (args.results / "environment.json").is_file() else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
