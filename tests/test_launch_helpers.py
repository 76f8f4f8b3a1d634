"""The test launcher itself: a hung multi-rank launch ends in time, whole, and says where each rank was."""

import re
from pathlib import Path

import pytest

from tests.launch_helpers import run_deepspeed


def ended(pid: int) -> bool:
    """Gone, or a zombie: where nothing reaps orphans (a container whose PID 1 is not an init), a killed rank stays
    in the process table, dead."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return re.search(r"^State:\s+Z", status, re.MULTILINE) is not None


def test_a_hung_launch_is_killed_whole_and_reports_every_ranks_stack():
    # 40 s: on a new machine the launcher and its ranks take well over 15 s to start
    with pytest.raises(AssertionError, match="did not finish within 40 s") as failure:
        run_deepspeed("tests/scripts/sleep_forever.py", [], ranks=2, timeout=40)
    message = str(failure.value)
    assert message.count("sleep_forever.py\", line 8 in wait_forever") == 2, message[-3000:]
    pids = {int(pid) for pid in re.findall(r"process (\d+) spawned", message)}
    assert len(pids) == 2
    assert all(ended(pid) for pid in pids)  # no rank outlives the test
