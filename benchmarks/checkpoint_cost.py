"""What a step checkpoint costs: seconds per last.pt written by train.py's CheckpointWriter.

    python benchmarks/checkpoint_cost.py                        # tiny test config, config.yaml, COCO presets
    python benchmarks/checkpoint_cost.py --configs config.yaml --repeats 5 --out-dir /shared/fs

Each config's model is built with random weights (pretrained names replaced by random models of the
same shapes, as in train_step_speed.py; a BiGRU gets a 10,000-word vocabulary in the presets, about
COCO's, and 60 words otherwise, about the built-in dataset's), and
AdamW has taken one step, so its two moment buffers exist as they do in training. Then last.pt is
written --repeats times into --out-dir through the same CheckpointWriter as a training run (model,
optimizer, scheduler, the RNG states, config and vocabulary; temporary file, fsync, rename), one
process. Prints the file size, the median seconds per save, and the share of training time that
train.checkpoint_every=N costs at a given step time (--step-s: seconds per step, e.g. measured by
train_step_speed.py on the GPU). The save runs on the main process while the others wait, so on a
GPU add the device-to-host copy of the weights (not measured here: no GPU).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import load_config  # noqa: E402
from data import SPECIAL_WORDS  # noqa: E402
from model import build_model  # noqa: E402
from distributed import DistributedContext  # noqa: E402
from train import CheckpointWriter, build_optimizer  # noqa: E402
from train_step_speed import random_weights  # noqa: E402

TINY = ["model.embed_dim=32", "model.num_embeds=2", "model.set_head.depth=1", "model.text.word_dim=16",
        "data.image_size=32", "model.image.stop_after=layer1"]          # tests/test_train.tiny_overrides
COCO_VOCAB = SPECIAL_WORDS + [f"w{i}" for i in range(10_000 - len(SPECIAL_WORDS))]
SHAPES_VOCAB = SPECIAL_WORDS + [f"w{i}" for i in range(60)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "config.yaml", "configs/coco_resnet152_bigru.yaml",
                                                          "configs/coco_vit_bert.yaml"],
                        help="'tiny' (the test suite's size), config.yaml, or preset files")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", default=None, help="where last.pt is written (default: a temporary folder)")
    parser.add_argument("--every", type=int, default=250, help="train.checkpoint_every for the overhead column")
    parser.add_argument("--step-s", type=float, default=0.5, help="seconds per training step for the overhead column")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} saves; overhead "
          f"at train.checkpoint_every={args.every} and {args.step_s} s per step")
    print("| config | parameters | last.pt MB | seconds per save | overhead |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.out_dir) as folder:
        for name in args.configs:
            writer = checkpoint_writer(name, folder)
            seconds = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                writer("last.pt", {"epoch": 1, "step": 2, "global_step": 3, "best_rsum": 0.0})
                seconds.append(time.perf_counter() - started)
            size = os.path.getsize(os.path.join(folder, "last.pt")) / 1e6
            median = statistics.median(seconds)
            parameters = sum(p.numel() for p in writer.model.parameters()) / 1e6
            print(f"| {name} | {parameters:.1f}M | {size:.0f} | {median:.2f} | "
                  f"{100 * median / (args.every * args.step_s):.2f}% |", flush=True)


def checkpoint_writer(name, folder):
    """A CheckpointWriter for the named config, its AdamW state filled by one step."""
    cfg = random_weights(load_config(None, TINY) if name == "tiny" else
                         load_config(None if name == "config.yaml" else name))
    vocab = (COCO_VOCAB if name.startswith("configs/") else SHAPES_VOCAB) if cfg["model"]["text"]["type"] == "gru" \
        else None
    model = build_model(cfg, vocab)
    optimizer = build_optimizer(model, cfg["train"])
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, 1e-3)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    return CheckpointWriter(folder, cfg, vocab, model, optimizer, scheduler, scaler,
                            DistributedContext(0, 1, torch.device("cpu")))


if __name__ == "__main__":
    main()
