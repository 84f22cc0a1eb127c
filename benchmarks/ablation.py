"""The paper's ablation in miniature: similarity method x anti-collapse losses on the built-in dataset.

The paper (its ablation table, MS-COCO RSUM) claims: exact Maximal Pair similarity beats DivE's
smooth-Chamfer, which beats PVSE's MIL; Global Discriminative + Intra-Set Divergence (GD + ISD) help
on top of either; and MaxMatch's sets collapse least. This script trains each configuration with
`train.py` for several seeds on the built-in `shapes` dataset under one reduced budget and writes a
markdown table: test RSUM mean and std over seeds, R@1 both ways, the set-collapse diagnostics of
METHOD.md §5 (image / caption) and the wall time per run.

    python benchmarks/ablation.py                  # 10 configurations x 3 seeds, about an hour on 2 cores
    python benchmarks/ablation.py --grid tune      # the loss-weight search behind config.yaml's defaults
    python benchmarks/ablation.py --quick          # tiny data, 2 configurations x 2 seeds: a smoke test

Every run lives in <out>/<configuration>_seed<N>/; a finished run trained with the same config is
reused, an interrupted one is resumed (a run with another config is an error, not reused), so a
long benchmark can be stopped and started again; the minutes of a resumed run count its last
invocation only. With --jobs 2
two runs share the cores (one thread each), which on 2 cores finishes the grid sooner than one run
with two threads; the times in the table are then per run while sharing.

    python benchmarks/ablation.py --grid matching --jobs 2 --threads 1   # the pre-registered experiment (docs/experiment.md)

    python benchmarks/ablation.py --grid sets --jobs 2 --threads 1       # the second one (docs/experiment_sets.md)

`--grid matching` and `--grid sets` run on two datasets, config.yaml's and the crowded preset (configs/shapes_crowded.yaml,
its runs in <out>/crowded_<configuration>_seed<N>/). Every finished run is appended as one row to a
CSV (default benchmarks/results/<grid>.csv; --quick: <out>/results.csv, never benchmarks/results/):
configuration, dataset, seed, every test recall, RSUM, median/mean ranks, every collapse measure, the
best epoch's validation numbers, epochs, minutes, threads, commit and a hash of the run's saved config
(without run names, paths, threads and seed); the sets grid adds the test and validation metrics
against every fitting item (mAP@R, R-Precision, R@1, positives per query, both directions). A run whose (configuration, dataset, seed, config hash)
row is in the CSV is not trained again, so the committed CSV carries finished runs across sessions and
machines; benchmarks/ablation_tables.py turns it into docs/experiment.md's tables.
"""
import argparse
import concurrent.futures
import csv
import datetime
import hashlib
import json
import math
import os
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from config import DEFAULT_CONFIG, ConfigError, load_config, merge_config, read_yaml  # noqa: E402
from data import prepare_data  # noqa: E402

# Which of the four set regularisers a configuration keeps; the kept ones use config.yaml's weights.
REGULARISERS = {
    "none": ["loss.mmd.weight=0", "loss.div.weight=0", "loss.gd.weight=0", "loss.isd.weight=0"],
    "div+mmd": ["loss.gd.weight=0", "loss.isd.weight=0"],              # DivE's losses (the paper's baselines)
    "gd+isd": ["loss.mmd.weight=0", "loss.div.weight=0"],              # the paper's two new losses only
    "all": [],                                                         # MaxMatch: all four
    "single": ["loss.div.weight=0", "loss.gd.weight=0", "loss.isd.weight=0"],   # one vector: MMD only
}
# The single-vector baseline (METHOD.md §1): no set head, K = 1; every similarity is then the cosine.
SINGLE_VECTOR = ["model.set_head.type=none", "model.num_embeds=1"]

# METHOD.md §3's starting values of the two new losses (config.yaml has the tuned ones).
START_GD_ISD = ["loss.gd.weight=0.01", "loss.isd.weight=0.01", "loss.gd.scale=10", "loss.isd.scale=10",
                "loss.gd.delta=0.5", "loss.isd.delta=0.3"]

# name: (similarity method, regularisers, extra overrides). The paper's rows plus greedy and the
# plain max_pair baseline, so that every claim has its pair of configurations.
GRIDS = {
    "ablation": {
        "mil div+mmd": ("mil", "div+mmd", []),
        "mil all": ("mil", "all", []),
        "smooth_chamfer div+mmd": ("smooth_chamfer", "div+mmd", []),
        "smooth_chamfer all": ("smooth_chamfer", "all", []),
        "greedy div+mmd": ("greedy", "div+mmd", []),
        "greedy all": ("greedy", "all", []),
        "max_pair none": ("max_pair", "none", []),
        "max_pair div+mmd": ("max_pair", "div+mmd", []),
        "max_pair gd+isd": ("max_pair", "gd+isd", []),
        "max_pair all": ("max_pair", "all", []),
    },
    # One factor at a time around the starting values of METHOD.md §3, on max_pair with every loss.
    # Judged by validation RSUM (the test split is kept for the ablation table).
    "tune": {
        "start: con 1, gd/isd 0.01": ("max_pair", "all", ["loss.con.weight=1", *START_GD_ISD]),
        "con 0": ("max_pair", "all", ["loss.con.weight=0", *START_GD_ISD]),
        "con 0.1": ("max_pair", "all", ["loss.con.weight=0.1", *START_GD_ISD]),
        "gd/isd 0.1": ("max_pair", "all", ["loss.gd.weight=0.1", "loss.isd.weight=0.1"]),
        "gd/isd 1": ("max_pair", "all", ["loss.gd.weight=1", "loss.isd.weight=1"]),
        "gd/isd 0.1, s 5": ("max_pair", "all", ["loss.gd.weight=0.1", "loss.isd.weight=0.1",
                                                "loss.gd.scale=5", "loss.isd.scale=5"]),
        "gd/isd 0.1, deltas 0.3/0.1": ("max_pair", "all", ["loss.gd.weight=0.1", "loss.isd.weight=0.1",
                                                           "loss.gd.delta=0.3", "loss.isd.delta=0.1"]),
        "gd/isd 0.1, deltas 0.7/0.5": ("max_pair", "all", ["loss.gd.weight=0.1", "loss.isd.weight=0.1",
                                                           "loss.gd.delta=0.7", "loss.isd.delta=0.5"]),
    },
    # The pre-registered experiment (docs/experiment.md):
    # H1 compares the three matchings with every loss, H2 the same three with DivE's Div + MMD only,
    # H3 each matching's two rows (GD + ISD added or not), so every run serves two hypotheses.
    "matching": {
        "max_pair all": ("max_pair", "all", []),
        "smooth_chamfer all": ("smooth_chamfer", "all", []),
        "mil all": ("mil", "all", []),
        "max_pair div+mmd": ("max_pair", "div+mmd", []),
        "smooth_chamfer div+mmd": ("smooth_chamfer", "div+mmd", []),
        "mil div+mmd": ("mil", "div+mmd", []),
    },
    # The second pre-registered experiment (docs/experiment_sets.md): H4 sets against one vector,
    # H5 max_pair against smooth_chamfer, both with every loss, judged against every fitting item.
    "sets": {
        "max_pair all": ("max_pair", "all", []),
        "smooth_chamfer all": ("smooth_chamfer", "all", []),
        "single vector": ("max_pair", "single", SINGLE_VECTOR),
    },
    "quick": {
        "mil div+mmd": ("mil", "div+mmd", []),
        "max_pair all": ("max_pair", "all", []),
    },
    "quick_sets": {
        "max_pair all": ("max_pair", "all", []),
        "single vector": ("max_pair", "single", SINGLE_VECTOR),
    },
}

# The reduced training budget of every full run: config.yaml's model and data, 3 epochs instead of 8.
BUDGET = ["train.epochs=3"]
# Grids with a budget of their own, per dataset (the sets experiment's, sized by its pilot:
# docs/experiment_sets.md, "Budget and pilot").
GRID_BUDGET = {"sets": {"default": ["train.epochs=8"], "crowded": ["train.epochs=17"]}}
# Datasets: name -> preset merged over config.yaml (None: config.yaml's own data). A preset is passed
# to train.py as dotted overrides (its run.* keys left out), so a run is fully named by its overrides.
DATASETS = {"default": None, "crowded": os.path.join("configs", "shapes_crowded.yaml")}
# Per grid: the datasets and seeds it runs unless --datasets / --seeds say otherwise. The matching
# grid's seeds leave out 0, the seed config.yaml's loss weights were tuned with (docs/ablation.md).
GRID_DATASETS = {"matching": ["default", "crowded"], "sets": ["default", "crowded"]}
GRID_SEEDS = {"matching": [1, 2, 3, 4, 5, 6, 7, 8], "sets": [1, 2, 3, 4, 5, 6, 7, 8], "quick": [0, 1],
              "quick_sets": [0, 1]}
# Config keys that do not change what a run computes (names, places, thread count, logging) or that the CSV
# keeps in its own column (seed): left out of the config hash.
UNHASHED_KEYS = ("run.name", "run.out_dir", "run.num_threads", "run.seed", "run.tensorboard", "data.root",
                 "data.karpathy_json", "data.image_dir", "data.num_workers")
COLLAPSE_KEYS = ("intra_set_cos", "global_cos", "log_set_variance", "log_circular_variance")
RANK_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_medr", "t2i_medr",
             "i2t_meanr", "t2i_meanr")
CSV_COLUMNS = (["configuration", "dataset", "seed", "method", "regularisers", "epochs", "best_epoch", *RANK_KEYS]
               + [f"{side}_{key}" for side in ("image", "caption") for key in COLLAPSE_KEYS]
               + ["val_rsum", "val_i2t_r1", "val_t2i_r1"]
               + [f"val_{side}_{key}" for side in ("image", "caption") for key in COLLAPSE_KEYS]
               + ["minutes", "threads", "commit", "config_hash", "finished_utc"])
COMPLETE_KEYS = ("map_at_r", "r_precision", "r1", "positives_per_query")
# The sets grids also keep the metrics against every fitting item (test, and the best epoch's validation).
COMPLETE_COLUMNS = [f"{prefix}complete_{direction}_{key}" for prefix in ("", "val_") for direction in ("i2t", "t2i")
                    for key in COMPLETE_KEYS]
GRID_COLUMNS = {"sets": CSV_COLUMNS + COMPLETE_COLUMNS, "quick_sets": CSV_COLUMNS + COMPLETE_COLUMNS}
# The quick mode: tiny data and model, one epoch (as the train.py tests use), seconds per run.
QUICK_BUDGET = ["train.epochs=1", "train.batch_size=8", "eval.batch_size=16", "model.embed_dim=32",
                "model.num_embeds=2", "model.set_head.depth=1", "model.text.word_dim=16",
                "data.shapes.num_train=32", "data.shapes.num_val=16", "data.shapes.num_test=16",
                "data.shapes.image_size=32", "data.image_size=32", "model.image.stop_after=layer1"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="ablation")
    parser.add_argument("--quick", action="store_true", help="tiny data, 2 configurations x 2 seeds "
                        "(with --grid sets: the sets grid's max_pair and single-vector rows)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="default: 0 1 2 (matching: 1 to 8; quick: 0 1)")
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=None,
                        help="default: default (matching: default crowded)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these configuration names")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    parser.add_argument("--out", default=None, help="default: runs/ablation_<grid> (quick: runs/ablation_quick)")
    parser.add_argument("--table", default=None, help="markdown output (default: <out>/table.md)")
    parser.add_argument("--results", default=None,
                        help="CSV of finished runs (default: benchmarks/results/<grid>.csv; quick: <out>/results.csv)")
    parser.add_argument("--plan", action="store_true", help="list the runs, their config hashes and which the CSV "
                        "already holds; train nothing")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides for every run, e.g. train.epochs=2")
    args = parser.parse_args(argv)

    grid = ("quick_sets" if args.grid == "sets" else "quick") if args.quick else args.grid
    columns = GRID_COLUMNS.get(grid, CSV_COLUMNS)
    configurations = GRIDS[grid]
    if args.only:
        unknown = sorted(set(args.only) - set(configurations))
        if unknown:
            parser.error(f"unknown configuration(s) {unknown}; grid '{grid}' has {sorted(configurations)}")
        configurations = {name: configurations[name] for name in args.only}
    seeds = args.seeds if args.seeds is not None else GRID_SEEDS.get(grid, [0, 1, 2])
    datasets = args.datasets or GRID_DATASETS.get(grid, ["default"])
    out = os.path.abspath(args.out or os.path.join(REPO, "runs", f"ablation_{grid}"))
    results_path = os.path.abspath(args.results or (os.path.join(out, "results.csv") if args.quick else
                                                    os.path.join(REPO, "benchmarks", "results", f"{grid}.csv")))
    threads = args.threads or max(1, len(os.sched_getaffinity(0)) // args.jobs)
    budget = QUICK_BUDGET if args.quick else GRID_BUDGET.get(grid, BUDGET)     # a list, or {dataset: list}
    if any(o.startswith("data.root=") for o in args.overrides) and len(datasets) > 1:
        parser.error("data.root would put every dataset in one folder; run one --datasets at a time")

    try:
        jobs = plan_jobs(configurations, datasets, seeds, budget, args.overrides, out, threads, args.quick)
        finished = read_results(results_path, columns)
    except (ConfigError, ValueError) as error:     # a bad override or preset, a CSV of other columns
        print(f"error: {error}", file=sys.stderr)
        return 2
    if len({run_name(job["label"], job["seed"]) for job in jobs}) != len(jobs):
        parser.error("two configurations map to the same run folder name; rename one")
    if args.plan:
        done = [results_key(job["name"], job["dataset"], job["seed"], job["config_hash"]) in finished for job in jobs]
        for job, in_csv in zip(jobs, done):
            print(f"{job['dataset']:10s} {job['name']:24s} seed {job['seed']:<4d} hash {job['config_hash']} "
                  f"{'in the CSV' if in_csv else 'to run'}")
        print(f"{len(jobs)} runs, {sum(done)} of them in {results_path}")
        return 0
    for dataset in datasets:    # once each, before parallel runs could race to generate it
        prepare_dataset(next(job["overrides"] for job in jobs if job["dataset"] == dataset))
    started = time.time()
    print(f"{len(jobs)} runs ({len(configurations)} configurations x {len(datasets)} dataset(s) x {len(seeds)} "
          f"seeds), {args.jobs} at a time, {threads} thread(s) each; runs in {out}, results in {results_path}",
          flush=True)
    recorder = ResultsRecorder(results_path, finished, commit=git_commit(), columns=columns)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda job: recorder.run_or_reuse(job, out, threads), jobs))

    split = "val" if grid == "tune" else "test"      # tuning never looks at the test split
    tables = []
    for dataset in datasets:
        table = markdown_table(summarise(configurations, [r for r in results if r["dataset"] == dataset], split),
                               split)
        tables.append(table if datasets == ["default"] else f"Dataset `{dataset}`:\n\n{table}")
    table = "\n\n".join(tables)
    reused = sum(1 for r in results if r.get("reused"))
    run_minutes = sum(r.get("seconds", 0.0) for r in results) / 60
    shown = lambda overrides: " ".join(b for b in [*overrides, *args.overrides] if "data.root" not in b)  # noqa: E731
    budget_text = ("; ".join(f"{dataset}: {shown(budget[dataset])}" for dataset in datasets)
                   if isinstance(budget, dict) else shown(budget))                    # what every run got
    header = (f"Grid `{grid}`, {len(seeds)} seed(s) {seeds}, budget `{budget_text}`, "
              f"{args.jobs} run(s) at a time x {threads} thread(s); this invocation {(time.time() - started) / 60:.1f} "
              f"min, {reused} of {len(results)} runs reused; the runs' own times sum to {run_minutes:.1f} min.\n\n")
    table_path = args.table or os.path.join(out, "table.md")
    os.makedirs(os.path.dirname(os.path.abspath(table_path)), exist_ok=True)
    with open(table_path, "w") as handle:
        handle.write(header + table + "\n")
    print("\n" + header + table + f"\n\nwritten to {table_path}; raw results in {results_path}", flush=True)
    failed = [r for r in results if r["error"]]
    return 1 if failed else 0


def plan_jobs(configurations, datasets, seeds, budget, extra_overrides, out, threads, quick=False):
    """Every run of the grid as a dict: name, dataset, seed, label (the run folder's stem), method,
    regularisers, train.py overrides and the config hash they give."""
    jobs = []
    for dataset in datasets:
        dataset_budget = dataset_overrides(dataset) + list(budget[dataset] if isinstance(budget, dict) else budget)
        if quick:
            dataset_budget.append(f"data.root={os.path.join(out, 'data' if dataset == 'default' else 'data_' + dataset)}")
        dataset_budget += list(extra_overrides)
        for name, (method, regularisers, extra) in configurations.items():
            label = name if dataset == "default" else f"{dataset}: {name}"      # run folder crowded_<name>_seed<N>
            for seed in seeds:
                overrides = run_overrides(method, regularisers, extra, dataset_budget, out, label, seed, threads)
                jobs.append({"name": name, "dataset": dataset, "seed": seed, "label": label, "method": method,
                             "regularisers": regularisers, "overrides": overrides,
                             "config_hash": config_hash(load_config(None, overrides))})
    return jobs


def run_overrides(method, regularisers, extra, budget, out, name, seed, threads):
    """train.py overrides of one run: budget, method, regulariser switches, then the configuration's own."""
    return ([f"run.out_dir={out}", f"run.name={run_name(name, seed)}", f"run.seed={seed}",
             f"run.num_threads={threads}", f"loss.similarity={method}"]
            + budget + REGULARISERS[regularisers] + list(extra))


def run_one(name, seed, overrides, out):
    """Train (or reuse, or resume) one run; returns its metrics or its error."""
    run_dir = os.path.join(out, run_name(name, seed))
    result = {"name": name, "seed": seed, "run_dir": run_dir, "error": None}
    record = os.path.join(run_dir, "ablation_run.json")
    metrics_path = os.path.join(run_dir, "test_metrics.json")
    started_before = os.path.exists(os.path.join(run_dir, "last.pt"))
    if started_before and not trained_with(run_dir, overrides):
        message = f"{run_dir} holds a run with another config; delete it or pass --out"
        print(f"FAILED {name} seed {seed}: {message}", flush=True)
        return {**result, "error": message}
    if started_before and os.path.exists(record) and current_layout(metrics_path):
        with open(record) as handle:
            previous = json.load(handle)
        return {**result, **read_metrics(run_dir), "seconds": previous["seconds"], "reused": True}
    resume = ["--resume", "auto"] if started_before else []
    os.makedirs(run_dir, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": overrides_value(overrides, "run.num_threads"),
           "OMP_WAIT_POLICY": "PASSIVE"}     # two runs sharing cores: no OpenMP spin-waiting
    started = time.time()
    with open(os.path.join(run_dir, "train_output.log"), "a") as log:
        process = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *resume, *overrides],
                                 cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - started
    if process.returncode != 0 or not os.path.exists(metrics_path):
        with open(os.path.join(run_dir, "train_output.log")) as handle:
            tail = handle.read()[-600:]
        print(f"FAILED {name} seed {seed} (exit {process.returncode}); end of {run_dir}/train_output.log:\n{tail}",
              flush=True)
        return {**result, "error": f"exit {process.returncode}"}
    with open(record, "w") as handle:
        json.dump({"overrides": overrides, "seconds": seconds}, handle, indent=2)
    metrics = read_metrics(run_dir)
    print(f"done {name} seed {seed}: val RSUM {metrics['val_rsum']:.1f}, test RSUM {metrics['rsum']:.1f}, "
          f"{seconds / 60:.1f} min", flush=True)
    return {**result, **metrics, "seconds": seconds, "reused": False}


def trained_with(run_dir, overrides):
    """Whether the run in run_dir was trained with the config that config.yaml + overrides give now.

    The run's saved config is merged over today's defaults first (as evaluate.py does), so a key
    added since then counts with its default; the thread count may differ."""
    try:
        saved = merge_config(read_yaml(DEFAULT_CONFIG), read_yaml(os.path.join(run_dir, "config.yaml")),
                             source=run_dir)
    except Exception:     # unreadable, or keys that no longer exist: not the same config
        return False
    wanted = load_config(None, overrides)
    for cfg in (saved, wanted):
        cfg["run"].pop("num_threads")
    return saved == wanted


def current_layout(metrics_path):
    """Whether test_metrics.json exists in today's layout ({"all": {...}, ...}). An older flat file
    (written before ties counted against the ground truth) is not reused: --resume auto on the
    finished run evaluates best.pt again and rewrites it."""
    if not os.path.exists(metrics_path):
        return False
    with open(metrics_path) as handle:
        return "all" in json.load(handle)


def read_metrics(run_dir):
    """Test metrics of best.pt plus the best validation RSUM from log.jsonl."""
    with open(os.path.join(run_dir, "test_metrics.json")) as handle:
        metrics = json.load(handle)
    with open(os.path.join(run_dir, "log.jsonl")) as handle:
        epochs = [entry for entry in map(json.loads, handle) if "val" in entry]
    best = max(epochs, key=lambda entry: entry["val"]["rsum"])      # the epoch best.pt comes from
    test = metrics["all"]
    return {"rsum": test["rsum"], "i2t_r1": test["i2t_r1"], "t2i_r1": test["t2i_r1"],
            "collapse": metrics["collapse"], "val_rsum": best["val"]["rsum"], "val_i2t_r1": best["val"]["i2t_r1"],
            "val_t2i_r1": best["val"]["t2i_r1"], "val_collapse": best["collapse"]}


def summarise(configurations, results, split="test"):
    """One row per configuration: mean and std over its finished seeds, of the test metrics or
    (split="val", for tuning) of the validation metrics of the best epoch."""
    prefix = "" if split == "test" else "val_"
    rows = []
    for name, (method, regularisers, extra) in configurations.items():
        runs = [r for r in results if r["name"] == name and not r["error"]]
        row = {"name": name, "method": method, "regularisers": regularisers, "runs": len(runs),
               "failed": sum(1 for r in results if r["name"] == name and r["error"])}
        if runs:
            for key in ("rsum", "i2t_r1", "t2i_r1"):
                row[key] = mean_std([r[prefix + key] for r in runs])
            row["seconds"] = mean_std([r["seconds"] for r in runs])
            for side in ("image", "caption"):
                for key in ("intra_set_cos", "global_cos", "log_set_variance"):
                    row[f"{side}_{key}"] = mean_std([math.nan if r[prefix + "collapse"][side][key] is None
                                                     else r[prefix + "collapse"][side][key] for r in runs])
        rows.append(row)
    return rows


def markdown_table(rows, split="test"):
    """The summary as a markdown table; collapse columns read image / caption."""
    lines = [f"| configuration | {split} RSUM (mean ± std) | i2t R@1 | t2i R@1 | intra-set cos | cos to global "
             "| log set variance | min / run | runs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if not row["runs"]:
            lines.append(f"| {row['name']} | failed | | | | | | | 0 / {row['failed']} failed |")
            continue
        rsum = row["rsum"]
        pair = lambda key, digits: (f"{row['image_' + key][0]:.{digits}f} / "       # noqa: E731
                                    f"{row['caption_' + key][0]:.{digits}f}")
        runs = f"{row['runs']}" + (f" ({row['failed']} failed)" if row["failed"] else "")
        lines.append(f"| {row['name']} | {rsum[0]:.1f} ± {format_std(rsum[1])} | {row['i2t_r1'][0]:.1f} "
                     f"| {row['t2i_r1'][0]:.1f} | {pair('intra_set_cos', 2)} | {pair('global_cos', 2)} "
                     f"| {pair('log_set_variance', 2)} | {row['seconds'][0] / 60:.1f} | {runs} |")
    return "\n".join(lines)


def mean_std(values):
    """Mean and sample standard deviation (nan for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def format_std(std):
    return "n/a" if math.isnan(std) else f"{std:.1f}"


def run_name(name, seed):
    return name.replace(":", "").replace(" ", "_").replace("/", "-").replace(",", "").replace("+", "") + f"_seed{seed}"


def overrides_value(overrides, key):
    return [o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")][-1]


def prepare_dataset(overrides):
    """Generate the runs' shapes dataset if it is missing (data.py reads the same overrides)."""
    prepare_data(load_config(None, [o for o in overrides if o.startswith("data.")])["data"])



class ResultsRecorder:
    """The CSV of finished runs: reuses a run found there, appends a row when a run finishes."""

    def __init__(self, path, finished, commit, columns=CSV_COLUMNS):
        self.path, self.finished, self.commit, self.columns = path, finished, commit, columns
        self.lock = threading.Lock()

    def run_or_reuse(self, job, out, threads):
        """The job's result: from its CSV row when (configuration, dataset, seed, config hash) is there,
        else from run_one (which reuses or resumes a run folder), appended to the CSV when it finished."""
        identity = {"name": job["name"], "dataset": job["dataset"], "seed": job["seed"]}
        row = self.finished.get(results_key(job["name"], job["dataset"], job["seed"], job["config_hash"]))
        if row is not None:
            return {**row_result(row), **identity, "error": None, "reused": True}
        result = {**run_one(job["label"], job["seed"], job["overrides"], out=out), **identity}
        if not result["error"]:
            row = results_row(job, result["run_dir"], result["seconds"], threads, self.commit)
            self.append({key: row.get(key, "") for key in self.columns})
        return result

    def append(self, row):
        with self.lock:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            new_file = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
            with open(self.path, "a", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.columns)
                if new_file:
                    writer.writeheader()
                writer.writerow(row)
                handle.flush()
                os.fsync(handle.fileno())
            self.finished[results_key(row["configuration"], row["dataset"], row["seed"], row["config_hash"])] = row


def read_results(path, columns=CSV_COLUMNS):
    """{(configuration, dataset, seed, config hash): row} of a results CSV ({} when there is none)."""
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            return {}
        if list(reader.fieldnames) != list(columns):
            raise ValueError(f"{path} has the columns {reader.fieldnames}, not this grid's {list(columns)}; "
                             "move it aside or pass --results")
        return {results_key(row["configuration"], row["dataset"], row["seed"], row["config_hash"]): row
                for row in reader}


def results_row(job, run_dir, seconds, threads, commit):
    """One CSV row of a finished run, from its folder: test_metrics.json, log.jsonl, config.yaml."""
    with open(os.path.join(run_dir, "test_metrics.json")) as handle:
        metrics = json.load(handle)
    test = metrics["all"] if isinstance(metrics.get("all"), dict) else metrics     # nested or flat layout
    with open(os.path.join(run_dir, "log.jsonl")) as handle:
        epochs = [entry for entry in map(json.loads, handle) if "val" in entry]
    best = max(epochs, key=lambda entry: entry["val"]["rsum"])      # the epoch best.pt comes from
    saved = saved_config(run_dir)
    row = {"configuration": job["name"], "dataset": job["dataset"], "seed": job["seed"], "method": job["method"],
           "regularisers": job["regularisers"], "epochs": saved["train"]["epochs"], "best_epoch": best["epoch"],
           **{key: test.get(key, "") for key in RANK_KEYS},
           "val_rsum": best["val"]["rsum"], "val_i2t_r1": best["val"]["i2t_r1"], "val_t2i_r1": best["val"]["t2i_r1"],
           "minutes": round(seconds / 60, 3), "threads": threads, "commit": commit,
           "config_hash": config_hash(saved),
           "finished_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    for prefix, collapse in (("", metrics["collapse"]), ("val_", best["collapse"])):
        for side in ("image", "caption"):
            for key in COLLAPSE_KEYS:
                value = collapse[side].get(key, "")       # runs older than a measure: blank
                row[f"{prefix}{side}_{key}"] = "" if value is None else value       # absent at K = 1: blank
    for prefix, complete in (("", metrics.get("complete")), ("val_", best.get("val_complete"))):
        for direction in ("i2t", "t2i"):
            for key in COMPLETE_KEYS:
                row[f"{prefix}complete_{direction}_{key}"] = complete[direction][key] if complete else ""
    return {key: round(value, 6) if isinstance(value, float) else value for key, value in row.items()}


def row_result(row):
    """A CSV row as the result dict summarise() reads (numbers as floats, blanks as nan)."""
    number = lambda key: float(row[key]) if row[key] != "" else math.nan      # noqa: E731
    collapse = lambda prefix: {side: {key: number(f"{prefix}{side}_{key}") for key in COLLAPSE_KEYS}  # noqa: E731
                               for side in ("image", "caption")}
    return {**{key: number(key) for key in RANK_KEYS}, "collapse": collapse(""), "val_collapse": collapse("val_"),
            "val_rsum": number("val_rsum"), "val_i2t_r1": number("val_i2t_r1"), "val_t2i_r1": number("val_t2i_r1"),
            "seconds": 60 * number("minutes")}


def results_key(configuration, dataset, seed, hash_):
    return configuration, dataset, str(seed), hash_


def config_hash(cfg):
    """12 hex digits of SHA-256 over the config without UNHASHED_KEYS: equal for the runs of one
    configuration, dataset and budget whatever their seed, folder or thread count."""
    cfg = json.loads(json.dumps(cfg))
    for key in UNHASHED_KEYS:
        section, leaf = key.split(".")
        cfg.get(section, {}).pop(leaf, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def saved_config(run_dir):
    """A run's saved config merged over today's config.yaml (as evaluate.py reads checkpoints)."""
    return merge_config(read_yaml(DEFAULT_CONFIG), read_yaml(os.path.join(run_dir, "config.yaml")), source=run_dir)


def dataset_overrides(dataset):
    """A dataset's preset as dotted train.py overrides (its run.* keys left out)."""
    preset = DATASETS[dataset]
    if preset is None:
        return []
    content = {k: v for k, v in read_yaml(os.path.join(REPO, preset)).items() if k != "run"}
    return flatten_config(content, read_yaml(DEFAULT_CONFIG))


def flatten_config(update, defaults, prefix=""):
    """{'data': {'root': 'x'}} -> ['data.root="x"']; a dict stays one value where the default is a
    free-form (empty) dict, as merge_config treats it. Values are JSON, which the overrides parse as YAML."""
    items = []
    for key, value in update.items():
        default = defaults.get(key) if isinstance(defaults, dict) else None
        if isinstance(value, dict) and isinstance(default, dict) and default:
            items += flatten_config(value, default, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={json.dumps(value)}")
    return items


def git_commit():
    """The checked-out commit (12 hex digits), '-dirty' when tracked files outside benchmarks/results differ."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


if __name__ == "__main__":
    sys.exit(main())
