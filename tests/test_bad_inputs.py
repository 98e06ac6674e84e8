"""Every bad input of ``docs/reliability.md`` through the real command: non-zero exit, the message that names the
file or option and the fix in the last 5 lines, nothing half-written left (cases in :mod:`tests.bad_inputs`)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.bad_inputs import CASES, MARKER, PAGE, TAIL_LINES, pinned_by, run_case
from tests.warm_commands import WarmCommands


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_fails_clearly(case, warm: WarmCommands) -> None:  # noqa: ANN001
    work = Path(tempfile.mkdtemp(prefix="bad-"))  # a short path, as a user's would be (pytest's are ~90 characters)
    try:
        outcome = run_case(case, work / case.name, warm=warm)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shown = "\n".join(outcome.tail)
    assert outcome.returncode != 0, f"{case.name}: the command succeeded; last lines:\n{shown}"
    assert outcome.ok, (f"{case.name}: expected /{case.expect}/ in the last {TAIL_LINES} lines; got:\n{shown}\n"
                        f"leftovers: {outcome.leftovers}")


def test_reliability_page_lists_every_case() -> None:
    table = PAGE.read_text().split(MARKER)[1]
    missing = [case.name for case in CASES if f"`{pinned_by(case)}`" not in table]
    assert not missing, f"{PAGE} misses {missing}: run python -m tests.bad_inputs --publish"
    assert "(FAILS)" not in table
