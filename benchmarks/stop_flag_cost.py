"""Cost of the per-step stop-flag agreement of train.py under torchrun (METHOD.md §4).

    python benchmarks/stop_flag_cost.py                 # 2 gloo processes on this machine
    python benchmarks/stop_flag_cost.py --processes 4 --calls 5000

After every step each rank calls `StopRequest.agreed()`: a one-element int32 all_reduce (MAX) on a
host (gloo) group, so that a signal to any rank stops all ranks at the same step. This script
starts N processes with a gloo group and times exactly that call: --warmup calls, then --calls
timed calls; it prints one row per process count with the mean and the median-of-ranks time per
call. On GPUs (NCCL for the model) the flag still travels through gloo, so this is its cost there
too, apart from the network between nodes.
"""
import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distributed import DistributedContext  # noqa: E402
from train import StopRequest  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[2])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args(argv)
    print(f"StopRequest.agreed(): one-element all_reduce on gloo, {args.warmup} warm-up + {args.calls} timed calls")
    print("| processes | mean us/call | slowest rank us/call |")
    print("|---|---|---|")
    for processes in args.processes:
        results = mp.get_context("spawn").Manager().list()
        port = free_port()
        mp.spawn(time_agreement, args=(processes, port, args.warmup, args.calls, results), nprocs=processes)
        per_call = [seconds / args.calls * 1e6 for seconds in results]
        print(f"| {processes} | {statistics.mean(per_call):.1f} | {max(per_call):.1f} |", flush=True)


def time_agreement(rank, world_size, port, warmup, calls, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    stop = StopRequest(DistributedContext(rank, world_size, torch.device("cpu")))
    for _ in range(warmup):
        stop.agreed()
    started = time.perf_counter()
    for _ in range(calls):
        stop.agreed()
    results.append(time.perf_counter() - started)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    main()
