"""How far training results move when only the instruction set of the math libraries changes.

docs/reproducibility.md holds the plan (written before the runs) and the analysis. On one machine,
each setting below restricts one library to an older instruction set through the switch that
library documents, and the same runs (same code, data, seeds, thread count) are trained under each:

    python benchmarks/reproducibility.py --probe      # does each switch change kernels and results? (minutes)
    python benchmarks/reproducibility.py --jobs 2     # the runs, stoppable and resumable (hours)
    python benchmarks/reproducibility.py --table      # the tables of docs/reproducibility.md, from the CSV

--probe runs, under each setting, a few fixed-input operations (convolution forward and backward,
matrix product, softmax, layer norm, randn) and two training steps of config.yaml, and prints which
outputs differ from the unrestricted setting, with the kernel each library reports (oneDNN's
convolution implementation, MKL's code path, torch's CPU capability). The runs append one row each
to benchmarks/results/reproducibility.csv (setting, configuration, seed, repeat, every test metric,
a hash of the final and best weights, minutes, commit, config hash); a run whose row is there is
not trained again, an interrupted one is resumed (a resumed run reaches the weights of an
uninterrupted one, tests/test_train.py).
"""
import argparse
import concurrent.futures
import csv
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import ablation  # noqa: E402

# The switches, each the documented way to cap one library's instruction set. The environment of
# every run starts without any of them, so "base" is what the libraries pick on this processor.
ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR",
                 "ATEN_CPU_CAPABILITY")
SETTINGS = {
    "base": {},
    "onednn_avx": {"ONEDNN_MAX_CPU_ISA": "AVX"},                  # oneDNN (convolutions): AVX kernels
    "onednn_sse41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},              # oneDNN: SSE4.1 kernels
    "mkl_sse4_2": {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},          # MKL (matrix products): probe only, see below
    "mkl_compatible": {"MKL_CBWR": "COMPATIBLE"},                 # MKL: its SSE2-only reproducible code path
    "aten_default": {"ATEN_CPU_CAPABILITY": "default"},           # torch's own kernels: no AVX2 vectorisation
    "all_lowest": {"ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default"},
}
# MKL_ENABLE_INSTRUCTIONS only restricts MKL's Intel code paths; --probe shows it changes nothing on
# an AMD processor, so the runs leave it out (their rows would repeat "base").
RUN_SETTINGS = ["base", "onednn_avx", "onednn_sse41", "mkl_compatible", "aten_default", "all_lowest"]

# The runs: name -> (dataset, train.py overrides, seeds). "default 8 epochs" is `python train.py
# run.num_threads=1` (config.yaml, seed 0); the others are the pre-registered experiment's runs
# without GD / ISD (benchmarks/ablation.py --grid matching, 3 epochs), whose seeds spread widely.
RUNS = {
    "default 8 epochs": ("default", [], [0]),
    "max_pair div+mmd": ("default", ablation.BUDGET + ["loss.similarity=max_pair"]
                         + ablation.REGULARISERS["div+mmd"], [1, 5]),
    "smooth_chamfer div+mmd": ("default", ablation.BUDGET + ["loss.similarity=smooth_chamfer"]
                               + ablation.REGULARISERS["div+mmd"], [1, 5]),
    "crowded: smooth_chamfer div+mmd": ("crowded", ablation.dataset_overrides("crowded") + ablation.BUDGET
                                        + ["loss.similarity=smooth_chamfer"] + ablation.REGULARISERS["div+mmd"],
                                        [5]),
}
# Runs trained a second time at the same setting: bit-identity, or not, at unchanged settings.
REPEATS = [("base", "default 8 epochs", 0), ("base", "smooth_chamfer div+mmd", 5)]

RESULTS = os.path.join(REPO, "benchmarks", "results", "reproducibility.csv")
CSV_COLUMNS = (["setting", "isa_env", "configuration", "dataset", "seed", "repeat", "epochs", "best_epoch",
                *ablation.RANK_KEYS]
               + [f"{side}_{key}" for side in ("image", "caption") for key in ablation.COLLAPSE_KEYS]
               + ["val_rsum", "last_weights_sha256", "best_weights_sha256", "minutes", "threads", "torch", "cpu",
                  "commit", "config_hash", "finished_utc"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--probe", action="store_true", help="check that each switch changes kernels and results")
    parser.add_argument("--table", action="store_true", help="print the tables from the CSV; train nothing")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=None)
    parser.add_argument("--only", nargs="+", choices=sorted(RUNS), default=None, help="run only these runs")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each)")
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "reproducibility"))
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--plan", action="store_true", help="list the runs and which the CSV holds; train nothing")
    parser.add_argument("--probe-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe_child:
        return probe_child()
    if args.table:
        print(tables(read_rows(args.results)) + "\n\n" + verdict_margins())
        return 0
    if args.probe:
        return probe(args.settings or list(SETTINGS), os.path.abspath(args.out))

    jobs = plan_jobs(args.settings or RUN_SETTINGS, args.only or list(RUNS), os.path.abspath(args.out))
    done = {job_key(row) for row in read_rows(args.results)}
    if args.plan:
        for job in jobs:
            print(f"{job['setting']:15s} {job['configuration']:32s} seed {job['seed']} repeat {job['repeat']} "
                  f"hash {job['config_hash']} {'in the CSV' if job_key(job) in done else 'to run'}")
        return 0
    for dataset in sorted({job["dataset"] for job in jobs}):     # once, before parallel runs race to generate it
        ablation.prepare_dataset(next(job["overrides"] for job in jobs if job["dataset"] == dataset))
    todo = [job for job in jobs if job_key(job) not in done]
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} in {args.results}; training {len(todo)}, {args.jobs} at a time",
          flush=True)
    commit, lock = ablation.git_commit(), threading.Lock()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        failed = [f for f in pool.map(lambda job: run_and_record(job, args.results, commit, lock), todo) if f]
    print(tables(read_rows(args.results)))
    return 1 if failed else 0


# ----------------------------------------------------------------------------- the runs

def plan_jobs(settings, names, out):
    """Every run as a dict: setting, configuration, dataset, seed, repeat, overrides, config hash.
    Setting by setting (base, then all_lowest, then the rest), each setting's long run first, so two
    workers pair a long run with short ones; the repeats come last."""
    jobs = []
    order = sorted(settings, key=lambda s: (s != "base", s != "all_lowest", RUN_SETTINGS.index(s)
                                            if s in RUN_SETTINGS else len(RUN_SETTINGS)))
    for repeat in (0, 1):
        for setting in order:
            for name in names:
                dataset, overrides, seeds = RUNS[name]
                for seed in seeds:
                    if repeat and (setting, name, seed) not in REPEATS:
                        continue
                    folder = ablation.run_name(name, seed) + (f"_repeat{repeat}" if repeat else "")
                    run_overrides = [f"run.out_dir={os.path.join(out, setting)}", f"run.name={folder}",
                                     f"run.seed={seed}", "run.num_threads=1", *overrides]
                    jobs.append({"setting": setting, "configuration": name, "dataset": dataset, "seed": seed,
                                 "repeat": repeat, "overrides": run_overrides,
                                 "run_dir": os.path.join(out, setting, folder),
                                 "config_hash": ablation.config_hash(ablation.load_config(None, run_overrides))})
    return jobs


def job_key(job):
    return job["setting"], job["configuration"], str(job["seed"]), str(job["repeat"])


def isa_environment(setting):
    """This process's environment without any ISA switch, plus the setting's, one thread, no spinning."""
    env = {k: v for k, v in os.environ.items() if k not in ISA_VARIABLES}
    return {**env, **SETTINGS[setting], "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}


def run_and_record(job, results, commit, lock):
    """Train (or resume) one run under its setting and append its row; returns an error text or None."""
    run_dir = job["run_dir"]
    os.makedirs(run_dir, exist_ok=True)
    resume = ["--resume", "auto"] if os.path.exists(os.path.join(run_dir, "last.pt")) else []
    started = time.time()
    with open(os.path.join(run_dir, "train_output.log"), "a") as log:
        process = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *resume, *job["overrides"]],
                                 cwd=REPO, env=isa_environment(job["setting"]), stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - started
    name = f"{job['setting']} / {job['configuration']} seed {job['seed']} repeat {job['repeat']}"
    if process.returncode != 0 or not os.path.exists(os.path.join(run_dir, "test_metrics.json")):
        print(f"FAILED {name} (exit {process.returncode}); see {run_dir}/train_output.log", flush=True)
        return f"exit {process.returncode}"
    row = results_row(job, seconds, commit)
    with lock:
        new_file = not os.path.exists(results) or os.path.getsize(results) == 0
        os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
        with open(results, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            if new_file:
                writer.writeheader()
            writer.writerow(row)
    print(f"done {name}: test RSUM {row['rsum']}, {seconds / 60:.1f} min", flush=True)
    return None


def results_row(job, seconds, commit):
    run_dir = job["run_dir"]
    with open(os.path.join(run_dir, "test_metrics.json")) as handle:
        metrics = json.load(handle)
    with open(os.path.join(run_dir, "log.jsonl")) as handle:
        epochs = [entry for entry in map(json.loads, handle) if "val" in entry]
    best = max(epochs, key=lambda entry: entry["val"]["rsum"])
    saved = ablation.saved_config(run_dir)
    row = {"setting": job["setting"], "isa_env": " ".join(f"{k}={v}" for k, v in SETTINGS[job["setting"]].items()),
           "configuration": job["configuration"], "dataset": job["dataset"], "seed": job["seed"],
           "repeat": job["repeat"], "epochs": saved["train"]["epochs"], "best_epoch": best["epoch"],
           **{key: metrics["all"][key] for key in ablation.RANK_KEYS},
           **{f"{side}_{key}": metrics["collapse"][side][key] for side in ("image", "caption")
              for key in ablation.COLLAPSE_KEYS},
           "val_rsum": best["val"]["rsum"],
           "last_weights_sha256": weights_hash(os.path.join(run_dir, "last.pt")),
           "best_weights_sha256": weights_hash(os.path.join(run_dir, "best.pt")),
           "minutes": round(seconds / 60, 3), "threads": 1, "torch": torch_version(), "cpu": cpu_name(),
           "commit": commit, "config_hash": ablation.config_hash(saved),
           "finished_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    return {key: round(value, 6) if isinstance(value, float) else value for key, value in row.items()}


def weights_hash(path):
    """16 hex digits of SHA-256 over a checkpoint's model weights (names and bytes, in name order)."""
    import torch
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def torch_version():
    import torch
    return torch.__version__


def cpu_name():
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def read_rows(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ----------------------------------------------------------------------------- the tables

# The measures of the tables: test RSUM, R@1 both ways, and the log circular variance averaged over
# image and caption sets (the measure the pre-registered experiment's H2 is decided on).
TABLE_MEASURES = {
    "rsum": lambda row: float(row["rsum"]),
    "i2t_r1": lambda row: float(row["i2t_r1"]),
    "t2i_r1": lambda row: float(row["t2i_r1"]),
    "log_circular_variance": lambda row: (float(row["image_log_circular_variance"])
                                          + float(row["caption_log_circular_variance"])) / 2,
}


def tables(rows):
    """Markdown: per run, test RSUM and R@1 under every setting with the largest move from base; then
    every repeat against its first run, and the base runs against benchmarks/results/matching.csv."""
    first = {(r["setting"], r["configuration"], r["seed"]): r for r in rows if r["repeat"] == "0"}
    settings = [s for s in RUN_SETTINGS if any(key[0] == s for key in first)]
    runs = sorted({(key[1], int(key[2])) for key in first}, key=lambda k: (list(RUNS).index(k[0]), k[1]))
    lines = ["| run | seed | measure | " + " | ".join(settings) + " | largest move from base |",
             "|---|---|---|" + "---|" * (len(settings) + 1)]
    for name, seed in runs:
        for measure, value in TABLE_MEASURES.items():
            values = [first.get((s, name, str(seed))) for s in settings]
            cells = [f"{value(v):.2f}" if v else "-" for v in values]
            base = first.get(("base", name, str(seed)))
            moves = [abs(value(v) - value(base)) for v in values[1:] if v and base] if settings[0] == "base" else []
            largest = f"{max(moves):.2f}" if moves else "-"
            lines.append(f"| {name} | {seed} | {measure} | " + " | ".join(cells) + f" | {largest} |")
    lines += ["", "| repeated run | setting | seed | test RSUM first / repeat | final weights | best weights |",
              "|---|---|---|---|---|---|"]
    for row in (r for r in rows if r["repeat"] != "0"):
        original = first.get((row["setting"], row["configuration"], row["seed"]))
        if original:
            same = lambda key: "identical" if row[key] == original[key] else "differ"     # noqa: E731
            lines.append(f"| {row['configuration']} | {row['setting']} | {row['seed']} | {original['rsum']} / "
                         f"{row['rsum']} | {same('last_weights_sha256')} | {same('best_weights_sha256')} |")
    matching = {(r["configuration"], r["dataset"], r["seed"], r["config_hash"]): r
                for r in read_rows(os.path.join(REPO, "benchmarks", "results", "matching.csv"))}
    compared = []
    for (setting, name, seed), row in sorted(first.items()):
        earlier = matching.get((name.split(": ")[-1], row["dataset"], seed, row["config_hash"]))
        if setting == "base" and earlier:
            keys = [*ablation.RANK_KEYS, *(f"{s}_{k}" for s in ("image", "caption") for k in ablation.COLLAPSE_KEYS)]
            differing = [k for k in keys if float(row[k]) != float(earlier[k])]
            compared.append(f"| {name} | {seed} | {earlier['commit']} | {earlier['rsum']} / {row['rsum']} | "
                            + ("every metric identical" if not differing else
                               f"{len(differing)} of {len(keys)} metrics differ") + " |")
    if compared:
        lines += ["", "| base run vs its row in matching.csv | seed | commit of that row | test RSUM there / here | "
                  "metrics |", "|---|---|---|---|---|", *compared]
    return "\n".join(lines)


def verdict_margins(path=os.path.join(REPO, "benchmarks", "results", "matching.csv")):
    """Markdown: every deciding comparison of the pre-registered experiment with its t statistic and
    the chance that a new set of runs (other seeds, or the same seeds on a processor whose rounding
    decorrelates them as much as another seed does) gives the same verdict, taking the measured mean
    difference and spread as the truth: a noncentral t with n - 1 degrees of freedom and
    noncentrality mean / (sd / sqrt(n))."""
    import ablation_tables
    from scipy import stats
    rows, _ = ablation_tables.current_rows(read_rows(path))
    lines = ["| dataset | comparison | measure | n | mean | sd | t | verdict | same verdict again |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dataset in ("default", "crowded"):
        chosen = [row for row in rows if row["dataset"] == dataset]
        for name, _, measure, comparisons, decisive in ablation_tables.HYPOTHESES:
            for better, worse in comparisons if decisive else []:
                result = ablation_tables.paired_difference(chosen, better, worse, measure)
                n, df = result["n"], result["n"] - 1
                t = result["mean"] / (result["sd"] / n ** 0.5)
                critical = stats.t.ppf(0.5 + ablation_tables.CONFIDENCE / 2, df)
                above, below = stats.nct.sf(critical, df, t), stats.nct.cdf(-critical, df, t)
                again = {"supported": above, "contradicted": below}.get(result["verdict"], 1 - above - below)
                lines.append(f"| {dataset} | {name}: {better} - {worse} | {measure} | {n} | {result['mean']:+.2f} "
                             f"| {result['sd']:.2f} | {t:+.2f} | {result['verdict']} | {again:.0%} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the probe

def probe(settings, out):
    """Per setting: the probe's output hashes, kernel names and 2-step weights; '=' where equal to base."""
    ablation.prepare_dataset([])
    results = {}
    for setting in settings:
        env = {**isa_environment(setting), "ONEDNN_VERBOSE": "1", "MKL_VERBOSE": "1"}
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe-child"], cwd=REPO, env=env,
                               capture_output=True, text=True, check=True)
        lines = child.stdout.splitlines()
        result = json.loads(next(line for line in lines if line.startswith("{")))
        fields = [line.split(",") for line in lines if line.startswith("onednn_verbose,v1,primitive,exec")]
        conv = [f"{f[7]}: {f[6]}" for f in fields if f[5] == "convolution"]   # e.g. forward_training: jit:avx2
        cnr = sorted({part for line in lines if line.startswith("MKL_VERBOSE") for part in line.split()
                      if part.startswith("CNR:")})
        result["onednn_conv"] = ", ".join(conv)
        result["mkl_path"] = "+".join(cnr)
        run_dir = os.path.join(out, "probe", setting)
        shutil.rmtree(run_dir, ignore_errors=True)
        subprocess.run([sys.executable, os.path.join(REPO, "train.py"), f"run.out_dir={os.path.dirname(run_dir)}",
                        f"run.name={setting}", "run.num_threads=1", "train.stop_after_steps=2"], cwd=REPO,
                       env=isa_environment(setting), check=True, capture_output=True)
        result["train_2_steps"] = weights_hash(os.path.join(run_dir, "last.pt"))
        results[setting] = result
        print(f"probed {setting}", file=sys.stderr, flush=True)
    keys = list(next(iter(results.values())))
    print("| setting | env | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    base = results.get("base")
    for setting, result in results.items():
        cells = [("=" if base and setting != "base" and result[k] == base[k] and k not in ("capability", "onednn_conv",
                                                                                          "mkl_path") else str(result[k]))
                 for k in keys]
        env = " ".join(f"{k}={v}" for k, v in SETTINGS[setting].items()) or "(none)"
        print(f"| {setting} | {env} | " + " | ".join(cells) + " |")
    return 0


def probe_child():
    """Fixed inputs (from NumPy, so torch's own random kernels cannot change them) through the operations
    each library serves; prints one JSON line of 12-digit output hashes."""
    import numpy
    import torch
    torch.set_num_threads(1)
    rng = numpy.random.default_rng(0)
    tensor = lambda *shape: torch.tensor(rng.standard_normal(shape, dtype=numpy.float32))   # noqa: E731
    digest = lambda t: hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:12]  # noqa: E731
    x, w = tensor(8, 64, 16, 16).requires_grad_(), tensor(64, 64, 3, 3).requires_grad_()
    y = torch.nn.functional.conv2d(x, w, padding=1)                            # oneDNN
    y.square().sum().backward()
    a, b, rows = tensor(256, 300), tensor(300, 200), tensor(100, 1000)
    print(json.dumps({
        "capability": torch.backends.cpu.get_cpu_capability(),
        "conv_forward": digest(y), "conv_grad_input": digest(x.grad), "conv_grad_weight": digest(w.grad),
        "matmul": digest(a @ b),                                                # MKL sgemm
        "softmax": digest(torch.softmax(3 * rows, dim=1)),                      # torch's vectorised kernels
        "layer_norm": digest(torch.nn.functional.layer_norm(rows, (1000,))),
        "exp": digest(torch.exp(rows)),
        "randn": digest(torch.randn(1000, generator=torch.Generator().manual_seed(0))),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
