"""Benchmark outputs: the CSV of finished rows (read back to resume), a Markdown table and a chart."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from pathlib import Path

COLUMNS = [
    "model", "category", "class", "backbone", "pretrained", "weights",
    "image_AUROC", "image_F1", "pixel_AUROC", "pixel_F1", "pixel_AUPRO",
    "epochs", "train_min", "torch_ms", "openvino_ms", "input_px", "peak_rss_MB", "params_M",
    "seed", "torch", "spec_hash",
]
METRICS = ["image_AUROC", "image_F1", "pixel_AUROC", "pixel_F1", "pixel_AUPRO"]
# Between the generated part of a published page and text written by hand, which re-publishing keeps.
HAND_WRITTEN_MARKER = "<!-- Everything below this line is written by hand and kept when the table is re-published. -->"


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of an existing results CSV (none if it does not exist); fails on a CSV from another layout."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames != COLUMNS:
            msg = (f"{path} has columns {reader.fieldnames}, expected {COLUMNS}; move it away or pass "
                   "--fresh to start a new results file.")
            raise ValueError(msg)
        return list(reader)


def write_rows(path: Path, rows: Sequence[dict[str, object]]) -> None:
    """Write all rows atomically (a kill mid-write leaves the previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows([{column: row.get(column, "") for column in COLUMNS} for row in rows])
    tmp.replace(path)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


NUMERIC_COSTS = ["train_min", "torch_ms", "openvino_ms", "peak_rss_MB", "params_M"]


def aggregate(rows: Sequence[dict[str, object]]) -> list[dict[str, object]]:
    """One row per (model, category), in first-seen order: metrics and costs as means over its seeds, with
    ``<metric>_std`` (0 for one seed) and ``seeds`` (how many, and which)."""
    groups: dict[tuple[str, str], list[dict[str, object]]] = {}
    for row in rows:
        groups.setdefault((str(row["model"]), str(row["category"])), []).append(row)
    merged = []
    for group in groups.values():
        row = dict(group[0])
        for column in [*METRICS, *NUMERIC_COSTS]:
            values = [float(r[column]) for r in group]
            row[column] = statistics.fmean(values)
            row[f"{column}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row["seeds"] = f"{len(group)} ({', '.join(str(r.get('seed', '')) for r in group)})"
        merged.append(row)
    return merged


def markdown(rows: Sequence[dict[str, object]], header_lines: Sequence[str], failed: Sequence[str] = ()) -> str:
    """The results page: ``header_lines``, the metric table, the cost table, and the rows missing from them.

    With several seeds per (model, category), the tables give mean ± std over them and every run is listed below.
    """
    merged = aggregate(rows)
    several = any(not str(row["seeds"]).startswith("1 ") for row in merged)

    def cell(row: dict[str, object], column: str) -> object:
        if column in METRICS and several:
            return f"{float(row[column]):.3f} ± {float(row[f'{column}_std']):.3f}"
        if column in NUMERIC_COSTS:
            return f"{float(row[column]):.4g}"
        return f"{float(row[column]):.4f}" if column in METRICS else row.get(column, "")

    def table(source: Sequence[dict[str, object]], columns: list[str]) -> str:
        return markdown_table(columns, [[cell(row, column) for column in columns] for row in source])

    lines = [*header_lines, "", "## Detection and segmentation (test split)", "",
             table(merged, ["model", "category", *(["seeds"] if several else []), *METRICS]), "",
             "## Cost and provenance" + (" (means over the seeds)" if several else ""), "",
             table(merged, ["model", "category", "backbone", "pretrained", "weights", "epochs", "train_min",
                            "torch_ms", "openvino_ms", "input_px", "peak_rss_MB", "params_M"])]
    if several:
        lines += ["", "## Every run", "", markdown_table(
            ["model", "category", "seed", *METRICS, "train_min"],
            [[row["model"], row["category"], row.get("seed", ""), *(f"{float(row[m]):.4f}" for m in METRICS),
              row["train_min"]] for row in rows])]
    if failed:
        lines += ["", "## Rows missing from the tables", "", *[f"- {name}" for name in failed]]
    return "\n".join(lines) + "\n"


def publish(text: str, path: Path) -> None:
    """Write ``text`` to ``path``, keeping whatever follows :data:`HAND_WRITTEN_MARKER` in the existing file."""
    kept = ""
    if path.is_file() and HAND_WRITTEN_MARKER in (old := path.read_text()):
        kept = old.split(HAND_WRITTEN_MARKER, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{text}\n{HAND_WRITTEN_MARKER}{kept or chr(10)}")


def chart(rows: Sequence[dict[str, object]], path: Path) -> None:
    """Grouped bars: the five metrics per model (one panel per category; means with std bars over seeds), plus
    training minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = aggregate(rows)
    categories = list(dict.fromkeys(str(row["category"]) for row in rows))
    fig, axes = plt.subplots(len(categories), 2, figsize=(13, 3.8 * len(categories)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1]})
    for (metric_ax, time_ax), category in zip(axes, categories, strict=True):
        subset = [row for row in rows if row["category"] == category]
        names = [str(row["model"]) for row in subset]
        width = 0.8 / len(METRICS)
        for i, metric in enumerate(METRICS):
            values = [float(row[metric]) for row in subset]
            errors = [float(row[f"{metric}_std"]) for row in subset]
            bars = metric_ax.bar(np.arange(len(subset)) + i * width, values, width, label=metric,
                                 yerr=errors if any(errors) else None, capsize=2)
            metric_ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
        metric_ax.set_xticks(np.arange(len(subset)) + 0.4 - width / 2, names, rotation=15, fontsize=8)
        metric_ax.set_ylim(0, 1.08)
        metric_ax.axhline(0.5, color="grey", linewidth=0.6, linestyle="--")
        metric_ax.set_title(f"{category}: test metrics (dashed: chance AUROC)")
        metric_ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.18))
        time_ax.barh(names, [float(row["train_min"]) for row in subset], color="tab:gray")
        time_ax.set_xlabel("training minutes")
        time_ax.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_page(path: Path, lines: list[str]) -> None:
    """Write a generated Markdown page and say where it went."""
    path.write_text("\n".join(lines))
    print(f"wrote {path}")
