"""benchmarks/: the ablation script's quick mode end to end, its table arithmetic, the
training-step speed, checkpoint cost and search benchmarks on tiny configs, and the GPU check's CPU
rehearsal (--dry-run)."""
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_ROW = ("| config.yaml |", "| configs/")          # train_step_speed.py's rows, not its header
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

    # One CSV row per finished run, in <out> (never benchmarks/results/), enough to reuse runs whose
    # folders are gone; a new dataset's runs are trained and appended.
    rows = read_csv(tmp_path / "results.csv")
    rows.sort(key=lambda r: (r["configuration"], r["seed"]))        # appended in the order the runs finished
    assert [(r["configuration"], r["seed"]) for r in rows] == [("max_pair all", "0"), ("max_pair all", "1"),
                                                                ("mil div+mmd", "0"), ("mil div+mmd", "1")]
    assert not os.path.exists(os.path.join(REPO, "benchmarks", "results", "quick.csv"))
    assert rows[0]["config_hash"] == rows[1]["config_hash"] != rows[2]["config_hash"]
    metrics = json.loads((tmp_path / "max_pair_all_seed1" / "test_metrics.json").read_text())
    metrics = metrics["all"] if isinstance(metrics.get("all"), dict) else metrics
    assert float(rows[1]["rsum"]) == pytest.approx(metrics["rsum"], abs=1e-5)
    assert float(rows[1]["t2i_meanr"]) == pytest.approx(metrics["t2i_meanr"], abs=1e-5)
    assert all(r["image_log_circular_variance"] and r["commit"] and float(r["minutes"]) > 0 for r in rows)
    for name in ("mil_divmmd_seed0", "mil_divmmd_seed1", "max_pair_all_seed0", "max_pair_all_seed1"):
        shutil.rmtree(tmp_path / name)
    crowded = run_script(["benchmarks/ablation.py", "--quick", "--out", str(tmp_path), "--datasets", "default",
                          "crowded", "--seeds", "1", "--only", "max_pair all"])
    assert crowded.returncode == 0, crowded.stdout[-2000:] + crowded.stderr[-2000:]
    assert crowded.stdout.count("done ") == 1 and "done max_pair all seed 1" not in crowded.stdout
    assert "1 of 2 runs reused" in crowded.stdout and "Dataset `crowded`" in crowded.stdout
    rows = read_csv(tmp_path / "results.csv")
    assert len(rows) == 5 and (rows[-1]["dataset"], rows[-1]["seed"]) == ("crowded", "1")
    default_hash = next(r["config_hash"] for r in rows if r["configuration"] == "max_pair all")
    assert rows[-1]["configuration"] == "max_pair all" and rows[-1]["config_hash"] != default_hash
    assert (tmp_path / "crowded_max_pair_all_seed1" / "test_metrics.json").exists()
    images = json.loads((tmp_path / "data_crowded" / "dataset_shapes.json").read_text())["images"]
    assert {len(image["objects"]) for image in images} <= {4, 5, 6}


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


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


def test_train_step_speed_times_each_config_and_reports_a_failing_one_without_stopping():
    # the ViT is built for 48 px images and gets 32 px ones: that config fails, config.yaml still runs
    result = run_script(["benchmarks/train_step_speed.py", "--threads", "1", "--batch-size", "4", "--steps", "1",
                         "--warmup", "1", "--modes", "eager", "--config", "configs/coco_vit_bert.yaml",
                         "--config", "config.yaml", "model.embed_dim=16", "model.set_head.depth=1",
                         "data.image_size=32", "model.image.stop_after=layer1", "model.text.word_dim=8",
                         "model.image.vit_config={image_size: 48, patch_size: 16, num_layers: 1, num_heads: 2, "
                         "hidden_dim: 16, mlp_dim: 32}", "model.text.bert_config={vocab_size: 64, hidden_size: 16, "
                         "num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32}"])
    assert result.returncode == 1, result.stdout + result.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith(CONFIG_ROW)]
    assert [row[:2] for row in rows] == [[" configs/coco_vit_bert.yaml ", " eager "], [" config.yaml ", " eager "]]
    assert [cell.strip() for cell in rows[0][4:]] == ["failed", "-", "-", "-", "-", "-"]
    _, _, shape, amp, warmup_s, ms, rate, ratio, memory, sync_free = rows[1]
    assert 0 < float(ms) < 60_000 and float(rate) > 0 and float(warmup_s) >= 0
    assert shape.strip() == "4 + 20" and amp.strip() == "off"          # 5 captions an image; no AMP on the CPU
    assert ratio.strip() == "1.00x" and memory.strip() == "-" and sync_free.strip() == "-"
    assert re.search(r"^FAILED configs/coco_vit_bert.yaml eager: AssertionError: .*\(at model\.py:\d+ in forward\)$",
                     result.stdout, re.MULTILINE)
    assert "Traceback" in result.stderr


def test_gpu_check_dry_run_runs_every_part_on_the_cpu_and_writes_one_file_each(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    out = result.stdout
    for part in range(5):
        assert re.search(rf"^part {part}: passed in \d+ s$", out, re.MULTILINE), out
    assert "sync-debug mode skipped" in out and "every part passed" in out
    assert len(out + result.stderr) < 12_000                 # what comes back from a lent machine
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == ["0_machine.txt", "1_sync_debug.md", "2_throughput.md", "3_evaluation.md", "4_compile.md"]
    tables = {name: (tmp_path / "out" / name).read_text() for name in files}
    expected_rows = {"1_sync_debug.md": ["| config.yaml | eager |", "| configs/coco_vit_bert.yaml | eager |"],
                     "2_throughput.md": ["| configs/coco_vit_bert.yaml | eager |",
                                         "| configs/coco_resnet152_bigru.yaml | eager |"],
                     "4_compile.md": ["| configs/coco_vit_bert.yaml | eager |", "| configs/coco_vit_bert.yaml | compiled |"]}
    for name, starts in expected_rows.items():
        rows = [line for line in tables[name].splitlines() if line.startswith(CONFIG_ROW)]
        assert [row[:len(start)] for row, start in zip(rows, starts)] == starts and len(rows) == len(starts), rows
        assert all(line in out for line in rows)             # the table is also on stdout
        assert all(float(row.split("|")[6]) > 0 for row in rows)   # ms/step
    assert len([line for line in tables["3_evaluation.md"].splitlines() if line.startswith("| 4 ")]) == 8
    assert "| none (CPU) |" in tables["0_machine.txt"]


def test_gpu_check_budgets_add_up_to_seven_minutes_as_its_header_says():
    with open(os.path.join(REPO, "benchmarks", "gpu_check.sh")) as handle:
        script = handle.read()
    budgets = [int(b) for b in re.search(r"^budgets=\(([\d ]+)\)", script, re.MULTILINE).group(1).split()]
    stated = re.search(r"^#\s+part 0: (\d+), part 1: (\d+), part 2: (\d+), part 3: (\d+), part 4: (\d+)\.$",
                       script, re.MULTILINE)
    assert [int(b) for b in stated.groups()] == budgets
    assert sum(budgets) == 420 and "at most 7 minutes (420 s)" in script


def test_gpu_check_refuses_bad_flags_and_a_machine_without_cuda_in_one_line(tmp_path):
    import torch
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    cases = [(["--parts", "9"], "--parts takes digits 0-4"), (["--fast"], "unknown argument '--fast'")]
    if not torch.cuda.is_available():
        cases.append(([], "finds no CUDA device; run 'bash benchmarks/gpu_check.sh --dry-run'"))
    for args, message in cases:
        result = subprocess.run(["bash", "benchmarks/gpu_check.sh", *args], cwd=REPO, capture_output=True, text=True,
                                timeout=120, env=env)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1, result


def test_config_hash_ignores_names_places_threads_and_seed_but_not_the_training():
    base = ablation.load_config(None, ["train.epochs=3"])
    moved = ablation.load_config(None, ["train.epochs=3", "run.name=x", "run.out_dir=/else", "run.num_threads=1",
                                        "run.seed=7", "run.tensorboard=true", "data.root=/data/elsewhere"])
    assert ablation.config_hash(base) == ablation.config_hash(moved)
    for change in ("train.epochs=4", "loss.similarity=mil", "data.shapes.max_objects=4", "loss.gd.weight=0"):
        assert ablation.config_hash(ablation.load_config(None, ["train.epochs=3", change])) != ablation.config_hash(base)


def test_a_dataset_preset_becomes_overrides_that_give_the_presets_config():
    preset = os.path.join(REPO, ablation.DATASETS["crowded"])
    from_overrides = ablation.load_config(None, ablation.dataset_overrides("crowded"))
    from_preset = ablation.load_config(preset)
    from_overrides["run"]["name"] = from_preset["run"]["name"]       # run.* stays the ablation's
    assert from_overrides == from_preset
    assert ablation.dataset_overrides("default") == []
    assert ablation.flatten_config({"loss": {"similarity_options": {"alpha": 8}}},
                                   ablation.read_yaml(ablation.DEFAULT_CONFIG)) == ['loss.similarity_options={"alpha": 8}']


def test_the_matching_plan_lists_96_runs_of_12_configurations_and_trains_nothing(tmp_path):
    result = run_script(["benchmarks/ablation.py", "--grid", "matching", "--plan", "--out", str(tmp_path / "out"),
                         "--results", str(tmp_path / "none.csv")])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.split() for line in result.stdout.splitlines() if line.endswith("to run")]
    assert len(lines) == 96 and result.stdout.rstrip().endswith(f"96 runs, 0 of them in {tmp_path / 'none.csv'}")
    hashes = {line[-3] for line in lines}
    assert len(hashes) == 12                       # 6 configurations x 2 datasets; seeds share a hash
    assert not (tmp_path / "out").exists()


def test_the_matching_grid_holds_every_matching_with_all_losses_and_with_div_mmd_only():
    grid = ablation.GRIDS["matching"]
    assert {(method, regularisers) for method, regularisers, _ in grid.values()} == {
        (method, regularisers) for method in ("max_pair", "smooth_chamfer", "mil") for regularisers in ("all", "div+mmd")}
    assert ablation.GRID_DATASETS["matching"] == ["default", "crowded"] and len(ablation.GRID_SEEDS["matching"]) == 8
    assert 0 not in ablation.GRID_SEEDS["matching"]          # the seed the loss weights were tuned with


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


def test_checkpoint_cost_benchmark_writes_last_pt_and_prints_its_size_and_seconds():
    result = run_script(["benchmarks/checkpoint_cost.py", "--configs", "tiny", "config.yaml", "--repeats", "1"])
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| tiny") or
            line.startswith("| config.yaml")]
    assert [row[0].strip() for row in rows] == ["tiny", "config.yaml"]
    for _, parameters, size, seconds, overhead in rows:
        assert float(size) > 0 and float(seconds) > 0 and overhead.strip().endswith("%")
    assert float(rows[0][2]) < float(rows[1][2])       # the tiny model's file is the smaller


def test_search_bench_prints_every_row_and_the_pruned_search_finds_the_exhaustive_top_10():
    result = run_script(["benchmarks/search_bench.py", "--sizes", "300", "3000", "--queries", "2", "--dim", "32",
                         "--threads", "1", "--skip-index", "--faiss-neighbours", "--index-candidates", "100", "3000",
                         "--index-probes", "4", "--fde-candidates", "3000", "--fde", "2,2,8"])
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| 3")]
    cases = [cells[1].strip() for cells in rows]
    assert cases == [case for size in (300, 3000) for case in (
        "gallery in memory (float32)", f"set index ({32 if size == 300 else 128} centroids)",
        "FDE encodings (64 dims, flat)", "bare cosine product", "(a) every item matched exactly",
        "(b) bound-pruned exact", "(d) set index, probe 4, 100 cand.", "(d) set index, probe 4, 3,000 cand.",
        "(e) FDE (flat), 3,000 cand.")]
    pruned = [cells for cells in rows if cells[1].strip() == "(b) bound-pruned exact"]
    assert all("top 10 = (a) in 2/2" in cells[9] and float(cells[2]) > 0 and float(cells[3]) > 0 for cells in pruned)
    assert pruned[1][8].strip().endswith("x")          # growth against the smaller gallery
    covering = [cells for cells in rows if "3,000 cand." in cells[1]]              # every item is a candidate
    assert [cells[7].strip() for cells in covering] == ["100.0%"] * 4


def test_search_bench_faiss_rows_are_the_previous_element_candidates_or_one_install_line(tmp_path):
    blocked = tmp_path / "no_faiss"
    blocked.mkdir()
    (blocked / "faiss.py").write_text("raise ImportError('faiss is blocked for this test')\n")
    quick = ["benchmarks/search_bench.py", "--sizes", "3000", "--queries", "2", "--dim", "32", "--skip-index",
             "--index-candidates", "--fde-candidates", "--faiss-neighbours", "100", "12000"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(blocked)}
    result = subprocess.run([sys.executable, *quick], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "# (c) rows skipped: the FAISS rows need faiss: pip install faiss-cpu" in result.stdout
    assert "(c) FAISS" not in result.stdout
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (optional: pip install faiss-cpu)")
    result = run_script(quick)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {cells[1].strip(): cells for cells in (line.split("|")[1:-1] for line in result.stdout.splitlines()
                                                  if line.startswith("| 3,000"))}
    assert "FAISS element index (flat)" in rows
    assert rows["(c) FAISS element neighbours, 12000"][7].strip() == "100.0%"        # every element: every item


def test_search_bench_model_gallery_encodes_a_generated_split_with_the_checkpoint(tmp_path):
    import train
    from test_train import tiny_overrides
    assert train.main(tiny_overrides(tmp_path, name="bench") + ["train.epochs=1"]) == 0
    checkpoint = tmp_path / "runs" / "bench" / "best.pt"
    result = run_script(["benchmarks/search_bench.py", "--sizes", "--skip-index", "--queries", "2", "--faiss-neighbours",
                         "--model-gallery", str(checkpoint), "--model-images", "60", "--index-candidates", "60",
                         "--index-probes", "2", "--fde-candidates", "60", "--fde", "2,1,8"])
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {cells[1].strip(): cells for cells in (line.split("|")[1:-1] for line in result.stdout.splitlines()
                                                  if line.startswith("| model sets"))}
    assert "encoded 60 images (K = 2, D = 32)" in rows                                 # the checkpoint's sets
    assert "top 10 = (a) in 2/2" in rows["(b) bound-pruned exact"][9]
    assert rows["(d) set index, probe 2, 60 cand."][7].strip() == "100.0%"           # the whole gallery


def test_reproducibility_plan_runs_each_setting_once_and_repeats_only_the_named_runs(tmp_path, monkeypatch):
    import reproducibility as repro
    jobs = repro.plan_jobs(repro.RUN_SETTINGS, list(repro.RUNS), str(tmp_path))
    firsts = [job for job in jobs if job["repeat"] == 0]
    assert len(firsts) == len(repro.RUN_SETTINGS) * sum(len(seeds) for _, _, seeds in repro.RUNS.values())
    assert [(j["setting"], j["configuration"], j["seed"]) for j in jobs if j["repeat"]] == repro.REPEATS
    assert jobs[0]["setting"] == "base" and all(job["repeat"] for job in jobs[-len(repro.REPEATS):])
    assert len({job["run_dir"] for job in jobs}) == len(jobs)
    # the 3-epoch runs are the matching grid's runs: the same config hashes as their rows in matching.csv
    matching = ablation.plan_jobs(ablation.GRIDS["matching"], ["default", "crowded"], [5], ablation.BUDGET, [],
                                  str(tmp_path), 1)
    hashes = {(job["dataset"], job["name"]): job["config_hash"] for job in matching}
    for job in firsts:
        if job["configuration"] != "default 8 epochs":
            assert job["config_hash"] == hashes[job["dataset"], job["configuration"].split(": ")[-1]]
    # a run's environment holds its setting's switches and no other (not even one set in the caller's shell)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX")
    assert "ONEDNN_MAX_CPU_ISA" not in repro.isa_environment("base")
    assert repro.isa_environment("mkl_compatible")["MKL_CBWR"] == "COMPATIBLE"
    assert "ONEDNN_MAX_CPU_ISA" not in repro.isa_environment("mkl_compatible")
    assert repro.isa_environment("all_lowest")["OMP_NUM_THREADS"] == "1"


def test_reproducibility_tables_give_the_largest_move_and_compare_repeats_and_the_matching_csv():
    import reproducibility as repro
    earlier = next(row for row in read_csv(os.path.join(REPO, "benchmarks", "results", "matching.csv"))
                   if (row["configuration"], row["dataset"], row["seed"]) == ("smooth_chamfer div+mmd", "default", "5"))
    same = {key: earlier[key] for key in repro.CSV_COLUMNS if key in earlier}
    row = lambda setting, repeat, rsum, sha: {**same, "setting": setting, "repeat": str(repeat),  # noqa: E731
                                              "configuration": "smooth_chamfer div+mmd", "rsum": rsum,
                                              "last_weights_sha256": sha, "best_weights_sha256": sha}
    rows = [row("base", 0, earlier["rsum"], "aa"), row("onednn_avx", 0, "300.0", "bb"),
            row("all_lowest", 0, "340.5", "cc"), row("base", 1, earlier["rsum"], "aa")]
    text = repro.tables(rows)
    expected_move = max(abs(300.0 - float(earlier["rsum"])), abs(340.5 - float(earlier["rsum"])))
    assert (f"| smooth_chamfer div+mmd | 5 | rsum | {float(earlier['rsum']):.2f} | 300.00 | 340.50 | "
            f"{expected_move:.2f} |") in text
    assert f"| smooth_chamfer div+mmd | base | 5 | {earlier['rsum']} / {earlier['rsum']} | identical | identical |" in text
    assert "every metric identical" in text
    alone = repro.tables([row("base", 0, "300.0", "aa")])           # no other setting: no move to report
    assert "| smooth_chamfer div+mmd | 5 | rsum | 300.00 | - |" in alone and "| 1 of 19 metrics differ |" in alone


def test_the_reproducibility_pages_tables_are_the_scripts_output_on_the_committed_csv():
    # docs/reproducibility.md promises its tables are `reproducibility.py --table` on the committed CSV
    result = run_script(["benchmarks/reproducibility.py", "--table"])
    assert result.returncode == 0, result.stderr[-2000:]
    with open(os.path.join(REPO, "docs", "reproducibility.md"), encoding="utf-8") as handle:
        assert result.stdout.strip() in handle.read()


def test_exit_stress_counts_a_clean_two_process_stop_as_ok(tmp_path):
    result = run_script(["benchmarks/exit_stress.py", "--runs", "1", "--paths", "stop", "--out", str(tmp_path)])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "| stop | 1 | 1 | 0 | 0 | 0 | 0 | 0 |" in result.stdout, result.stdout[-2000:]
    assert not list(tmp_path.iterdir())        # no stderr kept: nothing went wrong
