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
"""
import argparse
import concurrent.futures
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from config import DEFAULT_CONFIG, load_config, merge_config, read_yaml  # noqa: E402
from data import prepare_data  # noqa: E402

# Which of the four set regularisers a configuration keeps; the kept ones use config.yaml's weights.
REGULARISERS = {
    "none": ["loss.mmd.weight=0", "loss.div.weight=0", "loss.gd.weight=0", "loss.isd.weight=0"],
    "div+mmd": ["loss.gd.weight=0", "loss.isd.weight=0"],              # DivE's losses (the paper's baselines)
    "gd+isd": ["loss.mmd.weight=0", "loss.div.weight=0"],              # the paper's two new losses only
    "all": [],                                                         # MaxMatch: all four
}

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
    "quick": {
        "mil div+mmd": ("mil", "div+mmd", []),
        "max_pair all": ("max_pair", "all", []),
    },
}

# The reduced training budget of every full run: config.yaml's model and data, 3 epochs instead of 8.
BUDGET = ["train.epochs=3"]
# The quick mode: tiny data and model, one epoch (as the train.py tests use), seconds per run.
QUICK_BUDGET = ["train.epochs=1", "train.batch_size=8", "eval.batch_size=16", "model.embed_dim=32",
                "model.num_embeds=2", "model.set_head.depth=1", "model.text.word_dim=16",
                "data.shapes.num_train=32", "data.shapes.num_val=16", "data.shapes.num_test=16",
                "data.shapes.image_size=32", "data.image_size=32", "model.image.stop_after=layer1"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="ablation")
    parser.add_argument("--quick", action="store_true", help="tiny data, 2 configurations x 2 seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0 1)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these configuration names")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    parser.add_argument("--out", default=None, help="default: runs/ablation_<grid> (quick: runs/ablation_quick)")
    parser.add_argument("--table", default=None, help="markdown output (default: <out>/table.md)")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides for every run, e.g. train.epochs=2")
    args = parser.parse_args(argv)

    grid = "quick" if args.quick else args.grid
    configurations = GRIDS[grid]
    if args.only:
        unknown = sorted(set(args.only) - set(configurations))
        if unknown:
            parser.error(f"unknown configuration(s) {unknown}; grid '{grid}' has {sorted(configurations)}")
        configurations = {name: configurations[name] for name in args.only}
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.quick else [0, 1, 2])
    out = os.path.abspath(args.out or os.path.join(REPO, "runs", f"ablation_{grid}"))
    threads = args.threads or max(1, len(os.sched_getaffinity(0)) // args.jobs)
    budget = list(QUICK_BUDGET if args.quick else BUDGET)
    if args.quick:
        budget.append(f"data.root={os.path.join(out, 'data')}")
    budget += args.overrides

    jobs = [(name, seed, run_overrides(method, regularisers, extra, budget, out, name, seed, threads))
            for name, (method, regularisers, extra) in configurations.items() for seed in seeds]
    if len({run_name(name, seed) for name, seed, _ in jobs}) != len(jobs):
        parser.error("two configurations map to the same run folder name; rename one")
    prepare_dataset(jobs[0][2])   # once, before parallel runs could race to generate it
    started = time.time()
    print(f"{len(jobs)} runs ({len(configurations)} configurations x {len(seeds)} seeds), {args.jobs} at a time, "
          f"{threads} thread(s) each; runs in {out}", flush=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda job: run_one(*job, out=out), jobs))

    split = "val" if grid == "tune" else "test"      # tuning never looks at the test split
    table = markdown_table(summarise(configurations, results, split), split)
    reused = sum(1 for r in results if r.get("reused"))
    run_minutes = sum(r.get("seconds", 0.0) for r in results) / 60
    header = (f"Grid `{grid}`, {len(seeds)} seed(s) {seeds}, budget `{' '.join(b for b in budget if 'data.root' not in b)}`, "
              f"{args.jobs} run(s) at a time x {threads} thread(s); this invocation {(time.time() - started) / 60:.1f} "
              f"min, {reused} of {len(results)} runs reused; the runs' own times sum to {run_minutes:.1f} min.\n\n")
    table_path = args.table or os.path.join(out, "table.md")
    os.makedirs(os.path.dirname(os.path.abspath(table_path)), exist_ok=True)
    with open(table_path, "w") as handle:
        handle.write(header + table + "\n")
    print("\n" + header + table + f"\n\nwritten to {table_path}", flush=True)
    failed = [r for r in results if r["error"]]
    return 1 if failed else 0


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
                    row[f"{side}_{key}"] = mean_std([r[prefix + "collapse"][side][key] for r in runs])
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


if __name__ == "__main__":
    sys.exit(main())
