"""Evaluate a trained MaxMatch checkpoint: retrieval recalls and set-collapse diagnostics (METHOD.md §5).

    python evaluate.py --ckpt runs/shapes_maxmatch/best.pt
    python evaluate.py --ckpt best.pt --method greedy --split val --data.root /new/place --out m.json

Every test image and caption is encoded once as a set; the (N_img, N_cap) score matrix comes from
`similarity.score_matrix` with the checkpoint's similarity (exact max_pair for MaxMatch); for
max_pair and greedy by default from `similarity.rank_preserving_scores` (eval.rank_bounds), which
matches exactly only the pairs whose bounds could change a rank: the same metrics, far fewer matchings.
i2t ranks the best-ranked of an image's ground-truth captions, t2i the caption's image. MS-COCO
prints "1K" (the mean of five folds of 1,000 images; RSUM = sum of the averaged recalls) and "5K".
"""
import argparse
import json
import sys

import torch

from config import ConfigError, apply_overrides, checkpoint_config
from data import DataError, build_loader, build_text_tokenizer, prepare_data
from model import CheckpointError, ModelError, autocast, build_model, load_checkpoint, move_to
from similarity import rank_preserving_scores, score_matrix

RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
COCO_TEST_IMAGES, COCO_FOLD_IMAGES = 5000, 1000   # MS-COCO 5K test (val) split and its 1K folds
RANK_BOUND_METHODS = ("max_pair", "greedy")         # eval.rank_bounds applies to these
USER_ERRORS = (ConfigError, DataError, ModelError, CheckpointError)   # one line on stderr, exit code 2


def retrieval_metrics(scores, caption_to_image):
    """Recall@{1,5,10} both ways (percent), RSUM, median and mean ranks.

    scores (N_img, N_cap); caption_to_image (N_cap,) long, the image index of every caption.
    Ranks count the items scored strictly higher than the ground truth (ties favour it).
    """
    scores = scores.float()
    caption_to_image = caption_to_image.to(scores.device)
    gt = torch.zeros_like(scores, dtype=torch.bool)
    gt[caption_to_image, torch.arange(scores.shape[1], device=scores.device)] = True
    best_gt_caption = scores.masked_fill(~gt, float("-inf")).amax(dim=1, keepdim=True)   # (N_img, 1)
    if torch.isinf(best_gt_caption).any():
        raise ValueError("every image needs at least one caption in caption_to_image")
    i2t_ranks = (scores > best_gt_caption).sum(dim=1)                                     # (N_img,)
    gt_image_score = scores.gather(0, caption_to_image.unsqueeze(0))                      # (1, N_cap)
    t2i_ranks = (scores > gt_image_score).sum(dim=0)                                      # (N_cap,)
    metrics = {}
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in (1, 5, 10):
            metrics[f"{direction}_r{k}"] = 100.0 * (ranks < k).double().mean().item()
        metrics[f"{direction}_medr"] = ranks.double().quantile(0.5).floor().item() + 1
        metrics[f"{direction}_meanr"] = ranks.double().mean().item() + 1
    metrics["rsum"] = sum(metrics[key] for key in RECALL_KEYS)
    return metrics


def five_fold_metrics(scores, caption_to_image, fold_size=1000):
    """MS-COCO 1K: metrics on each block of `fold_size` images and their captions, averaged.

    RSUM is the sum of the averaged recalls (equal to the mean of the fold RSUMs).
    """
    num_folds = scores.shape[0] // fold_size
    if num_folds < 1 or scores.shape[0] % fold_size:
        raise ValueError(f"{scores.shape[0]} images do not split into folds of {fold_size}")
    folds = []
    for fold in range(num_folds):
        first = fold * fold_size
        captions = ((caption_to_image >= first) & (caption_to_image < first + fold_size)).nonzero().squeeze(1)
        folds.append(retrieval_metrics(scores[first:first + fold_size][:, captions],
                                       caption_to_image[captions] - first))
    averaged = {key: sum(f[key] for f in folds) / num_folds for key in folds[0]}
    averaged["rsum"] = sum(averaged[key] for key in RECALL_KEYS)
    return averaged


def collapse_diagnostics(sets, global_):
    """How collapsed the sets are (METHOD.md §5): sets (N, K, D) unit-norm, global_ (N, D) unit-norm.

    intra_set_cos: mean cosine between two different elements of one set (1 = collapsed);
    global_cos: mean cosine of an element to its own global feature;
    log_set_variance: log of the mean per-dimension variance across a set's elements.
    """
    sets, global_ = sets.float(), global_.float()
    num_elements = sets.shape[1]
    gram = sets @ sets.transpose(1, 2)                                         # (N, K, K)
    off_diagonal = gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(dim=1)
    pairs = max(num_elements * (num_elements - 1), 1)
    return {
        "intra_set_cos": (off_diagonal / pairs).mean().item(),
        "global_cos": (sets * global_.unsqueeze(1)).sum(-1).mean().item(),
        "log_set_variance": sets.var(dim=1, unbiased=False).mean().clamp_min(1e-12).log().item(),
    }


@torch.no_grad()
def encode_split(model, loader, device, amp=None):
    """Encode every image and caption of an eval loader once.

    Returns image sets (N_img, K, D), image globals (N_img, D), caption sets (N_cap, K, D),
    caption globals (N_cap, D) and caption_to_image (N_cap,) with indices into the image order.
    """
    model.eval()
    image_sets, image_globals, caption_sets, caption_globals, owners = [], [], [], [], []
    seen_images = 0
    for batch in loader:
        batch = move_to(batch, device)
        with autocast(device, amp):
            image, caption = model(batch)
        image_sets.append(image.sets.float())
        image_globals.append(image.global_.float())
        caption_sets.append(caption.sets.float())
        caption_globals.append(caption.global_.float())
        captions_per_image = batch["tokens"].shape[0] // batch["image_ids"].shape[0]
        owners.append(seen_images + torch.arange(batch["tokens"].shape[0], device=device) // captions_per_image)
        seen_images += batch["image_ids"].shape[0]
    return (torch.cat(image_sets), torch.cat(image_globals), torch.cat(caption_sets),
            torch.cat(caption_globals), torch.cat(owners))


def evaluate_model(model, cfg, loader, device, method=None, options=None, progress=False):
    """Encode the loader's split, score it, and return {protocol: metrics} plus 'collapse', 'method'.

    'all' ranks within the whole split (for 5,000 MS-COCO images: the 5K protocol); 5,000
    MS-COCO images also give '1k', the mean over five folds of 1,000.
    """
    method = method or cfg["eval"]["method"] or cfg["loss"]["similarity"]
    if options is None:
        options = cfg["eval"]["similarity_options"]
        if options is None:
            options = cfg["loss"]["similarity_options"] if method == cfg["loss"]["similarity"] else {}
    amp = cfg["train"]["amp"]
    image_sets, image_globals, caption_sets, caption_globals, caption_to_image = encode_split(
        model, loader, device, amp)
    if cfg["eval"]["rank_bounds"] and method in RANK_BOUND_METHODS:  # the same ranks, few pairs matched
        scores, _ = rank_preserving_scores(image_sets, caption_sets, caption_to_image, method=method,
                                           chunk_size=cfg["eval"]["chunk_size"], progress=progress,
                                           **(options or {}))
    else:
        scores = score_matrix(image_sets, caption_sets, method=method, chunk_size=cfg["eval"]["chunk_size"],
                              progress=progress, **(options or {}))
    results = {"all": retrieval_metrics(scores, caption_to_image)}
    if cfg["data"]["dataset"] in ("coco", "precomputed") and image_sets.shape[0] == COCO_TEST_IMAGES:
        results["1k"] = five_fold_metrics(scores, caption_to_image, fold_size=COCO_FOLD_IMAGES)
    results["collapse"] = {
        "image": collapse_diagnostics(image_sets, image_globals),
        "caption": collapse_diagnostics(caption_sets, caption_globals),
    }
    results["method"] = method
    return results


def build_eval_context(cfg, checkpoint, split, device=None):
    """Model (weights from the checkpoint), eval loader and device for evaluating `split`."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() and cfg["run"]["device"] != "cpu" else "cpu"))
    prepare_data(cfg["data"])
    tokenizer = build_text_tokenizer(cfg["model"]["text"], checkpoint.get("vocab"))
    model = build_model(cfg, checkpoint.get("vocab"))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint weights do not fit the model of its config ({str(error)[:200]})") from None
    return model.to(device), build_loader(cfg, split, tokenizer, train=False), device


def format_results(results, title=""):
    """A fixed-width table: one row per protocol, then the collapse diagnostics."""
    header = f"{'':8s}" + "".join(f"{k:>9s}" for k in RECALL_KEYS + ("rsum",)) + f"{'medr i/t':>10s}"
    lines = [title] if title else []
    lines.append(header)
    for name, metrics in results.items():
        if name in ("collapse", "method"):
            continue
        row = "".join(f"{metrics[k]:9.2f}" for k in RECALL_KEYS + ("rsum",))
        lines.append(f"{name:8s}{row}{metrics['i2t_medr']:5.0f}/{metrics['t2i_medr']:<4.0f}")
    lines.append(f"similarity: {results.get('method')}   set collapse (intra-set cos | cos to global | log var):")
    for modality, diag in results["collapse"].items():
        lines.append(f"  {modality:8s}{diag['intra_set_cos']:8.3f} | {diag['global_cos']:6.3f} | "
                     f"{diag['log_set_variance']:7.3f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="a best.pt or last.pt written by train.py")
    parser.add_argument("--split", default=None, help="split to evaluate (default: data.test_split)")
    parser.add_argument("--method", default=None, help="similarity for scoring (default: the trained one)")
    parser.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--progress", action="store_true", help="show a progress bar while scoring")
    args, rest = parser.parse_known_args(argv)
    overrides = [arg[2:] if arg.startswith("--") else arg for arg in rest]
    overrides = join_flag_values(overrides)
    try:
        checkpoint = load_checkpoint(args.ckpt)
        cfg = apply_overrides(checkpoint_config(checkpoint, args.ckpt), overrides)
        split = args.split or cfg["data"]["test_split"]
        model, loader, device = build_eval_context(cfg, checkpoint, split)
        results = evaluate_model(model, cfg, loader, device, method=args.method, progress=args.progress)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_results(results, title=f"{args.ckpt} | split {split}"))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


# ----------------------------------------------------------------------------- helpers

def join_flag_values(items):
    """['data.root', '/x', 'eval.chunk_size=64'] -> ['data.root=/x', 'eval.chunk_size=64']."""
    joined, i = [], 0
    while i < len(items):
        if "=" not in items[i] and i + 1 < len(items):
            joined.append(f"{items[i]}={items[i + 1]}")
            i += 2
        else:
            joined.append(items[i])
            i += 1
    return joined


if __name__ == "__main__":
    sys.exit(main())
