"""Inference latency and throughput of ISSTAD: torch eager vs ONNX Runtime vs OpenVINO (FP32, FP16, BF16, INT8).

Run by hand on a quiet machine: ``python -m benchmarks.inference`` (``--quick`` for a short check). Writes
``docs/benchmarks/inference.md`` and ``docs/benchmarks/inference.png`` entirely. Every runtime runs the whole
exported graph (resize, network, fused scoring, anomalib post-processing) with the same number of threads; the
models are randomly initialised (weights do not change the cost of FP32, FP16 and BF16).

INT8 is the graph ``anomalib export --compression_type INT8_PTQ`` writes for ISSTAD: NNCF post-training
quantization with our options (:func:`isstad_plugin.models.components.quantization.quantization_options`: the
transformer scheme, the map smoothing in floating point), calibrated here on random images (the ranges change
the values, not which ops run in INT8). BF16 rows (torch autocast, OpenVINO's ``bf16`` precision hint) appear only
where the CPU has BF16 instructions. The accuracy of INT8 (PTQ and accuracy-controlled) on trained models, and
ACQ's speed, which depends on the layers it keeps in floating point, are in ``docs/benchmarks/int8.md``
(``python -m benchmarks.int8``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from benchmarks.common import DOCS, machine, markdown_table, matmul_peak_gflops, median, p90, time_calls
from isstad_plugin.deploy import openvino_config

# Environment variables that limit the instruction sets (set them to emulate an older CPU, e.g.
# ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python -m benchmarks.inference --output .../inference-avx2.md)
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")

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


def cpu_capabilities() -> set[str]:
    """OpenVINO's optimisation capabilities of this CPU (e.g. ``FP32``, ``INT8``, ``BF16``), without BF16 where
    oneDNN is limited to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``: an AVX2-only CPU emulated, see ``--help``)."""
    import openvino as ov

    capabilities = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper().startswith(("AVX2", "SSE")):
        capabilities.discard("BF16")
    return capabilities


def int8_ir(ir_fp32: Path, image_size: int, samples: int = 16) -> Path:
    """The FP32 IR quantized as our INT8 export does, calibrated on ``samples`` random images."""
    import nncf
    import openvino as ov

    from isstad_plugin.models.components.quantization import quantization_options

    model = ov.Core().read_model(ir_fp32)
    rng = np.random.default_rng(0)
    images = [rng.random((1, 3, image_size, image_size), dtype=np.float32) for _ in range(samples)]
    quantized = nncf.quantize(model, nncf.Dataset(images), subset_size=samples,
                              **quantization_options(model, transformer=True))
    path = ir_fp32.with_name("int8.xml")
    ov.save_model(quantized, path, compress_to_fp16=False)
    return path


def runners(model, onnx_path: Path, irs: dict[str, Path], threads: int, bf16: bool) -> dict:  # noqa: ANN001
    """Callables ``batch -> outputs`` per runtime, all on ``threads`` threads.

    OpenVINO runs the exported FP32 IR twice: as exported (dynamic batch, compiled once for any batch size) and
    reshaped to the batch's static shape before compiling (what a deployment with a fixed batch does; the
    plugin then picks kernels for known shapes). FP16, BF16 and INT8 use the static shape too. ``irs`` holds the
    ``fp32``, ``fp16`` and ``int8`` IR files; ``bf16``: add the BF16 runtimes.
    """
    import onnxruntime as ort
    import openvino as ov

    def torch_eager(batch: np.ndarray) -> object:
        with torch.inference_mode():
            return model(torch.from_numpy(batch))

    def torch_bf16(batch: np.ndarray) -> object:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(torch.from_numpy(batch))

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    core = ov.Core()
    # f32 named explicitly: on CPUs with BF16 instructions OpenVINO would otherwise compute in BF16.
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    ov_dynamic = core.compile_model(irs["fp32"], "CPU", {**config, **openvino_config("f32")})
    static: dict[tuple, object] = {}

    def ov_static(ir: Path, precision: str = "f32") -> object:
        def run(batch: np.ndarray) -> object:
            key = (ir, precision, batch.shape)
            if key not in static:  # compiled once per shape, outside the timed calls (time_calls warms up)
                network = core.read_model(ir)
                network.reshape({network.inputs[0].get_any_name(): list(batch.shape)})
                static[key] = core.compile_model(network, "CPU", {**config, **openvino_config(precision)})
            return static[key](batch)
        return run

    runs = {"torch eager": torch_eager}
    if bf16:
        runs["torch eager BF16"] = torch_bf16
    runs |= {
        "ONNX Runtime": lambda batch: session.run(None, {input_name: batch}),
        "OpenVINO FP32": lambda batch: ov_dynamic(batch),
        "OpenVINO FP32 static": ov_static(irs["fp32"]),
        "OpenVINO FP16 static": ov_static(irs["fp16"]),
    }
    if bf16:
        runs["OpenVINO BF16 static"] = ov_static(irs["fp32"], "bf16")
    # INT8 ops run in INT8 whatever the hint; f32 keeps the ops NNCF left in floating point in FP32 (as deployed)
    runs["OpenVINO INT8 static"] = ov_static(irs["int8"])
    return runs


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
    capabilities = cpu_capabilities()
    bf16 = "BF16" in capabilities
    rows, chart = [], {}
    size = args.image_size
    with tempfile.TemporaryDirectory() as tmp:
        for variant in tqdm(variants, desc="variants"):
            model = build(variant, size)
            gflops = gflops_per_image(model, size)
            onnx_path = model.to_onnx(Path(tmp) / variant, input_size=(size, size))
            ir = ov.convert_model(onnx_path)
            irs = {"fp32": Path(tmp) / variant / "fp32.xml", "fp16": Path(tmp) / variant / "fp16.xml"}
            ov.save_model(ir, irs["fp32"], compress_to_fp16=False)
            ov.save_model(ir, irs["fp16"], compress_to_fp16=True)
            irs["int8"] = int8_ir(irs["fp32"], size)
            for runtime, run in runners(model, onnx_path, irs, args.threads, bf16).items():
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
        f"{speedup(v, 'ONNX Runtime'):.2f}x; OpenVINO INT8 {speedup(v, 'OpenVINO INT8 static'):.2f}x torch eager "
        f"and {speedup(v, 'OpenVINO INT8 static') / speedup(v, 'OpenVINO FP32'):.2f}x OpenVINO FP32"
        + (f"; OpenVINO BF16 {speedup(v, 'OpenVINO BF16 static'):.2f}x, torch BF16 autocast "
           f"{speedup(v, 'torch eager BF16'):.2f}x" if bf16 else "")
        for v in variants
    ]
    emulation = [f"{name}={os.environ[name]}" for name in ISA_LIMITS if name in os.environ]
    report = "\n".join([
        "# Inference benchmark",
        "",
        f"Command: `{' '.join([*emulation, 'python -m benchmarks.inference', *sys.argv[1:]])}` "
        f"({args.threads} threads, {size} px, whole exported graph incl. pre/post-processing).",
        f"Machine: {machine()}. Measured fp32 matmul peak ({args.threads} threads, 2048^3): {peak:.1f} GFLOP/s. "
        f"OpenVINO's CPU capabilities: {', '.join(sorted(capabilities))}"
        + ("." if bf16 else " (no BF16: BF16 rows left out)."),
        *([f"**An AVX2-only CPU emulated** on the machine below: `{' '.join(emulation)}` limit oneDNN (OpenVINO's "
           "kernels, torch's mkldnn ops) and MKL to AVX2 instructions (no AVX-512, no VNNI, no BF16).", ""]
          if emulation else []),
        "INT8: the graph our `--compression_type INT8_PTQ` export writes (NNCF, transformer scheme, map smoothing "
        "in FP32), calibrated on random images; its accuracy, and ACQ's, on trained models: [int8.md](int8.md).",
        "Latency is the median (and 90th percentile) of repeated runs measured side by side in one process; "
        "'of matmul peak' = GFLOPs/image x images/s / torch's measured fp32 matmul throughput above (not the "
        "hardware's peak: OpenVINO's FP32 kernels can exceed it, and BF16 and INT8 do).",
        "",
        table,
        "",
        *speedups,
        "",
        f"![latency chart]({args.output.with_suffix('.png').name})",
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

    runtimes = list(dict.fromkeys(runtime for _, runtime, _ in chart))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, batch_size in zip(axes, (1, 8), strict=True):
        width = 0.8 / len(runtimes)
        for i, runtime in enumerate(runtimes):
            values = [chart[(v, runtime, batch_size)] for v in variants]
            ax.bar(np.arange(len(variants)) + i * width, values, width, label=runtime)
        ax.set_xticks(np.arange(len(variants)) + 0.4 - width / 2, variants)
        ax.set_ylabel("median latency per batch (ms)")
        ax.set_title(f"batch {batch_size}")
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
