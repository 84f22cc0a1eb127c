"""What each encoder of model.py costs per batch: forward and forward+backward, random weights.

    python benchmarks/encoder_cost.py --threads 2
    python benchmarks/encoder_cost.py --device cuda --images 128 --captions 640

Rows: the image backbones (ResNet grid, ViT-B/16, precomputed regions) and text backbones (BiGRU,
BERT-base-sized, MiniLM-sized), each with its projection and set head (K=4), at the paper's
width (D=1024) and at the built-in dataset's settings. Times are the median of --repeat runs after
a warm-up, in milliseconds per batch.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import load_config  # noqa: E402
from data import SPECIAL_WORDS  # noqa: E402
from model import build_model  # noqa: E402

VOCAB = SPECIAL_WORDS + [f"w{i}" for i in range(995)]          # a GRU vocabulary of 1,000 words
BERT_BASE = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072}
MINILM = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
          "intermediate_size": 1536}

# name, image config, image size, embed dim
IMAGE_ROWS = [
    ("shapes default: resnet18 to layer2, 64 px", None, 64, None),
    ("resnet152 grid, 224 px (paper)", {"type": "cnn", "arch": "resnet152", "stop_after": "layer4"}, 224, 1024),
    ("vit_b_16 patches, 224 px", {"type": "vit", "arch": "vit_b_16"}, 224, 1024),
    ("precomputed 36 regions x 2048 (paper)", {"type": "precomputed", "feature_dim": 2048}, None, 1024),
]
# name, text config, embed dim
TEXT_ROWS = [
    ("shapes default: BiGRU", None, None),
    ("BiGRU, 300-d words, D=1024 (paper)", {"type": "gru", "word_dim": 300}, 1024),
    ("BERT-base size, D=1024 (paper)", {"type": "bert", "bert_config": BERT_BASE}, 1024),
    ("MiniLM-L6 size, D=1024", {"type": "bert", "bert_config": MINILM}, 1024),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=32, help="images per batch")
    parser.add_argument("--captions", type=int, default=160, help="captions per batch")
    parser.add_argument("--caption-length", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_config()
    print(f"device {args.device}, {args.threads} threads, {args.images} images / {args.captions} captions "
          f"of {args.caption_length} tokens per batch; ms per batch (median of {args.repeat})")
    print(f"{'encoder':45s} {'forward':>10s} {'fwd+bwd':>10s}")
    for name, image_cfg, size, dim in IMAGE_ROWS:
        cfg = configure(base, dim, image=image_cfg)
        size = size or cfg["data"]["image_size"]
        batch = {"images": torch.randn(args.images, 3, size, size),
                 "regions": torch.randn(args.images, 36, 2048), "region_lengths": torch.full((args.images,), 36)}
        report(name, cfg, batch, "encode_images", args)
    for name, text_cfg, dim in TEXT_ROWS:
        cfg = configure(base, dim, text=text_cfg)
        text = cfg["model"]["text"]
        vocab_size = len(VOCAB) if text["type"] == "gru" else text["bert_config"]["vocab_size"]
        tokens = torch.randint(5, vocab_size, (args.captions, args.caption_length))
        batch = {"tokens": tokens, "lengths": torch.full((args.captions,), args.caption_length)}
        report(name, cfg, batch, "encode_captions", args)


def configure(base, dim, image=None, text=None):
    cfg = copy.deepcopy(base)
    if dim:
        cfg["model"]["embed_dim"] = dim
    if image:
        cfg["model"]["image"].update(image)
    if text:
        cfg["model"]["text"].update(text)
    return cfg


def report(name, cfg, batch, method, args):
    torch.manual_seed(0)
    model = build_model(cfg, vocab=VOCAB).to(args.device).train()
    batch = {key: value.to(args.device) for key, value in batch.items()}
    encode = getattr(model, method)

    def forward():
        with torch.no_grad():
            encode(batch)

    def forward_backward():
        out = encode(batch)
        (out.sets.sum() + out.global_.sum()).backward()

    times = [measure(fn, args) for fn in (forward, forward_backward)]
    print(f"{name:45s} {times[0]:10.1f} {times[1]:10.1f}", flush=True)


def measure(fn, args):
    fn()
    samples = []
    for _ in range(args.repeat):
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        samples.append(1000 * (time.perf_counter() - start))
    return statistics.median(samples)


if __name__ == "__main__":
    main()
