"""Training-step throughput of one or more configs on synthetic inputs of their shapes: eager vs torch.compile.

    python benchmarks/train_step_speed.py                                   # config.yaml on the CPU
    python benchmarks/train_step_speed.py --config configs/coco_vit_bert.yaml --device cuda --steps 200
    python benchmarks/train_step_speed.py --config config.yaml --config configs/coco_vit_bert.yaml \
        --device cuda --modes eager --sync-debug                            # one table, one row per config

Each step is train.py's `training_step` (forward, similarity, every loss term, backward, optimizer
step) on one process, with random weights (pretrained names in a preset are replaced by random
models of the same size, so nothing is loaded) and the config's AMP setting on CUDA. A mode first
runs --warmup steps (compilation happens there), then --steps timed steps synchronised only at the
ends, as a training loop runs. Prints one row per config and mode: warm-up seconds, ms/step,
images/s, the ratio to eager, the peak GPU memory and, with --sync-debug, whether the timed steps
ran without a host-device sync. A BERT text encoder is timed at BERT-base size whatever the preset
names (so MiniLM presets are timed as BERT-base). A config or mode that fails gets a row saying
so and one line naming the error and where it was raised (traceback on stderr); the others still
run, and the exit code is 1.
"""
import argparse
import copy
import gc
import os
import sys
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from config import load_config  # noqa: E402
from encoder_cost import BERT_BASE, VOCAB as GRU_VOCAB  # noqa: E402
from model import build_model  # noqa: E402
from distributed import DistributedContext  # noqa: E402
from train import build_optimizer, training_step  # noqa: E402

SYNC_ERROR = "synchronizing CUDA operation"     # torch's message under set_sync_debug_mode("error")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", default=None,
                        help="preset YAML merged over config.yaml; repeat for several configs in one table")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: train.batch_size)")
    parser.add_argument("--caption-length", type=int, default=16, help="tokens of the longest caption")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled mode (gpu_check.sh --dry-run uses eager: dynamo only)")
    parser.add_argument("--sync-debug", action="store_true",
                        help="CUDA: run the timed steps under torch.cuda.set_sync_debug_mode('error'), so any "
                             "host-device sync or synchronous copy in a training step raises")
    parser.add_argument("overrides", nargs="*", help="config overrides for every config, e.g. model.num_embeds=8")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.sync_debug and not args.device.startswith("cuda"):
        parser.error("--sync-debug needs --device cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    configs = args.config or [None]
    loaded = [random_weights(load_config(path, args.overrides)) for path in configs]   # bad keys fail first
    print(f"{device} ({torch.get_num_threads()} threads), torch {torch.__version__}; {args.warmup} warm-up + "
          f"{args.steps} timed steps" + ("; timed steps under sync-debug mode 'error'" if args.sync_debug else ""))
    print("| config | mode | images + captions | amp | warm-up s | ms/step | images/s | vs eager | peak GPU GiB | sync-free |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    failures = []
    for path, cfg in zip(configs, loaded):
        name = os.path.relpath(path, REPO) if path else "config.yaml"
        batch_size = args.batch_size or cfg["train"]["batch_size"]
        batch = synthetic_batch(cfg, batch_size, args.caption_length, device)
        amp = cfg["train"]["amp"] if device.type == "cuda" else "off"
        shape = f"{batch_size} + {batch['tokens'].shape[0]}"
        eager_ms = None
        for mode in args.modes:
            cells = [name, mode, shape, amp]
            try:
                seconds, warmup_s, peak = time_steps(cfg, batch, device, mode == "compiled", args.steps, args.warmup,
                                                     args.sync_debug, args.compile_backend)
            except Exception as error:  # noqa: BLE001 - one row per failure; the other configs still run
                traceback.print_exc()
                synced = SYNC_ERROR in str(error)
                cells += ["failed"] + ["-"] * 4 + ["NO" if synced else "-"]
                failures.append(f"{name} {mode}: {describe(error)}")
            else:
                ms = 1000 * seconds / args.steps
                eager_ms = ms if mode == "eager" else eager_ms
                rate = batch_size * 1000 / ms
                cells += [f"{warmup_s:.1f}", f"{ms:.1f}", f"{rate:.1f}" if rate >= 1 else f"{rate:.3f}",
                          f"{ms / eager_ms:.2f}x" if eager_ms else "-",
                          f"{peak / 2**30:.1f}" if peak is not None else "-", "yes" if args.sync_debug else "-"]
            print("| " + " | ".join(cells) + " |", flush=True)
            release_memory(device)
        del batch
    for line in failures:
        print(f"FAILED {line}", flush=True)
    return 1 if failures else 0


def describe(error):
    """'Type: first line of the message (at file.py:line in function)', the innermost frame in this repository."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if os.path.abspath(frame.filename).startswith(REPO + os.sep)]
    where = f" (at {os.path.relpath(frames[-1].filename, REPO)}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    message = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {message}{where}"


def release_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_weights(cfg):
    """The config with every pretrained piece replaced by a random model of the same shape."""
    cfg = copy.deepcopy(cfg)
    cfg["model"]["image"]["weights"] = None
    text = cfg["model"]["text"]
    if text["type"] == "bert" and not text.get("bert_config"):
        text.update(bert=None, tokenizer=None, bert_config=BERT_BASE)
    text["word_vectors"] = None
    return cfg


def synthetic_batch(cfg, batch_size, caption_length, device):
    """A collated training batch of the config's shapes: C captions per image, lengths varying."""
    generator = torch.Generator().manual_seed(0)
    captions = batch_size * cfg["data"]["captions_per_image"]
    text = cfg["model"]["text"]
    vocab_size = text["bert_config"]["vocab_size"] if text["type"] == "bert" else len(GRU_VOCAB)
    lengths = torch.randint(caption_length // 2, caption_length + 1, (captions,), generator=generator)
    lengths[0] = caption_length
    tokens = torch.randint(5, vocab_size, (captions, caption_length), generator=generator)
    tokens[torch.arange(caption_length)[None, :] >= lengths[:, None]] = 0
    size = cfg["data"]["image_size"]
    batch = {"images": torch.randn(batch_size, 3, size, size, generator=generator),
             "tokens": tokens, "lengths": lengths, "image_ids": torch.arange(batch_size),
             "caption_image_ids": torch.arange(batch_size).repeat_interleave(cfg["data"]["captions_per_image"]),
             "caption_order": lengths.argsort(descending=True, stable=True)}     # as data.collate_batch
    if cfg["model"]["image"]["type"] == "precomputed":
        batch["regions"] = torch.randn(batch_size, 36, cfg["model"]["image"]["feature_dim"], generator=generator)
        batch["region_lengths"] = torch.full((batch_size,), 36)
    if device.type == "cuda":
        batch = {key: value.pin_memory() for key, value in batch.items()}
    return batch


def time_steps(cfg, batch, device, compiled, steps, warmup, sync_debug=False, backend="inductor"):
    """Seconds for `steps` training steps after `warmup` steps, the warm-up seconds, peak GPU bytes.
    sync_debug: the timed steps run under torch.cuda.set_sync_debug_mode("error") (the warm-up fills
    the per-device caches, which copies to the device once)."""
    torch.manual_seed(0)
    model = build_model(cfg, vocab=GRU_VOCAB if cfg["model"]["text"]["type"] == "gru" else None).to(device).train()
    trainer = torch.compile(model, dynamic=True, backend=backend) if compiled else model
    optimizer = build_optimizer(model, cfg["train"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg["train"]["amp"] == "fp16")
    context = DistributedContext(0, 1, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    warmup_s = 0.0
    try:
        for step in range(warmup + steps):
            if step == warmup:
                synchronize(device)
                warmup_s = time.perf_counter() - started
                started = time.perf_counter()
                if sync_debug:
                    torch.cuda.set_sync_debug_mode("error")
            loss = training_step(trainer, batch, cfg, context, optimizer, scheduler, scaler)["loss"]
    finally:
        if sync_debug:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    seconds = time.perf_counter() - started
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss after {warmup + steps} steps")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return seconds, warmup_s, peak


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    sys.exit(main())
