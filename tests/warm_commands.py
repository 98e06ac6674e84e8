"""Console commands (``anomalib``, ``isstad-predict``, ``isstad-benchmark``) run in a forked copy of a warm interpreter.

Starting ``anomalib`` costs about 6.5 s of imports (torch, Lightning, anomalib) on this project's 2-core CPU before
it does anything; the documentation test alone runs two dozen such commands, and the CLI, own-images and benchmark
tests share the same server (``tests/conftest.py``'s ``warm``, one per test worker). A :class:`WarmCommands` server
imports all of that once; each command then runs in a child forked from it: a real process with its own working directory,
environment, argv, output files and exit status, running the installed console script's entry point exactly as the
script would (``sys.exit(main())``), start-up hook included (it ran when the server imported anomalib).

Protocol (one JSON object per line): the test sends ``{"argv", "cwd", "env", "stdout", "stderr", "timeout"}`` and
optionally ``"file_size_limit"`` (bytes: the child may not write files larger, as ``RLIMIT_FSIZE`` with ``SIGXFSZ``
ignored, so writes fail part-way as on a full disk), the server forks, waits (killing the child after ``timeout``
seconds) and answers ``{"returncode"}``. Anything
other than a plain command of a known console script runs through ``bash`` as before (see
``tests/test_doc_commands.py``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

PROGRAMS = ("anomalib", "isstad-predict", "isstad-benchmark")


def _entry_point(program: str):  # the console script's function
    (script,) = entry_points(group="console_scripts", name=program)
    return script.load()


def _run_child(request: dict) -> None:
    """In the forked child: become the requested command, then exit with its status (never returns)."""
    status = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        if request.get("file_size_limit") is not None:
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            limit = int(request["file_size_limit"])
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        sys.argv = [str(Path(sys.executable).parent / request["argv"][0]), *request["argv"][1:]]
        try:
            sys.exit(_entry_point(request["argv"][0])())  # what the console script does
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if not isinstance(exit_.code, int | None):
                print(exit_.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001  (as the interpreter would: traceback, status 1)
            import traceback

            traceback.print_exc()
            status = 1
        import logging

        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110
                pass
        os._exit(status)


def serve() -> None:
    """The server loop: import what the commands need, then fork one child per request read from stdin."""
    import anomalib.cli.cli  # noqa: F401  (the imports every command would pay for)

    import isstad_plugin.deploy  # noqa: F401

    # what every export imports on first use (torch.export and the ONNX exporter, ~900 modules, 1-2 s per export)
    import networkx  # noqa: F401
    import onnxscript  # noqa: F401
    import torch.export  # noqa: F401

    for program in PROGRAMS:
        _entry_point(program)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _run_child(request)
        deadline = time.monotonic() + request["timeout"]
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:  # as subprocess.run's timeout: the command is killed
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.05)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


class WarmCommands:
    """A warm server for console commands; :meth:`run` is ``subprocess.run`` for them, :meth:`close` ends it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.server = subprocess.Popen([sys.executable, "-m", "tests.warm_commands"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=env,
                                       cwd=Path(__file__).resolve().parents[1])
        ready = self.server.stdout.readline()
        if not ready:
            msg = "the warm command server did not start (run `python -m tests.warm_commands` to see why)"
            raise RuntimeError(msg)

    def run(self, argv: list[str], cwd: Path, env: dict[str, str], output_dir: Path, timeout: float = 600,
            file_size_limit: int | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` (its program one of :data:`PROGRAMS`) in ``cwd``, killed after ``timeout`` seconds (status
        -9), writing no file over ``file_size_limit`` bytes if given; its output is captured as text (files under
        ``output_dir``)."""
        if argv[0] not in PROGRAMS:
            msg = f"{argv[0]} is not one of {PROGRAMS}"
            raise ValueError(msg)
        output_dir.mkdir(parents=True, exist_ok=True)
        stdout, stderr = output_dir / "stdout.txt", output_dir / "stderr.txt"
        request = {"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(stdout), "stderr": str(stderr),
                   "timeout": timeout, "file_size_limit": file_size_limit}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        answer = json.loads(self.server.stdout.readline())
        return subprocess.CompletedProcess(argv, answer["returncode"], stdout.read_text(errors="replace"),
                                           stderr.read_text(errors="replace"))

    def close(self) -> None:
        """End the server (it exits when its input closes)."""
        self.server.stdin.close()
        self.server.wait(timeout=60)


if __name__ == "__main__":
    serve()
