"""Inference latency and throughput of ISSTAD: torch eager vs ONNX Runtime vs OpenVINO (FP32, FP16).

Run by hand on a quiet machine: ``python -m benchmarks.inference`` (``--quick`` for a short check). Writes
``docs/benchmarks/inference.md`` and ``docs/benchmarks/inference.png``. Every runtime runs the whole exported
graph (resize, network, fused scoring, anomalib post-processing) with the same number of threads; the models
are randomly initialised (weights do not change the cost).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from benchmarks.common import DOCS, machine, markdown_table, matmul_peak_gflops, median, p90, time_calls
from isstad_plugin.deploy import openvino_config

# Decoders sized with their encoders (the tiny one is configs/isstad_tiny.yaml's; base is the MAE release's).
VARIANTS = {
    "vit_tiny": {"decoder_embed_dim": 128, "decoder_depth": 2, "decoder_num_heads": 4},
    "vit_small": {"decoder_embed_dim": 256, "decoder_depth": 4, "decoder_num_heads": 8},
    "vit_base": {"decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16},
}


def build(variant: str, image_size: int):  # noqa: ANN201
    from isstad_plugin import Isstad

    torch.manual_seed(0)
    return Isstad(backbone=variant, image_size=image_size, **VARIANTS[variant]).eval()


def gflops_per_image(model, image_size: int) -> float:  # noqa: ANN001
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.rand(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


def runners(model, onnx_path: Path, ir_fp32: Path, ir_fp16: Path, threads: int) -> dict:
    """Callables ``batch -> outputs`` per runtime, all on ``threads`` threads.

    OpenVINO runs the exported IR twice: as exported (dynamic batch, compiled once for any batch size) and
    reshaped to the batch's static shape before compiling (what a deployment with a fixed batch does; the
    plugin then picks kernels for known shapes). FP16 uses the static shape too.
    """
    import onnxruntime as ort
    import openvino as ov

    def torch_eager(batch: np.ndarray) -> object:
        with torch.inference_mode():
            return model(torch.from_numpy(batch))

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    core = ov.Core()
    # f32 named explicitly: on CPUs with BF16 instructions OpenVINO would otherwise compute in BF16.
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", **openvino_config("f32")}
    ov_dynamic = core.compile_model(ir_fp32, "CPU", config)
    static: dict[tuple, object] = {}

    def ov_static(ir: Path) -> object:
        def run(batch: np.ndarray) -> object:
            key = (ir, batch.shape)
            if key not in static:  # compiled once per shape, outside the timed calls (time_calls warms up)
                network = core.read_model(ir)
                network.reshape({network.inputs[0].get_any_name(): list(batch.shape)})
                static[key] = core.compile_model(network, "CPU", config)
            return static[key](batch)
        return run

    return {
        "torch eager": torch_eager,
        "ONNX Runtime": lambda batch: session.run(None, {input_name: batch}),
        "OpenVINO FP32": lambda batch: ov_dynamic(batch),
        "OpenVINO FP32 static": ov_static(ir_fp32),
        "OpenVINO FP16 static": ov_static(ir_fp16),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per configuration (batch 1)")
    parser.add_argument("--quick", action="store_true", help="vit_tiny only, few repeats")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="only these variants")
    parser.add_argument("--output", type=Path, default=DOCS / "inference.md")
    args = parser.parse_args()
    import openvino as ov

    torch.set_num_threads(args.threads)
    variants = ["vit_tiny"] if args.quick else (args.variants or list(VARIANTS))
    repeats = 5 if args.quick else args.repeats
    peak = matmul_peak_gflops(args.threads)
    rows, chart = [], {}
    size = args.image_size
    with tempfile.TemporaryDirectory() as tmp:
        for variant in tqdm(variants, desc="variants"):
            model = build(variant, size)
            gflops = gflops_per_image(model, size)
            onnx_path = model.to_onnx(Path(tmp) / variant, input_size=(size, size))
            ir = ov.convert_model(onnx_path)
            ir_fp32, ir_fp16 = Path(tmp) / variant / "fp32.xml", Path(tmp) / variant / "fp16.xml"
            ov.save_model(ir, ir_fp32, compress_to_fp16=False)
            ov.save_model(ir, ir_fp16, compress_to_fp16=True)
            for runtime, run in runners(model, onnx_path, ir_fp32, ir_fp16, args.threads).items():
                for batch_size in (1, 8):
                    batch = np.random.default_rng(0).random((batch_size, 3, size, size), dtype=np.float32)
                    n = repeats if batch_size == 1 else max(3, repeats // 3)
                    times = time_calls(lambda run=run, batch=batch: run(batch), n, warmup=3)
                    images_per_s = batch_size / median(times)
                    rows.append([variant, runtime, batch_size, f"{median(times) * 1e3:.1f}", f"{p90(times) * 1e3:.1f}",
                                 f"{images_per_s:.1f}", f"{gflops:.2f}", f"{gflops * images_per_s / peak:.0%}"])
                    chart[(variant, runtime, batch_size)] = median(times) * 1e3
    header = ["variant", "runtime", "batch", "median ms", "p90 ms", "images/s", "GFLOPs/image", "of matmul peak"]
    table = markdown_table(header, rows)
    def speedup(variant: str, runtime: str) -> float:
        return chart[(variant, "torch eager", 1)] / chart[(variant, runtime, 1)]

    speedups = [
        f"- {v} batch 1: OpenVINO FP32 is {speedup(v, 'OpenVINO FP32'):.2f}x torch eager as exported (dynamic "
        f"batch), {speedup(v, 'OpenVINO FP32 static'):.2f}x with a static batch-1 shape; ONNX Runtime "
        f"{speedup(v, 'ONNX Runtime'):.2f}x"
        for v in variants
    ]
    report = "\n".join([
        "# Inference benchmark",
        "",
        f"Command: `{' '.join(['python -m benchmarks.inference', *sys.argv[1:]])}` "
        f"({args.threads} threads, {size} px, whole exported graph incl. pre/post-processing).",
        f"Machine: {machine()}. Measured fp32 matmul peak ({args.threads} threads, 2048^3): {peak:.1f} GFLOP/s.",
        "Latency is the median (and 90th percentile) of repeated runs measured side by side in one process; "
        "'of matmul peak' = GFLOPs/image x images/s / measured peak.",
        "",
        table,
        "",
        *speedups,
        "",
        "![latency chart](inference.png)",
        "",
    ])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    draw_chart(chart, variants, args.output.with_suffix(".png"))
    print(report)


def draw_chart(chart: dict, variants: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runtimes = ["torch eager", "ONNX Runtime", "OpenVINO FP32", "OpenVINO FP32 static", "OpenVINO FP16 static"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, batch_size in zip(axes, (1, 8), strict=True):
        width = 0.16
        for i, runtime in enumerate(runtimes):
            values = [chart[(v, runtime, batch_size)] for v in variants]
            ax.bar(np.arange(len(variants)) + i * width, values, width, label=runtime)
        ax.set_xticks(np.arange(len(variants)) + 2 * width, variants)
        ax.set_ylabel("median latency per batch (ms)")
        ax.set_title(f"batch {batch_size}")
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
