"""``--export_type openvino`` with and without the ONNX exporter's graph optimiser, side by side.

Run by hand on a quiet machine: ``python -m benchmarks.openvino_export``. Writes ``docs/benchmarks/openvino-export.md``
entirely. anomalib's OpenVINO export writes an ONNX file first and converts it; our models skip the ONNX exporter's
optimiser (onnxscript's rewrite passes) for that intermediate file (``SafeFilesMixin.to_openvino``). This page is the
evidence: export seconds, and the batch-1 latency and outputs of the two OpenVINO models, alternated in one run.
The model is ISSTAD at ``configs/isstad_tiny.yaml``'s size, randomly initialised (weights change neither cost).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.common import DOCS, machine, markdown_table, median, time_calls, write_page
from isstad_plugin.deploy import openvino_config

ROUNDS = 3  # alternated exports per setting
LATENCY_ROUNDS, CALLS = 5, 100  # alternated latency rounds per setting, calls per round


def export(model: torch.nn.Module, root: Path, optimize: bool) -> tuple[Path, float]:
    """The OpenVINO export of ``model`` under ``root`` and its wall-clock seconds."""
    start = time.perf_counter()
    path = model.to_openvino(root, onnx_kwargs={"optimize": optimize})
    return Path(path), time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DOCS / "openvino-export.md")
    args = parser.parse_args(argv)
    import openvino as ov

    from isstad_plugin import Isstad

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = Isstad(backbone="vit_tiny", image_size=128, decoder_embed_dim=128, decoder_depth=2,
                   decoder_num_heads=4).eval()
    seconds: dict[bool, list[float]] = {True: [], False: []}
    paths: dict[bool, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in tqdm(range(ROUNDS), desc="exports"):
            for optimize in (True, False):
                paths[optimize], elapsed = export(model, Path(tmp) / f"{optimize}-{round_}", optimize)
                seconds[optimize].append(elapsed)
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": 2, "PERFORMANCE_HINT": "LATENCY", **openvino_config("f32")}
        compiled = {optimize: core.compile_model(str(path), "CPU", config) for optimize, path in paths.items()}
        image = np.random.default_rng(0).random((1, 3, 128, 128), dtype=np.float32)
        outputs = {optimize: {out.get_any_name(): value for out, value in c(image).items()}
                   for optimize, c in compiled.items()}
        latency: dict[bool, list[float]] = {True: [], False: []}
        for _ in tqdm(range(LATENCY_ROUNDS), desc="latency rounds"):
            for optimize, c in compiled.items():
                latency[optimize].append(median(time_calls(lambda c=c: c(image), CALLS, warmup=10)) * 1e3)
        layers = {optimize: len(c.get_runtime_model().get_ordered_ops()) for optimize, c in compiled.items()}
        del compiled
    difference = max(float(np.max(np.abs(outputs[True][name].astype(np.float64) - outputs[False][name])))
                     for name in outputs[True])
    rows = [["on (onnxscript's rewrite passes)" if optimize else "off (our default for `--export_type openvino`)",
             f"{median(seconds[optimize]):.1f}", f"{median(latency[optimize]):.2f}",
             " / ".join(f"{value:.2f}" for value in latency[optimize]), layers[optimize]]
            for optimize in (True, False)]
    ratio = median(seconds[False]) / median(seconds[True])
    lines = [
        "# OpenVINO export with and without the ONNX exporter's optimiser",
        "",
        f"Command: `python -m benchmarks.openvino_export`. Machine: {machine()}.",
        "",
        ("ISSTAD at `configs/isstad_tiny.yaml`'s size (ViT-tiny, 128 px), randomly initialised, exported by "
        "`model.to_openvino` (what `anomalib export --export_type openvino` runs) with `onnx_kwargs={'optimize': ...}`; "
        f"{ROUNDS} exports per setting and {LATENCY_ROUNDS} latency rounds of {CALLS} batch-1 calls, alternated "
        "(2 threads, OpenVINO's latency hint, FP32)."),
        "",
        markdown_table(["ONNX optimiser", "export s (median)", "latency ms (median of rounds)", "each round's median ms",
                        "runtime layers"], rows),
        "",
        (f"Export time without the optimiser: {ratio:.2f} of the time with it. Largest difference between the two "
        f"models' outputs on one image: {difference:.2e}."),
        "",
    ]
    write_page(args.output, lines)


if __name__ == "__main__":
    main()
