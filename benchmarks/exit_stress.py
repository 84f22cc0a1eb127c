"""Many torchrun runs of the suite's multi-process exit paths, counting how each one ended.

    python benchmarks/exit_stress.py --runs 300 --jobs 3              # what docs/training.md reports
    python benchmarks/exit_stress.py --runs 6 --paths stop            # a quick look

The paths, taken in turn (tests/test_distributed.py and tests/test_elastic.py run each once):
- stop: `torchrun --nproc_per_node=2 train.py train.stop_after_steps=3` (2 gloo processes on the
  default path at the test suite's tiny size);
- continue: 2 processes stop after 5 steps, then one process continues with --resume auto (the
  suite's "2-1" continuation, where the abort at exit was seen in CI);
- kill: SIGKILL to rank 1 once step 3 is logged, under `--max-restarts=1`: the survivor must leave
  with its one line and the restarted workers finish the run.

Each run counts as: ok; abort (a worker ended by SIGABRT, or "terminate called" in its stderr);
missing line (kill path: the survivor's "another process of the job died or hung" line absent);
threads left (train.py's warning that gloo threads were still running at exit); hang (past
--limit seconds: the workers get SIGABRT, so their Python stacks are in the kept stderr, then
SIGKILL); other failure (any other non-zero exit). --jobs runs go at once; --load starts that many
busy-looping processes beside them. Prints one line per run and a table per path; the stderr of
every run that was not ok is written to <out>/<run>.stderr.
"""
import argparse
import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
from data import prepare_data  # noqa: E402
from test_distributed import ENV, GLOO_THREADS_WARNING, kill_job, start_torchrun  # noqa: E402
from test_elastic import wait_for_logged_step, worker_pid  # noqa: E402
from test_train import tiny_overrides  # noqa: E402
import config  # noqa: E402

PATHS = ("stop", "continue", "kill")
OUTCOMES = ("ok", "abort", "missing line", "threads left", "hang", "other failure")
LOST_PEER_LINE = "another process of the job died or hung"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="runs in all, the paths taken in turn")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--load", type=int, default=0, help="busy-looping processes beside the runs")
    parser.add_argument("--limit", type=float, default=300, help="seconds before a run counts as a hang")
    parser.add_argument("--out", default=None, help="folder for the stderr of runs that were not ok "
                        "(default: a temporary folder, printed)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="exit_stress_"))
    out = Path(args.out) if args.out else work / "failures"
    out.mkdir(parents=True, exist_ok=True)
    shapes = work / "shapes"
    prepare_data(config.load_config(None, tiny_overrides(work, name="unused") + [f"data.root={shapes}"])["data"])
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    plan = [(index, args.paths[index % len(args.paths)]) for index in range(args.runs)]
    results = []
    started = time.time()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(one_run, index, path, work, shapes, args.limit) for index, path in plan]
            for future in concurrent.futures.as_completed(futures):
                result = future.result()
                results.append(result)
                if result["outcome"] != "ok":
                    (out / f"{result['index']:04d}_{result['path']}.stderr").write_text(result["stderr"])
                print(f"run {result['index']:4d} {result['path']:9s} {result['outcome']:14s} "
                      f"exit {result['codes']} {result['seconds']:.0f}s", flush=True)
    finally:
        for process in load:
            process.kill()
        shutil.rmtree(work / "runs", ignore_errors=True)
    print(f"\n{len(results)} runs in {(time.time() - started) / 60:.1f} min, {args.jobs} at a time, {args.load} "
          f"busy process(es) beside them, on {os.cpu_count()} cores; stderr of runs not ok: {out}\n")
    print(table(results))


def one_run(index, path, work, shapes, limit):
    """One run of `path`; its outcome, exit codes, seconds and stderr."""
    root = work / f"run{index}"
    base = tiny_overrides(root, name="run") + [f"data.root={shapes}"]
    started = time.time()
    if path == "stop":
        steps = [attempt(base + ["train.stop_after_steps=3"], ["--standalone", "--nproc_per_node=2"], limit)]
    elif path == "continue":
        steps = [attempt(base + ["train.stop_after_steps=5"], ["--standalone", "--nproc_per_node=2"], limit)]
        if steps[0]["code"] == 0:
            steps.append(attempt(base + ["--resume", "auto"], ["--standalone", "--nproc_per_node=1"], limit))
    else:
        steps = [attempt(base + ["train.epochs=2"], ["--standalone", "--nproc_per_node=2", "--max-restarts=1"],
                         limit, kill_at=(root / "runs" / "run" / "log.jsonl", 3))]
    shutil.rmtree(root, ignore_errors=True)
    stderr = "\n".join(step["stderr"] for step in steps)
    return {"index": index, "path": path, "outcome": outcome(path, steps, stderr),
            "codes": [step["code"] for step in steps], "seconds": time.time() - started, "stderr": stderr}


def attempt(args, launcher, limit, kill_at=None):
    """One torchrun job; {'code', 'stderr', 'hung'}."""
    process = start_torchrun(args, launcher)
    deadline = time.time() + limit
    try:
        if kill_at is not None:
            wait_for_logged_step(process, kill_at[0], kill_at[1], timeout=limit)
            os.kill(worker_pid(process.pid, rank=1), signal.SIGKILL)
        _, stderr = process.communicate(timeout=max(deadline - time.time(), 1))
        return {"code": process.returncode, "stderr": stderr, "hung": False}
    except (AssertionError, subprocess.TimeoutExpired) as error:
        stderr = kill_job(process)      # SIGABRT first: the workers' Python stacks
        return {"code": process.returncode, "stderr": f"{error}\n{stderr}", "hung": True}


def outcome(path, steps, stderr):
    if any(step["hung"] for step in steps):
        return "hang"
    if "terminate called" in stderr or "SIGABRT" in stderr or "Signal 6" in stderr:
        return "abort"
    if GLOO_THREADS_WARNING in stderr:
        return "threads left"
    if path == "kill" and LOST_PEER_LINE not in stderr:
        return "missing line"
    if any(step["code"] != 0 for step in steps):
        return "other failure"
    return "ok"


def table(results):
    lines = ["| path | runs | " + " | ".join(OUTCOMES) + " | median s |", "|---" * (len(OUTCOMES) + 3) + "|"]
    for path in [p for p in PATHS if any(r["path"] == p for r in results)] + ["all"]:
        rows = [r for r in results if path in ("all", r["path"])]
        seconds = sorted(r["seconds"] for r in rows)
        counts = [sum(r["outcome"] == name for r in rows) for name in OUTCOMES]
        lines.append(f"| {path} | {len(rows)} | " + " | ".join(map(str, counts)) +
                     f" | {seconds[len(seconds) // 2]:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    assert ENV["PYTHONFAULTHANDLER"] == "1"
    main()
