"""OpenVINO's compiled models and the thread's alternate signal stack (isstad_plugin/signal_stack.py)."""

from __future__ import annotations

import ctypes
import importlib.metadata
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest

from isstad_plugin.signal_stack import current_signal_stack, keep_signal_stack, set_signal_stack

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigaltstack: Linux only")

# Two OpenVINO models compiled by two Cores, released in the order they were made, then a SIGCHLD handler (torch's
# DataLoader installs one) and a child process that exits: the CI's crash, in a few lines.
SCRIPT = textwrap.dedent("""
    import contextlib, gc, signal, subprocess, sys
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops
    from isstad_plugin.signal_stack import keep_signal_stack

    def model():
        x = ops.parameter([1, 8], np.float32)
        return ov.Model([ops.relu(x)], [x])

    guard = keep_signal_stack if sys.argv[1] == "guarded" else contextlib.nullcontext
    with guard():
        first = ov.Core().compile_model(model(), "CPU")
    with guard():
        second = ov.Core().compile_model(model(), "CPU")
    assert first(np.ones((1, 8), np.float32))[0].sum() == 8
    del first, second  # released in the order they were made
    gc.collect()
    signal.signal(signal.SIGCHLD, lambda *args: None)
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    print("survived")
""")


def run_script(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-X", "faulthandler", "-c", SCRIPT, mode], capture_output=True,
                          text=True, timeout=300, check=False)


def test_openvino_models_released_in_order_no_longer_kill_the_process() -> None:
    guarded = run_script("guarded")
    assert guarded.returncode == 0 and "survived" in guarded.stdout, guarded.stderr[-2000:]
    # Unguarded, OpenVINO 2026.4 dies of SIGSEGV here. A release (or a CPU and kernel) without the bug survives:
    # that must not fail the suite, since the guard costs nothing where it is not needed; it is reported instead.
    unguarded = run_script("unguarded")
    assert unguarded.returncode in (0, -signal.SIGSEGV), unguarded.stderr[-2000:]
    if unguarded.returncode == 0:
        warnings.warn(f"OpenVINO {importlib.metadata.version('openvino')} no longer dies of SIGSEGV without "
                      "keep_signal_stack here: isstad_plugin/signal_stack.py's guard may no longer be needed",
                      stacklevel=1)


def test_keep_signal_stack_restores_what_the_thread_had() -> None:
    before = current_signal_stack()
    buffer = ctypes.create_string_buffer(64 * 1024)
    with keep_signal_stack():
        set_signal_stack((ctypes.addressof(buffer), len(buffer), 0))
        assert current_signal_stack() == (ctypes.addressof(buffer), len(buffer), 0)
    assert current_signal_stack() == before
