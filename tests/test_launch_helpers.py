"""The test launcher itself: a hung multi-rank launch ends in time, whole, and says where each rank was."""

import os
import re

import pytest

from tests.launch_helpers import run_deepspeed


def test_a_hung_launch_is_killed_whole_and_reports_every_ranks_stack():
    with pytest.raises(AssertionError, match="did not finish within 15 s") as failure:
        run_deepspeed("tests/scripts/sleep_forever.py", [], ranks=2, timeout=15)
    message = str(failure.value)
    assert message.count("sleep_forever.py\", line 8 in wait_forever") == 2, message[-3000:]
    pids = {int(pid) for pid in re.findall(r"process (\d+) spawned", message)}
    assert len(pids) == 2
    for pid in pids:  # no rank outlives the test
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
