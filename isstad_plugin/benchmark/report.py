"""Benchmark outputs: the CSV of finished rows (read back to resume), a Markdown table and a chart."""

from __future__ import annotations

import csv
import re
import statistics
from collections.abc import Sequence
from pathlib import Path

METRICS = ["image_AUROC", "image_F1", "pixel_AUROC", "pixel_F1", "pixel_AUPRO"]
ANOMALIB_METRICS = [f"{metric}_anomalib" for metric in METRICS]  # anomalib's Evaluator, at the model's input size
COLUMNS = [
    "model", "category", "class", "backbone", "pretrained", "weights",
    *METRICS, *ANOMALIB_METRICS,
    "epochs", "train_min", "torch_ms", "openvino_ms", "input_px", "peak_rss_MB", "params_M", "other_load_pct",
    "seed", "torch", "cpu", "spec_hash",
]
LEGACY_COLUMNS = [column for column in COLUMNS if column != "cpu"]  # CSVs written before rows named their CPU
# Between the generated part of a published page and text written by hand, which re-publishing keeps.
HAND_WRITTEN_MARKER = "<!-- Everything below this line is written by hand and kept when the table is re-published. -->"


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of an existing results CSV (none if it does not exist); fails on a CSV from another layout."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames == LEGACY_COLUMNS:
            return [{**row, "cpu": ""} for row in reader]  # CPU not recorded: the cost table says "-"
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


NUMERIC_COSTS = ["train_min", "torch_ms", "openvino_ms", "peak_rss_MB", "params_M", "other_load_pct"]
HEADLINE = ["image_AUROC", "pixel_AUROC", "pixel_AUPRO"]  # the metrics a reader compares models by
MEAN_LABEL = "mean of categories"


def _number(value: object) -> float | None:
    """``value`` as a float; None when empty (a column older rows did not have)."""
    return None if value in (None, "") else float(value)


def aggregate(rows: Sequence[dict[str, object]]) -> list[dict[str, object]]:
    """One row per (model, category), in first-seen order: metrics and costs as means over its seeds, with
    ``<metric>_std`` (0 for one seed) and ``seeds`` (how many, and which)."""
    groups: dict[tuple[str, str], list[dict[str, object]]] = {}
    for row in rows:
        groups.setdefault((str(row["model"]), str(row["category"])), []).append(row)
    merged = []
    for group in groups.values():
        row = dict(group[0])
        for column in [*METRICS, *ANOMALIB_METRICS, *NUMERIC_COSTS]:
            values = [v for v in (_number(r.get(column)) for r in group) if v is not None]
            row[column] = statistics.fmean(values) if values else None
            row[f"{column}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row["seeds"] = f"{len(group)} ({', '.join(str(r.get('seed', '')) for r in group)})"
        merged.append(row)
    return merged


def category_means(rows: Sequence[dict[str, object]], categories: Sequence[str]) -> list[dict[str, object]]:
    """Per model, over the seeds it has finished on every one of ``categories`` (none: no row): for every such seed
    the mean over the categories, then the mean ± std of those over the seeds (so the spread is the seeds', not the
    categories'). A seed still running on some category is left out of the mean, never mixed in."""
    by_model: dict[str, dict[tuple[str, str], dict[str, object]]] = {}
    for row in rows:
        by_model.setdefault(str(row["model"]), {})[(str(row["category"]), str(row.get("seed", "")))] = row
    means = []
    for model, cells in by_model.items():
        seeds = [seed for seed in dict.fromkeys(seed for _, seed in cells)
                 if all((category, seed) in cells for category in categories)]
        if not categories or not seeds:
            continue
        row: dict[str, object] = {"model": model, "category": MEAN_LABEL,
                                  "seeds": f"{len(seeds)} ({', '.join(seeds)})"}
        for column in METRICS:
            per_seed = [statistics.fmean(float(cells[(c, seed)][column]) for c in categories) for seed in seeds]
            row[column] = statistics.fmean(per_seed)
            row[f"{column}_std"] = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
        means.append(row)
    return means


def main_cpu(rows: Sequence[dict[str, object]]) -> str:
    """The CPU most rows ran on ("" when no row records one): costs are compared on one machine."""
    cpus = [str(row.get("cpu") or "") for row in rows if row.get("cpu")]
    return max(dict.fromkeys(cpus), key=cpus.count) if cpus else ""


def quietest_runs(rows: Sequence[dict[str, object]], cpu: str | None = None) -> list[dict[str, object]]:
    """Per (model, category), in first-seen order, the run whose times and memory the tables quote: among its runs on
    ``cpu`` (default: the CPU most rows ran on, :func:`main_cpu`; any CPU where it has none there), the one that
    shared the machine least (lowest ``other_load_pct``; the first run where none was measured)."""
    cpu = main_cpu(rows) if cpu is None else cpu
    best: dict[tuple[str, str], dict[str, object]] = {}
    for row in rows:
        key = (str(row["model"]), str(row["category"]))
        load = _number(row.get("other_load_pct"))
        if key not in best:
            best[key] = row
            continue
        on_main, best_on_main = (str(r.get("cpu") or "") == cpu for r in (row, best[key]))
        quieter = load is not None and load < (_number(best[key].get("other_load_pct")) or float("inf"))
        if (on_main and not best_on_main) or (on_main == best_on_main and quieter):
            best[key] = row
    return list(best.values())


def metric_cell(row: dict[str, object], column: str, with_std: bool) -> str:
    value = row.get(column)
    if value is None:
        return "-"
    return f"{float(value):.3f} ± {float(row[f'{column}_std']):.3f}" if with_std else f"{float(value):.3f}"


SUMMARY_COSTS = {"train_min": "train min", "openvino_ms": "OpenVINO ms", "peak_rss_MB": "peak GB"}


def summary_table(rows: Sequence[dict[str, object]], models: Sequence[str] | None = None) -> str:
    """The headline table: per model, its mean over the categories (when it has them all), then each category:
    :data:`HEADLINE` metrics as mean ± std over seeds, and the costs of its quietest run (:func:`quietest_runs`,
    timed with the least other load: ``train min``, ``OpenVINO ms``, ``peak GB``; for the mean, their mean over the
    categories).
    ``models`` keeps only those models."""
    categories = list(dict.fromkeys(str(row["category"]) for row in rows))
    cpu = main_cpu(rows)  # of every row: a table of some models quotes their costs as the full table does
    rows = [row for row in rows if models is None or row["model"] in models]
    merged = aggregate(rows)
    several = any(not str(row["seeds"]).startswith("1 ") for row in merged)
    first_runs = {(str(row["model"]), str(row["category"])): row for row in quietest_runs(rows, cpu)}

    def costs(model: str, category: str) -> list[str]:
        runs = [run for (m, c), run in first_runs.items() if m == model and category in (c, MEAN_LABEL)]
        cells = []
        for column in SUMMARY_COSTS:
            value = statistics.fmean(float(run[column]) for run in runs)
            cells.append(f"{value / 1024:.1f}" if column == "peak_rss_MB" else f"{value:.3g}")
        return cells

    table_rows = []
    for model in dict.fromkeys(str(row["model"]) for row in merged):
        model_rows = [row for row in merged if row["model"] == model]
        means = [row for row in category_means(rows, categories) if row["model"] == model]
        for row in [*(means if len(categories) > 1 else []), *model_rows]:
            label = f"**mean of {len(categories)}**" if row["category"] == MEAN_LABEL else row["category"]
            table_rows.append([model, label, str(row["seeds"]).split(" ")[0],
                               *(metric_cell(row, c, several) for c in HEADLINE), *costs(model, str(row["category"]))])
    return markdown_table(["model", "category", "seeds", *HEADLINE, *SUMMARY_COSTS.values()], table_rows)


# A block of a Markdown file generated from a benchmark CSV, named relative to that file, e.g.
# <!-- benchmark-summary: docs/benchmarks/three_categories.csv models=isstad,patchcore -->...<!-- /benchmark-summary -->
SUMMARY_BLOCK = re.compile(r"(?P<open><!-- benchmark-summary: (?P<csv>\S+)(?: models=(?P<models>\S+))? -->\n)"
                           r"(?P<body>.*?)(?P<close><!-- /benchmark-summary -->)", re.DOTALL)


def refresh_summaries(path: Path) -> str:
    """``path``'s text with every benchmark-summary block regenerated from the CSV it names (:func:`summary_table`).
    A block whose CSV is missing fails, naming both."""

    def block(match: re.Match[str]) -> str:
        csv_path = (path.parent / match["csv"]).resolve()
        if not csv_path.is_file():
            msg = f"{path}: its benchmark-summary block names {match['csv']}, which does not exist."
            raise FileNotFoundError(msg)
        models = match["models"].split(",") if match["models"] else None
        table = summary_table(read_rows(csv_path), models)
        source = (f"<sub>Generated from [`{match['csv']}`]({match['csv']}) by `isstad-benchmark --publish` "
                  "(`--summaries` names this file); do not edit by hand.</sub>")
        return f"{match['open']}{table}\n\n{source}\n{match['close']}"

    return SUMMARY_BLOCK.sub(block, path.read_text())


def markdown(rows: Sequence[dict[str, object]], header_lines: Sequence[str], failed: Sequence[str] = ()) -> str:
    """The results page: ``header_lines``; the mean over categories and the per-category tables (mean ± std over
    seeds when there are several); anomalib's input-size figures beside ours; the cost table (each (model,
    category)'s quietest run, :func:`quietest_runs`); every run; and the rows missing from them."""
    merged = aggregate(rows)
    several = any(not str(row["seeds"]).startswith("1 ") for row in merged)
    categories = list(dict.fromkeys(str(row["category"]) for row in rows))

    def table(source: Sequence[dict[str, object]], columns: list[str]) -> str:
        def cell(row: dict[str, object], column: str) -> object:
            if column in METRICS or column in ANOMALIB_METRICS:
                return metric_cell(row, column, several)
            if column in NUMERIC_COSTS:
                return "-" if row.get(column) in (None, "") else f"{float(row[column]):.4g}"
            return row.get(column, "")

        return markdown_table(columns, [[cell(row, column) for column in columns] for row in source])

    lines = [*header_lines]
    if len(categories) > 1:
        lines += ["", f"## Mean over the {len(categories)} categories (test halves)", "",
                  table(category_means(rows, categories), ["model", "seeds", *METRICS])]
    lines += ["", "## Per category (test halves)", "",
              table(merged, ["model", "category", *(["seeds"] if several else []), *METRICS]), "",
              "## anomalib's default scoring beside ours", "",
              ("Each pair: our figure (map resized to the image's original size, raw scores) / anomalib's Evaluator "
               "(map and mask at the model's input size, post-processed scores)."), "",
              markdown_table(["model", "category", *(f"{m} ours / anomalib" for m in METRICS[2:])],
                             [[row["model"], row["category"],
                               *(f"{metric_cell(row, m, False)} / {metric_cell(row, f'{m}_anomalib', False)}"
                                 for m in METRICS[2:])] for row in merged])]
    cpu = main_cpu(rows)
    lines += ["", "## Cost and provenance (each row's quietest run: the least CPU used by other processes)", "",
              *([(f"Times are compared on one machine: each row's quietest run on {cpu}, the CPU most runs used "
                  "(another CPU only where a row has no run on it; its `cpu` cell says so)."), ""] if cpu else []),
              table(quietest_runs(rows), ["model", "category", "seed", "backbone", "pretrained", "weights", "epochs",
                                          "train_min", "torch_ms", "openvino_ms", "input_px", "peak_rss_MB",
                                          "params_M", "other_load_pct", "cpu"])]
    if several:
        lines += ["", "## Every run", "", markdown_table(
            ["model", "category", "seed", *METRICS, "train_min", "other_load_pct"],
            [[row["model"], row["category"], row.get("seed", ""), *(f"{float(row[m]):.4f}" for m in METRICS),
              row["train_min"], row.get("other_load_pct", "") or "-"] for row in rows])]
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
    """Grouped bars of the five metrics per model, one panel per category and one for the mean over categories
    (means with std bars over seeds), each beside the training minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    merged = aggregate(rows)
    categories = list(dict.fromkeys(str(row["category"]) for row in merged))
    panels = [(category, [row for row in merged if row["category"] == category]) for category in categories]
    if len(categories) > 1 and (means := category_means(rows, categories)):
        panels.insert(0, (MEAN_LABEL, means))
    fig, axes = plt.subplots(len(panels), 2, figsize=(13, 3.8 * len(panels)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1]})
    for (metric_ax, time_ax), (title, subset) in zip(axes, panels, strict=True):
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
        metric_ax.set_title(f"{title}: test metrics at original resolution (dashed: chance AUROC)")
        metric_ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.18))
        if title == MEAN_LABEL:
            time_ax.axis("off")
            continue
        time_ax.barh(names, [float(row["train_min"]) for row in subset], color="tab:gray")
        time_ax.set_xlabel("training minutes (mean over seeds)")
        time_ax.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_page(path: Path, lines: list[str]) -> None:
    """Write a generated Markdown page and say where it went."""
    path.write_text("\n".join(lines))
    print(f"wrote {path}")
