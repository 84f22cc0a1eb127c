"""Repeated kills under torchrun's elastic agent: does the job survive a dead worker every time?

    python benchmarks/elastic_stress.py --tries 10                 # static and c10d rendezvous
    python benchmarks/elastic_stress.py --tries 3 --rendezvous c10d --checkpoint-every 0

Each try is `torchrun --nproc_per_node=2 --max-restarts=2 train.py` on the default path at the test
suite's tiny size (2 gloo processes on the CPU, 6 steps per epoch x 2 epochs, deterministic), with
SIGKILL to one worker (rank 1, or rank 0 every third try) once log.jsonl shows a step drawn at
random from the second epoch. The job must exit 0 by itself within the time limit, and its final
weights must equal those of the same run left alone bit for bit. Prints one row per try and a
summary per rendezvous. The suite runs one kill per rendezvous (tests/test_elastic.py).
"""
import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
import train  # noqa: E402
from data import prepare_data  # noqa: E402
from model import load_checkpoint  # noqa: E402
from test_distributed import torchrun  # noqa: E402
from test_elastic import EXACT, RESTARTS, rendezvous_arguments, run_and_kill  # noqa: E402
from test_train import tiny_overrides  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tries", type=int, default=10, help="kills per rendezvous")
    parser.add_argument("--rendezvous", nargs="+", default=["static", "c10d"], choices=["static", "c10d"])
    parser.add_argument("--checkpoint-every", type=int, default=2, help="train.checkpoint_every (0: epoch ends)")
    parser.add_argument("--seed", type=int, default=0, help="draws the kill steps and ranks")
    args = parser.parse_args(argv)
    draw = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        base = tiny_overrides(folder, name="run") + [f"data.root={folder / 'shapes'}"] + EXACT + [
            f"train.checkpoint_every={args.checkpoint_every}"]
        prepare_data(train.load_config(None, base)["data"])
        reference = torchrun(base + ["run.name=left_alone"])
        if reference.returncode != 0:
            sys.exit(f"the run left alone failed:\n{reference.stderr[-2000:]}")
        expected = load_checkpoint(str(folder / "runs" / "left_alone" / "last.pt"))["model"]
        print(f"torch {torch.__version__}; torchrun --nproc_per_node=2 --max-restarts=2; "
              f"train.checkpoint_every={args.checkpoint_every}; 6 steps/epoch x 2 epochs", flush=True)
        print("| rendezvous | try | killed rank | at global step | exit | seconds | continued from | weights |")
        print("|---|---|---|---|---|---|---|---|")
        summary = {}
        for kind in args.rendezvous:
            for number in range(1, args.tries + 1):
                step, rank = draw.randint(7, 11), 0 if number % 3 == 0 else 1
                name = f"{kind}_{number}"
                started = time.time()
                try:
                    result = run_and_kill(base + [f"run.name={name}"], rendezvous_arguments(kind) + RESTARTS,
                                          folder / "runs" / name, at_global_step=step, rank=rank)
                    exit_code, output = result.returncode, result.stdout
                except (AssertionError, subprocess.TimeoutExpired) as error:
                    exit_code, output = f"failed: {str(error)[:60]}", ""
                seconds = time.time() - started
                continued = [line.split(" at ", 1)[1].split(" with ")[0] for line in output.splitlines()
                             if line.startswith("torchrun started the workers again")]
                same = exit_code == 0 and all(torch.equal(expected[key], value) for key, value in load_checkpoint(
                    str(folder / "runs" / name / "last.pt"))["model"].items())
                summary.setdefault(kind, []).append(same)
                print(f"| {kind} | {number} | {rank} | {step} | {exit_code} | {seconds:.0f} | "
                      f"{'; '.join(continued) or '-'} | {'identical' if same else 'DIFFERENT'} |", flush=True)
        for kind, results in summary.items():
            print(f"{kind}: {sum(results)} of {len(results)} jobs finished with the weights of the run left alone")
        return 0 if all(all(results) for results in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
