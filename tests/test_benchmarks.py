"""benchmarks/: the training-step speed benchmark on a tiny config."""
import os
import subprocess
import sys


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def test_train_step_speed_benchmark_prints_a_row_per_mode():
    result = run_script(["benchmarks/train_step_speed.py", "--threads", "1", "--batch-size", "4", "--steps", "1",
                         "--warmup", "1", "model.embed_dim=16", "model.set_head.depth=1",
                         "data.image_size=32", "model.image.stop_after=layer1", "model.text.word_dim=8", "--modes", "eager"])
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| eager |")]
    assert len(rows) == 1 and rows[0].split("|")[5].strip() == "1.00x"
