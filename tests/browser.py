"""Headless Chromium (Debian's ``chromium`` package) opening the pages the project writes, as a person's browser would.

``.ci/run`` installs it (``apt-get install chromium``). Elsewhere a test that needs it is skipped with the command to
install it, as the README says; under CI (``CI`` set) a missing browser fails instead, so a CI run never passes
without it.
"""

from __future__ import annotations

import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from benchmarks.common import headless_chromium

INSTALL = "apt-get install chromium"


def chromium() -> str:
    """The browser's path; skips the test (fails it under CI) when it is not installed."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = f"headless Chromium is not installed: {INSTALL} (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _run(arguments: list[str]) -> str:
    return headless_chromium(arguments, browser=chromium(), timeout=120)[1]


def dump_dom(page: Path, fragment: str = "") -> str:
    """The page's DOM after it loaded and its scripts ran (``fragment``: the address's ``#...``)."""
    return _run(["--dump-dom", page.resolve().as_uri() + fragment])


def screenshot(page: Path, target: Path, width: int = 1280, height: int = 1000) -> Path:
    """A PNG of the page's first screen."""
    _run([f"--screenshot={target.resolve()}", f"--window-size={width},{height}", "--hide-scrollbars",
          page.resolve().as_uri()])
    return target


class Elements(HTMLParser):
    """Every element of a document: ``(tag, attributes, text directly inside it)``, in document order."""

    def __init__(self, document: str) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[str, dict[str, str | None], list[str]]] = []
        self._open: list[int] = []
        self.feed(document)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, dict(attrs), []))
        if tag not in {"img", "input", "meta", "br", "link"}:
            self._open.append(len(self.found) - 1)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self.found[self._open.pop()][0] == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._open:
            self.found[self._open[-1]][2].append(data)

    def with_class(self, name: str) -> list[tuple[str, dict[str, str | None], str]]:
        return [(tag, attrs, "".join(text)) for tag, attrs, text in self.found
                if name in (attrs.get("class") or "").split()]
