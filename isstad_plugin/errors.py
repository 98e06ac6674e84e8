"""Input errors that stay readable: repeated as the last line of the output when they end the process.

``anomalib`` prints uncaught exceptions as Rich tracebacks, and a model constructor's error reaches the user
wrapped by jsonargparse, followed by a dump of every model argument: our message ends up 20-200 lines above the
prompt. :func:`input_error` builds the exception to raise and remembers its message; if the process then ends on
an exception whose text contains that message (ours, or a wrapper quoting it), the message is printed once more,
last, after the traceback. Nothing changes for exceptions that are caught.

Example:
    >>> raise input_error("stage2_lr must be a finite number > 0, got nan.")
    Traceback (most recent call last):
    ...
    ValueError: stage2_lr must be a finite number > 0, got nan.
"""

from __future__ import annotations

import sys
import traceback
from types import TracebackType

_MESSAGES: list[str] = []


def input_error(message: str, kind: type[Exception] = ValueError) -> Exception:
    """``kind(message)``, remembered so that it is repeated last if it ends the process."""
    _MESSAGES.append(message)
    _install_hook()
    return kind(message)


def _squash(text: str) -> str:
    return "".join(text.split())


def _install_hook() -> None:
    if getattr(sys.excepthook, "isstad_plugin", False):
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        previous(kind, value, tb)
        text = _squash("".join(traceback.format_exception(kind, value, tb)))
        ours = next((m for m in reversed(_MESSAGES) if _squash(m) in text), None)
        if ours is not None:
            print(f"\nError: {ours}", file=sys.stderr)

    hook.isstad_plugin = True  # type: ignore[attr-defined]
    sys.excepthook = hook
