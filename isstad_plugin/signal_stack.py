"""Keep the calling thread's alternate signal stack across OpenVINO calls.

OpenVINO's CPU plugin (2026.4) gives the thread that compiles a model an alternate signal stack of its own
(``sigaltstack``, 11.5 KB of ``mmap``) and, when the compiled model is released, puts back the stack it found, but
only if its own is still the current one, and frees its own either way. Two compiled models alive at once and
released in the order they were made (as a dict of an FP32 and an INT8 model is) leave the thread's signal stack on
the first one's freed memory. Nothing happens until a signal with a handler arrives: then the kernel cannot write
the signal frame and kills the process with SIGSEGV (``si_code`` SI_KERNEL), with no Python traceback, since
faulthandler's handler needs that stack too. Python sets every handler it installs with ``SA_ONSTACK``, and torch's
DataLoader installs one for SIGCHLD once it has started workers, so the next child process to exit (a subprocess,
a DataLoader worker) is enough. ``tests/test_signal_stack.py`` reproduces it and pins the guard.

:func:`keep_signal_stack` puts the thread's signal stack back as it was before the block, so OpenVINO's stack
is never left current and freeing it harms nothing. Linux only; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator
from contextlib import contextmanager

SS_DISABLE = 2  # <bits/sigstack.h>: no alternate stack


class _StackT(ctypes.Structure):
    """``stack_t`` of ``sigaltstack(2)``."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _libc() -> ctypes.CDLL | None:
    return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def current_signal_stack() -> tuple[int, int, int] | None:
    """The calling thread's alternate signal stack as ``(address, size, flags)``; None off Linux."""
    libc = _libc()
    if libc is None:
        return None
    stack = _StackT()
    if libc.sigaltstack(None, ctypes.byref(stack)) != 0:
        msg = f"sigaltstack failed: errno {ctypes.get_errno()}"
        raise OSError(msg)
    return stack.ss_sp or 0, stack.ss_size, stack.ss_flags


def set_signal_stack(stack: tuple[int, int, int]) -> None:
    """Make ``stack`` (as :func:`current_signal_stack` returns it) the calling thread's alternate signal stack."""
    libc = _libc()
    if libc is None:
        return
    address, size, flags = stack
    wanted = _StackT(address or None, flags & SS_DISABLE, size)
    if libc.sigaltstack(ctypes.byref(wanted), None) != 0:
        msg = f"sigaltstack could not restore the signal stack {stack}: errno {ctypes.get_errno()}"
        raise OSError(msg)


@contextmanager
def keep_signal_stack() -> Iterator[None]:
    """Run the block, then give the calling thread back the alternate signal stack it had before (see the module)."""
    before = current_signal_stack()
    try:
        yield
    finally:
        if before is not None and current_signal_stack() != before:
            set_signal_stack(before)
