import faulthandler
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("MUJOCO_GL", "egl")
# Kernels are interpreted on CPU tensors unless TRITON_INTERPRET=0 is given (GPU machines). Set before any test
# module is collected: modules that import the LAQ (and so lapa_dist/kernels/) can be collected before test_kernels.py.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


# A backstop behind pytest-timeout (600 s, pytest.ini): its thread needs the GIL, so a test blocked in C code that
# holds the GIL would never be stopped, and CI would only time out, printing nothing. faulthandler's watchdog is a C
# thread: it prints every thread's Python stack and exits.
BACKSTOP_S = 720
_stderr = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long or optional-dependency tests; run with --runslow")
    _stderr["file"] = os.fdopen(os.dup(2), "w")  # the real stderr: during a test, fd 2 goes to pytest's capture


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    faulthandler.dump_traceback_later(BACKSTOP_S, exit=True, file=_stderr["file"])
    yield
    faulthandler.cancel_dump_traceback_later()


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
