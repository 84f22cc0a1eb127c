"""What `evaluate.py --figures` adds to an evaluation: seconds for the evaluation and for the figures.

    python benchmarks/figures_cost.py --ckpt runs/shapes_maxmatch/best.pt --threads 1
    python benchmarks/figures_cost.py --ckpt best.pt --count 8 16 --repeat 3

Rows: encoding the split once (shared by the evaluation and the figures), scoring + metrics
(evaluate_model on the encoded split), and write_figures for each --count. Median of --repeat runs
after one warm-up, in seconds, with each row's ratio to the whole evaluation (encode + score).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import checkpoint_config  # noqa: E402
from evaluate import (build_eval_context, complete_relation, encode_split, evaluate_model,  # noqa: E402
                      similarity_settings)
from figures import write_figures  # noqa: E402
from model import load_checkpoint  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--count", type=int, nargs="+", default=[8])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(args.ckpt)
    cfg = checkpoint_config(checkpoint, args.ckpt)
    split = cfg["data"]["test_split"]
    model, loader, device = build_eval_context(cfg, checkpoint, split)
    amp = cfg["train"]["amp"]
    encoded = encode_split(model, loader, device, amp)                       # warm-up
    results = evaluate_model(model, cfg, loader, device, encoded=encoded, split=split)
    options = similarity_settings(cfg)[1]
    positives = complete_relation(cfg, split, loader.dataset)[0]             # as evaluate.py --figures passes it
    rows = [("encode the split", lambda: encode_split(model, loader, device, amp)),
            ("score + metrics", lambda: evaluate_model(model, cfg, loader, device, encoded=encoded, split=split))]
    with tempfile.TemporaryDirectory() as folder:
        for count in args.count:
            rows.append((f"figures of {count} image(s)", lambda count=count: write_figures(
                folder, model, cfg, loader, device, encoded, results, options, count=count, positives=positives)))
        rows[-1][1]()                                                        # warm-up
        seconds = {name: median_seconds(run, args.repeat) for name, run in rows}
    evaluation = seconds["encode the split"] + seconds["score + metrics"]
    print(f"{args.ckpt}: {encoded[0].shape[0]} images, {encoded[2].shape[0]} captions, {args.threads} thread(s), "
          f"median of {args.repeat}")
    print("| part | seconds | ratio to the evaluation |")
    print("|---|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {value:.2f} | {value / evaluation:.2f}x |")


def median_seconds(run, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    main()
