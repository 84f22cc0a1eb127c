"""benchmarks/: the ablation script's quick mode end to end, its table arithmetic, and the
training-step speed benchmark on a tiny config."""
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import ablation  # noqa: E402


def run_script(args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def test_ablation_quick_mode_trains_every_run_and_writes_the_table(tmp_path):
    result = run_script(["benchmarks/ablation.py", "--quick", "--jobs", "2", "--out", str(tmp_path)])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = (tmp_path / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| mil") or line.startswith("| max_pair")]
    assert len(rows) == 2 and all(row.rstrip().endswith("| 2 |") for row in rows)   # 2 seeds each finished
    assert "test RSUM (mean ± std)" in table
    for name in ("mil_divmmd_seed0", "mil_divmmd_seed1", "max_pair_all_seed0", "max_pair_all_seed1"):
        assert (tmp_path / name / "test_metrics.json").exists()
    # a second invocation reuses the finished runs instead of training again (other thread count too) ...
    again = run_script(["benchmarks/ablation.py", "--quick", "--jobs", "1", "--out", str(tmp_path)])
    assert again.returncode == 0 and "done " not in again.stdout
    assert (tmp_path / "table.md").read_text().split("\n", 2)[2] == table.split("\n", 2)[2]
    # ... but never passes off runs trained with another config as this one's
    other = run_script(["benchmarks/ablation.py", "--quick", "--jobs", "2", "--out", str(tmp_path),
                        "loss.isd.delta=0.2"])
    assert other.returncode == 1 and "holds a run with another config" in other.stdout
    assert "| mil div+mmd | failed |" in (tmp_path / "table.md").read_text()


def test_each_configuration_switches_the_intended_loss_terms():
    overrides = ablation.run_overrides("mil", "div+mmd", ["loss.con.weight=0"], ["train.epochs=3"], "/out", "x", 1, 2)
    assert "loss.similarity=mil" in overrides and "run.seed=1" in overrides and "run.num_threads=2" in overrides
    assert {"loss.gd.weight=0", "loss.isd.weight=0"} <= set(overrides)
    assert not any(o.startswith(("loss.mmd.weight", "loss.div.weight")) for o in overrides)
    assert overrides[-1] == "loss.con.weight=0"       # a configuration's own overrides come last
    assert set(ablation.REGULARISERS["none"]) == {f"loss.{t}.weight=0" for t in ("mmd", "div", "gd", "isd")}
    for grid in ablation.GRIDS.values():
        for method, regularisers, _ in grid.values():
            assert regularisers in ablation.REGULARISERS and method in ("mil", "smooth_chamfer", "greedy", "max_pair")


def fake_result(name, seed, rsum, error=None):
    collapse = {side: {"intra_set_cos": 0.1 * seed, "global_cos": 0.5, "log_set_variance": -5.0}
                for side in ("image", "caption")}
    return {"name": name, "seed": seed, "error": error, "rsum": rsum, "i2t_r1": 50.0, "t2i_r1": 40.0,
            "collapse": collapse, "val_rsum": rsum + 10, "val_i2t_r1": 60.0, "val_t2i_r1": 45.0,
            "val_collapse": collapse, "seconds": 120.0}


def test_summary_is_the_mean_and_sample_std_over_finished_seeds():
    configurations = {"a": ("mil", "none", []), "b": ("max_pair", "all", [])}
    results = [fake_result("a", 0, 400.0), fake_result("a", 1, 410.0), fake_result("a", 2, 0.0, error="exit 1"),
               fake_result("b", 0, 300.0, error="exit 1")]
    rows = {row["name"]: row for row in ablation.summarise(configurations, results)}
    assert rows["a"]["runs"] == 2 and rows["a"]["failed"] == 1
    assert rows["a"]["rsum"][0] == pytest.approx(405.0) and rows["a"]["rsum"][1] == pytest.approx(math.sqrt(50.0))
    assert rows["a"]["image_intra_set_cos"][0] == pytest.approx(0.05)
    table = ablation.markdown_table(list(rows.values()))
    assert "| a | 405.0 ± 7.1 | 50.0 | 40.0 | 0.05 / 0.05 | 0.50 / 0.50 | -5.00 / -5.00 | 2.0 | 2 (1 failed) |" in table
    assert "| b | failed |" in table
    val_rows = ablation.summarise(configurations, results, split="val")
    assert "| a | 415.0 ± 7.1 | 60.0 | 45.0 |" in ablation.markdown_table(val_rows, split="val")
    assert "val RSUM" in ablation.markdown_table(val_rows, split="val")


def test_train_step_speed_benchmark_prints_an_eager_row_with_positive_times():
    result = run_script(["benchmarks/train_step_speed.py", "--threads", "1", "--batch-size", "4", "--steps", "1",
                         "--warmup", "1", "model.embed_dim=16", "model.set_head.depth=1",
                         "data.image_size=32", "model.image.stop_after=layer1", "model.text.word_dim=8", "--modes", "eager"])
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| eager |")]
    assert len(rows) == 1
    _, mode, warmup_s, ms, rate, ratio, memory, _ = rows[0].split("|")
    assert 0 < float(ms) < 60_000 and float(rate) > 0 and float(warmup_s) >= 0
    assert ratio.strip() == "1.00x" and memory.strip() == "-"


def test_similarity_bench_ranking_part_prints_every_row_with_the_exact_fraction():
    result = run_script(["benchmarks/similarity_bench.py", "--parts", "4", "--scale", "0.002", "--threads", "1",
                         "--rank-repeats", "1"])
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 4 ")]
    assert len(rows) == 8  # per K: bare product, trained-like, random, every pair exact
    for line in rows:
        if "max_pair ranks" in line:
            exact = float(line.split("|")[5].split("%")[0])
            assert 0 < exact <= 100
