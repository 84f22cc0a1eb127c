"""Shared test setup: never reach a model hub, keep runs small and single-process friendly, and end
a hung test with every thread's stack instead of at CI's time limit."""
import faulthandler
import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The slowest test takes about 2 minutes on 2 busy cores; a test past this limit is hung.
TEST_LIMIT_S = float(os.environ.get("MAXMATCH_TEST_LIMIT_S", "900"))


def pytest_configure(config):
    # pytest's own stderr, not the capture file of the test that hangs (lost when the process exits)
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture()
    config.hang_report_fd = os.dup(sys.stderr.fileno())
    if capture is not None:
        capture.resume_global_capture()


@pytest.fixture(autouse=True)
def end_a_hung_test_with_its_stacks(request):
    """Past TEST_LIMIT_S, faulthandler prints every thread's Python stack and ends pytest (exit 1)."""
    faulthandler.dump_traceback_later(TEST_LIMIT_S, exit=True, file=request.config.hang_report_fd)
    yield
    faulthandler.cancel_dump_traceback_later()
