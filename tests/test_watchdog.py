"""The suite's hang limit (conftest.py): a hung test ends pytest with its stack, not at CI's limit."""
import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_a_hung_test_ends_the_run_with_its_stack_after_the_limit(tmp_path):
    (tmp_path / "conftest.py").write_text(open(os.path.join(TESTS, "conftest.py")).read())
    (tmp_path / "test_hangs.py").write_text("import time\n\ndef test_waits_forever():\n    time.sleep(600)\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            env={**os.environ, "MAXMATCH_TEST_LIMIT_S": "2"}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Timeout" in output and "test_waits_forever" in output, output[-3000:]
