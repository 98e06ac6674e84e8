"""``report.html``: the page an inspector opens after ``isstad-predict``, one self-contained file per run.

It works offline (no CDN, no server): the score histogram is embedded, the thumbnails are small JPEGs in
``thumbnails/`` beside it (referenced relatively, so the output folder can be archived or mailed as a whole), and
each thumbnail links to its full overlay. The gallery is sorted by score, flagged images first; radio buttons (or
the address's ``#flagged``, ``#passed``, ``#unreadable``) filter it. Every file name is escaped by Jinja2.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np

THUMBNAILS = Path("thumbnails")
THUMBNAIL_WIDTH = 320  # px: an overlay (image | map) at 160 px a half; about 10 kB as JPEG
THUMBNAIL_QUALITY = 80


@dataclass(frozen=True)
class ReportEntry:
    """One input file of the run: its score and verdict, or why it could not be read.

    ``image`` is the file as given (the CSV's ``image``), ``name`` what the card shows (its path below the input,
    as the overlay mirrors it); ``overlay`` and ``thumbnail`` are relative to the output folder, ``None`` for an
    unreadable file.
    """

    image: str
    name: str
    score: float | None = None
    flagged: bool | None = None
    overlay: Path | None = None
    thumbnail: Path | None = None
    thumbnail_size: tuple[int, int] = (0, 0)
    problem: str | None = None

    @property
    def verdict(self) -> str:
        if self.problem is not None:
            return "unreadable"
        return "flagged" if self.flagged else "passed"


@dataclass(frozen=True)
class RunInfo:
    """What the page's header says about the run."""

    model: Path
    source: str  # e.g. "OpenVINO IR, OpenVINO on CPU, f32"
    threshold: float
    threshold_note: str
    started: str
    seconds: float


def write_thumbnail(overlay_bgr: np.ndarray, path: Path, width: int = THUMBNAIL_WIDTH) -> tuple[int, int]:
    """A small JPEG of an ``[H, W, 3]`` BGR overlay at ``path``; returns its ``(width, height)``."""
    height = max(1, round(overlay_bgr.shape[0] * width / overlay_bgr.shape[1]))
    small = cv2.resize(overlay_bgr, (width, height), interpolation=cv2.INTER_AREA)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), small, [cv2.IMWRITE_JPEG_QUALITY, THUMBNAIL_QUALITY]):
        msg = f"Could not write {path} (disk full or folder not writable?)."
        raise OSError(msg)
    return width, height


def histogram_png(scores: Sequence[float], flagged: Sequence[bool], threshold: float) -> bytes:
    """The scores' histogram, flagged and passed stacked in two colours, the threshold a dashed line (PNG)."""
    from matplotlib.figure import Figure  # a Figure of its own, not pyplot: the caller's backend stays as it is

    values = np.asarray(scores, dtype=float)
    marks = np.asarray(flagged, dtype=bool)
    figure = Figure(figsize=(6.4, 2.6), dpi=100, layout="constrained")
    axes = figure.subplots()
    low, high = (min(values.min(), threshold), max(values.max(), threshold)) if values.size else (0.0, 1.0)
    bins = np.linspace(low, high if high > low else low + 1.0, 41)
    axes.hist([values[~marks], values[marks]], bins=bins, stacked=True, color=["#2e7d32", "#c62828"],
              label=[f"passed ({int((~marks).sum())})", f"flagged ({int(marks.sum())})"])
    axes.axvline(threshold, color="#222", linestyle="--", linewidth=1.2, label=f"threshold {threshold:.3f}")
    axes.set_xlabel("image score")
    axes.set_ylabel("images")
    axes.legend(loc="upper center", fontsize=8, frameon=False, ncols=3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def gallery_order(entries: Sequence[ReportEntry]) -> list[ReportEntry]:
    """Flagged first, then passed, each by score (highest first); unreadable files last, by name."""
    return sorted(entries, key=lambda e: (e.problem is not None, not e.flagged, -(e.score or 0.0), e.image))


def render(entries: Sequence[ReportEntry], info: RunInfo) -> str:
    """The page's HTML."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    environment = Environment(loader=PackageLoader("isstad_plugin", "templates"), autoescape=True,
                              undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    scored = [entry for entry in entries if entry.problem is None]
    histogram = histogram_png([e.score for e in scored], [bool(e.flagged) for e in scored], info.threshold)
    cards = [{"verdict": entry.verdict, "image": entry.image, "name": entry.name, "problem": entry.problem,
              "score_text": "" if entry.score is None else f"{entry.score:.4f}",
              "overlay": quote(entry.overlay.as_posix()) if entry.overlay else None,
              "thumbnail": quote(entry.thumbnail.as_posix()) if entry.thumbnail else None,
              "width": entry.thumbnail_size[0], "height": entry.thumbnail_size[1]} for entry in gallery_order(entries)]
    flagged = sum(bool(entry.flagged) for entry in scored)
    return environment.get_template("report.html.j2").render(
        model=str(info.model), source=info.source, threshold=info.threshold, threshold_note=info.threshold_note,
        started=info.started, seconds=info.seconds, total=len(entries), scored=len(scored), flagged=flagged,
        passed=len(scored) - flagged, unreadable=len(entries) - len(scored), entries=cards,
        histogram=base64.b64encode(histogram).decode("ascii"), thumbnail_width=THUMBNAIL_WIDTH)


def write_report(folder: Path, entries: Sequence[ReportEntry], info: RunInfo) -> Path:
    """``folder/report.html`` for ``entries`` (thumbnails already written under ``folder``)."""
    path = folder / "report.html"
    path.write_text(render(entries, info), encoding="utf-8")
    return path
