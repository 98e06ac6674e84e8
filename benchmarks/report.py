"""What ``isstad-predict``'s ``report.html`` costs: the run's time with and without it, and the page's load in a
browser for a large folder; writes ``docs/benchmarks/report.md`` and the README's screenshot.

    python -m benchmarks.report [--images 1000] [--rounds 3] [--data ../shared/data]

A tiny ISSTAD (64 px, two stage-2 epochs on magnetic_tile's good training images, the README's good-only start:
thresholds at a 1 % false-alarm rate of held-out good images) is exported to OpenVINO; a shift of
``--images`` files (magnetic_tile's test images, repeated under other names in a temporary folder, never in the repo)
is predicted with and without the report, the rounds alternated, and the medians are compared. The page of the last
run with a report is then opened by headless Chromium (``apt-get install chromium``) ``--rounds`` times: the time
from navigation to the load event (measured by the page's own clock, ``performance.now()``), and the browser
process's wall time against an empty page's. The screenshot ``docs/images/report.png`` is of a 60-image shift of
the same model (45 good test images, 15 defective ones).
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import DOCS, REPO, headless_chromium, machine, markdown_table, median, write_page

PAGE = DOCS / "report.md"
SCREENSHOT = REPO / "docs" / "images" / "report.png"
LOAD_CLOCK = ('<script>addEventListener("load", () => { document.documentElement.dataset.loadMs = '
              "performance.now().toFixed(0); });</script>")


def export_tiny_model(data: Path, work: Path) -> Path:
    """The OpenVINO IR of a tiny ISSTAD trained briefly on ``data``'s magnetic_tile."""
    import torch
    from anomalib.data import Folder
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine

    from isstad_plugin import Isstad

    torch.manual_seed(0)
    model = Isstad(backbone="vit_tiny", image_size=64, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                   stage1_epochs=0, stage2_epochs=2)
    datamodule = Folder(name="magnetic_tile", root=data / "magnetic_tile", normal_dir="train/good",
                        train_batch_size=16, eval_batch_size=16, num_workers=0)
    engine = Engine(default_root_dir=work / "train", accelerator="cpu", devices=1, logger=False)
    engine.fit(model=model, datamodule=datamodule)
    return Path(engine.export(model=model, export_type=ExportType.OPENVINO, export_root=work / "export"))


def make_shift(data: Path, folder: Path, count: int) -> Path:
    """``count`` test images of magnetic_tile (good and defective, repeated as needed) under distinct names."""
    sources = sorted((data / "magnetic_tile" / "test").rglob("*.png"))
    folder.mkdir(parents=True)
    for index in range(count):
        source = sources[(index * 7) % len(sources)]  # a stride through the classes, not one class at a time
        shutil.copyfile(source, folder / f"{index:04d}_{source.parent.name}_{source.name}")
    return folder


def make_screenshot_shift(data: Path, folder: Path) -> Path:
    """A shift as a line would see it: 45 good test images of magnetic_tile and 15 defective ones."""
    test = data / "magnetic_tile" / "test"
    defects = sorted(p for p in test.rglob("*.png") if p.parent.name != "good")
    folder.mkdir(parents=True)
    for source in sorted((test / "good").glob("*.png"))[:45] + defects[::max(1, len(defects) // 15)][:15]:
        shutil.copyfile(source, folder / f"{source.parent.name}_{source.name}")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args(argv)
    from isstad_plugin.deploy import predict_paths

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = export_tiny_model(args.data, work)
        shift = make_shift(args.data, work / "shift", args.images)
        seconds: dict[bool, list[float]] = {True: [], False: []}
        for round_ in range(args.rounds):
            for report in (round_ % 2 == 0, round_ % 2 != 0):  # alternated: neither always runs first
                output = work / f"out-{report}"
                start = time.perf_counter()
                predict_paths(model, [shift], output, overwrite=True, report=report)
                seconds[report].append(time.perf_counter() - start)
                print(f"round {round_ + 1}, report {report}: {seconds[report][-1]:.1f} s", flush=True)
        page = work / "out-True" / "report.html"
        timed = page.with_name("report-timed.html")
        timed.write_text(page.read_text().replace("</body>", f"{LOAD_CLOCK}\n</body>"))
        loads, walls, blanks = [], [], []
        for _ in range(args.rounds):
            wall, dom = headless_chromium(["--dump-dom", timed.as_uri()])
            loads.append(float(re.search(r'data-load-ms="(\d+)"', dom).group(1)) / 1000)
            walls.append(wall)
            blanks.append(headless_chromium(["--dump-dom", "about:blank"])[0])
        html_kb = page.stat().st_size / 1024
        thumbs = list((page.parent / "thumbnails").rglob("*.jpg"))
        thumbs_mb = sum(p.stat().st_size for p in thumbs) / 2**20
        small = make_screenshot_shift(args.data, work / "shift-0800")
        predict_paths(model, [small], work / "screenshot", overwrite=True)
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        headless_chromium([f"--screenshot={SCREENSHOT}", "--window-size=1280,1000", "--hide-scrollbars",
                  (work / "screenshot" / "report.html").as_uri()])
    with_report, without = median(seconds[True]), median(seconds[False])
    rows = [
        ["`isstad-predict` with the report (s)", f"{with_report:.1f}", f"{args.images / with_report:.0f} images/s"],
        ["`isstad-predict --no-report` (s)", f"{without:.1f}", f"{args.images / without:.0f} images/s"],
        ["the report's share of the run", f"{(with_report - without) / with_report:+.1%}",
         f"{(with_report - without) / args.images * 1000:.1f} ms per image"],
        ["page load in Chromium, navigation to load event (s)", f"{median(loads):.2f}",
         f"rounds: {', '.join(f'{v:.2f}' for v in loads)}"],
        ["Chromium process, the page (s)", f"{median(walls):.2f}", f"an empty page: {median(blanks):.2f} s"],
        ["report.html", f"{html_kb:.0f} kB", "the histogram embedded"],
        ["thumbnails/", f"{thumbs_mb:.1f} MB", f"{len(thumbs)} JPEGs, {thumbs_mb * 1024 / max(1, len(thumbs)):.1f} kB each"],
    ]
    write_page(PAGE, [
        "# The prediction report: what it costs",
        "",
        f"Written by `python -m benchmarks.report --images {args.images} --rounds {args.rounds}` on {machine()}.",
        (f"A tiny ISSTAD (64 px) exported to OpenVINO predicts a shift of {args.images} magnetic_tile test images "
         f"with and without `report.html`, {args.rounds} rounds alternated (medians); the page of a run with the "
         "report is then opened by headless Chromium (Debian's package) as many times. Thumbnails load lazily, so "
         "the load event does not wait for those below the first screen."),
        "",
        markdown_table(["measure", "median", "note"], rows),
        "",
        ("The screenshot in the README (`docs/images/report.png`) is of a 60-image shift of the same model (45 good "
         "test images, 15 defective)."),
        "",
    ])
    print(PAGE.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
