"""``isstad-benchmark -c configs/benchmark/three_categories.yaml``: run every (model, category) row, resumably.

Finished rows are kept in ``<output_dir>/results.csv`` and skipped next time unless their configuration
changed (each row stores a hash of everything that defines it). With ``--publish PAGE.md``, the rows of the
published ``PAGE.csv`` count as finished too, so a benchmark whose page is committed resumes on a fresh checkout
(where a rescoring run needs the trained models of the run it rescores, that run must have run on this machine). Each row runs in a child process whose
log is ``<output_dir>/runs/<model>/<category>/job.log``; a failed row is reported, not written.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .config import BenchmarkConfig, RunSpec, load_config, spec_hash
from .report import chart, markdown, publish, quietest_runs, read_rows, refresh_summaries, write_rows
from .timing import OtherLoad, machine


def last_progress_line(log: Path) -> str:
    """The newest progress fragment in a child's log (Lightning redraws its bar with carriage returns)."""
    try:
        with log.open("rb") as handle:
            handle.seek(max(0, log.stat().st_size - 2000))
            tail = handle.read().decode(errors="replace")
    except OSError:
        return ""
    fragments = [f.strip() for f in tail.replace("\r", "\n").split("\n") if f.strip()]
    return fragments[-1][-90:] if fragments else ""


def run_row(spec: dict, row_dir: Path, progress: Progress, task: int) -> dict | None:
    """Run one row's job in a child process; its result row, or None (with the log tail printed) on failure."""
    if row_dir.exists():
        shutil.rmtree(row_dir)  # a half-finished earlier attempt must not leave checkpoints or exports behind
    row_dir.mkdir(parents=True)
    spec_path, result_path, log_path = row_dir / "spec.json", row_dir / "result.json", row_dir / "job.log"
    spec_path.write_text(json.dumps(spec, indent=1))
    with log_path.open("w") as log, OtherLoad() as other_load:
        child = subprocess.Popen([sys.executable, "-m", "isstad_plugin.benchmark.job", str(spec_path),
                                  str(result_path)], stdout=log, stderr=subprocess.STDOUT)
        while child.poll() is None:
            progress.update(task, status=last_progress_line(log_path))
            time.sleep(1.0)
    if child.returncode != 0 or not result_path.is_file():
        tail = "\n".join(log_path.read_text(errors="replace").replace("\r", "\n").splitlines()[-15:])
        progress.console.print(f"[red]{spec['run']['name']}/{spec['category']} failed (exit {child.returncode}); "
                               f"log: {log_path}[/red]", soft_wrap=True)
        progress.console.print(tail, markup=False, highlight=False, soft_wrap=True)
        return None
    row = json.loads(result_path.read_text())
    # a rescoring row reports the training it rescores (its minutes): the load then counts too, the larger one
    loads = [load for load in (other_load.percent, row.pop("source_other_load_pct", None)) if load is not None]
    row["other_load_pct"] = max(loads) if loads else None
    result_path.write_text(json.dumps(row, indent=1))  # the whole row, its load included (a rescoring run reads it)
    return row


def missing_data_folders(config: BenchmarkConfig) -> list[str]:
    """Category folders the config names under ``data.init_args.root`` that do not exist."""
    root = config.data.get("init_args", {}).get("root")
    if root is None:
        return []
    return [str(Path(root) / category) for category in config.categories if not (Path(root) / category).is_dir()]


def row_key(row: dict, config: BenchmarkConfig) -> tuple[str, str, int]:
    """``(run name, category, seed)`` of a result row (rows written before seeds were recorded: the config's)."""
    seed = row.get("seed")
    return row["model"], row["category"], config.seed if seed is None or seed == "" else int(seed)  # seed 0 is a seed


def row_dir(output_dir: Path, name: str, category: str, seed: int, config: BenchmarkConfig) -> Path:
    """Where the row of ``name`` on ``category`` with ``seed`` runs (its job log, checkpoints and exports)."""
    return output_dir / "runs" / name / (category if seed == config.seed else f"{category}-seed{seed}")


def contended(rows_by_key: dict, config: BenchmarkConfig, limit: float) -> list[tuple[str, str, int]]:
    """``(run, category, config seed)`` of every (run, category) whose run the cost table quotes (:func:`quietest_runs`:
    the quietest on the CPU most runs used) had other processes use more than ``limit`` % of the machine (rows measured
    before the load was recorded count as contended)."""
    def load(row: dict) -> float:
        value = row.get("other_load_pct")
        return float(value) if value not in (None, "") else float("inf")

    return [(str(row["model"]), str(row["category"]), config.seed)
            for row in quietest_runs(list(rows_by_key.values())) if load(row) > limit]


def planned(config: BenchmarkConfig) -> list[tuple[RunSpec, str, int]]:
    """Every (run, category, seed) of the config: seed by seed (the config's ``seed`` first, whose runs the cost table
    shows), then run by run and category by category."""
    return [(run, category, seed) for seed in config.all_seeds for run in config.runs for category in config.categories]


def ordered(rows_by_key: dict, config: BenchmarkConfig) -> list[dict]:
    """Rows in the config's order of runs, then categories, then seeds; rows no longer configured go last."""
    keys = [(run.name, category, seed) for run in config.runs for category in config.categories
            for seed in config.all_seeds]
    order = {key: i for i, key in enumerate(keys)}
    return sorted(rows_by_key.values(), key=lambda row: order.get(row_key(row, config), len(order)))


def current_rows(
    rows_by_key: dict, config: BenchmarkConfig, failed: set[tuple[str, str, int]],
) -> tuple[list[dict], list[str]]:
    """Rows finished with the config as it is now (in its order), and a note for each configured row that is not."""
    wanted = {(run.name, category, seed): spec_hash(config.row_spec(run, category, seed))
              for run, category, seed in planned(config)}
    rows = [row for row in ordered(rows_by_key, config) if wanted.get(row_key(row, config)) == row["spec_hash"]]
    finished = {row_key(row, config) for row in rows}
    several = len(config.all_seeds) > 1
    missing = [f"{name}/{category}{f' seed {seed}' if several else ''}: " + (
        "failed, see its job.log" if (name, category, seed) in failed
        else "not run with the current configuration (run it to include it)")
        for name, category, seed in wanted if (name, category, seed) not in finished]
    return rows, missing


def header_lines(config: BenchmarkConfig, command: str) -> list[str]:
    notes = [f"- `{run.name}`: {run.note}" for run in config.runs if run.note]
    return [
        f"# {config.title}",
        "",
        f"Command: `{command}`",
        f"Published on: {machine()}; {config.threads} threads for training and timing (each run's CPU: `cpu` column "
        "of the CSV and cost table); "
        + (f"seeds {', '.join(map(str, config.all_seeds))} (mean ± std over them; every run below the tables)."
           if len(config.all_seeds) > 1 else f"seed {config.seed}."),
        "Each row trains on the train split with a fixed number of epochs (no early stopping, no model selection),",
        f"sets the image and pixel thresholds on the validation split (split seed {config.seed}, the same for every",
        "model and training seed) and reports the disjoint test split.",
        "**Every metric is scored at each image's original resolution, by the same code for every model**",
        "(`isstad_plugin/benchmark/scoring.py`): the model's raw anomaly map is resized to the image's size on disk and",
        "compared with the mask as stored, with anomalib's AUROC, AUPRO and F1 (F1 thresholds learnt on the",
        "validation half at that resolution). anomalib's default scores map and mask at each model's own input",
        "size instead; its figures are kept beside ours below.",
        "Latencies are batch-1 medians of the whole pipeline (resize, network, scoring, post-processing) on a",
        "real test image; `peak_rss_MB` is the training process's peak resident memory; `params_M` counts all",
        "parameters of the torch model, frozen backbones included; `other_load_pct` is the CPU time other processes",
        "used while the row ran, in % of the machine (measured from /proc/stat: near 0 means the row ran alone).",
        "",
        *notes,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="isstad-benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, type=Path, help="benchmark YAML (configs/benchmark/)")
    parser.add_argument("--output-dir", type=Path, help="overrides the config's output_dir")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these models (by run name)")
    parser.add_argument("--fresh", action="store_true", help="ignore and replace earlier results")
    parser.add_argument("--publish", type=Path, metavar="PAGE.md",
                        help="also write the page (and PAGE.png, PAGE.csv) here, keeping its hand-written part")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the pages from the rows finished so far (e.g. while a run goes on)")
    parser.add_argument("--quiet-rerun", type=float, metavar="PCT",
                        help="re-run the config seed's row of every (model, category) none of whose runs had other "
                             "processes use at most PCT %% of the machine, so each row has one quietly timed run")
    parser.add_argument("--summaries", type=Path, nargs="+", default=[], metavar="FILE.md",
                        help="with --publish: regenerate the benchmark-summary blocks of these files (README, model "
                             "cards) from the published CSV")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. seed=1")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    output_dir = args.output_dir or Path(config.output_dir)
    runs = [run for run in config.runs if not args.only or run.name in args.only]
    if args.only and (missing := set(args.only) - {run.name for run in runs}):
        parser.error(f"--only names no run of {args.config}: {sorted(missing)}")
    if missing_data := missing_data_folders(config):
        console = Console(stderr=True)
        console.print(f"Data folder(s) not found: {', '.join(missing_data)}; set data.init_args.root "
                      "(e.g. isstad-benchmark -c CONFIG data.init_args.root=/path/to/data).", soft_wrap=True)
        return 2
    csv_path = output_dir / "results.csv"
    kept = [] if args.fresh else read_rows(csv_path)
    if args.publish and not args.fresh:  # the published CSV (committed) resumes the benchmark on another machine
        known = {row_key(row, config) for row in kept}
        kept += [row for row in read_rows(args.publish.with_suffix(".csv")) if row_key(row, config) not in known]
    shown = [arg for arg in (argv if argv is not None else sys.argv[1:]) if arg != "--report-only"]
    command = shlex.join(["isstad-benchmark", *shown])  # the command that runs (and resumes) the benchmark
    rows_by_key = {row_key(row, config): row for row in kept}
    if args.quiet_rerun is not None:
        for key in contended(rows_by_key, config, args.quiet_rerun):
            rows_by_key.pop(key, None)
    failed: set[tuple[str, str, int]] = set()
    work = [] if args.report_only else [(run, category, seed) for run, category, seed in planned(config) if run in runs]

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("[dim]{task.fields[status]}"))
    console = Console()
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("benchmark", total=len(work), status="")
        for run, category, seed in work:
            spec = config.row_spec(run, category, seed)
            digest = spec_hash(spec)
            key = (run.name, category, seed)
            label = f"{run.name}/{category}" + (f" seed {seed}" if len(config.all_seeds) > 1 else "")
            if key in rows_by_key and rows_by_key[key]["spec_hash"] == digest:
                progress.console.print(f"kept {label} (finished earlier, same configuration)", soft_wrap=True)
                progress.advance(task)
                continue
            progress.update(task, description=label, status="starting")
            if run.rescores:  # where the run it rescores keeps its trained model (not part of the hash)
                spec["rescores_dir"] = str(row_dir(output_dir, run.rescores, category, seed, config).resolve())
            row = run_row(spec, row_dir(output_dir, run.name, category, seed, config), progress, task)
            if row is None:
                rows_by_key.pop(key, None)  # an earlier row of another configuration must not stand in for it
                failed.add(key)
            else:
                rows_by_key[key] = {**row, "spec_hash": digest}
                summary = (f"[green]{label}[/green] image AUROC {row['image_AUROC']:.3f}, "
                           f"pixel AUROC {row['pixel_AUROC']:.3f}, AUPRO {row['pixel_AUPRO']:.3f}, "
                           f"trained {row['train_min']:.1f} min")
                progress.console.print(summary, soft_wrap=True)
            write_rows(csv_path, ordered(rows_by_key, config))
            progress.advance(task)

    if rows_by_key:  # rows resumed from the published CSV included
        write_rows(csv_path, ordered(rows_by_key, config))
    rows, missing = current_rows(rows_by_key, config, failed)
    text = markdown(rows, [*header_lines(config, command), "", "![metrics and training time](results.png)"],
                    missing)
    (output_dir / "results.md").write_text(text)
    if rows:
        chart(rows, output_dir / "results.png")
    if args.publish:
        image_name = args.publish.with_suffix(".png").name
        publish(text.replace("(results.png)", f"({image_name})"), args.publish)
        if rows:
            shutil.copyfile(output_dir / "results.png", args.publish.with_suffix(".png"))
        shutil.copyfile(csv_path, args.publish.with_suffix(".csv"))
        for path in args.summaries:
            path.write_text(refresh_summaries(path))
    console.print(f"results: {csv_path}, {output_dir / 'results.md'}" + (f", {args.publish}" if args.publish else ""))
    if failed:
        logs = [str(row_dir(output_dir, name, category, seed, config) / "job.log")
                for name, category, seed in sorted(failed)]
        console.print(f"[red]{len(failed)} row(s) failed:[/red] " + "; ".join(logs), soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
