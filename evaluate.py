"""Evaluate a trained MaxMatch checkpoint: retrieval recalls and set-collapse diagnostics (METHOD.md §5).

    python evaluate.py --ckpt runs/shapes_maxmatch/best.pt
    python evaluate.py --ckpt best.pt --method greedy --split val --data.root /new/place --out m.json
    python evaluate.py --ckpt a.pt b.pt            # each model, then the ensemble (mean score matrix)
    python evaluate.py --ckpt best.pt --figures figs/   # also draw the sets and the run's curves, figs/index.html
    python evaluate.py --ckpt coco.pt --eccv            # MS-COCO 5K: + ECCV Caption, CxC (pip install eccv-caption)

Every test image and caption is encoded once as a set; the (N_img, N_cap) score matrix comes from
`similarity.score_matrix` with the checkpoint's similarity (exact max_pair for MaxMatch); for one
model scored with max_pair or greedy, by default from `similarity.rank_preserving_scores`
(eval.rank_bounds), which matches exactly only the pairs whose bounds could change a rank: the
same metrics, far fewer matchings (ensembles average full matrices).
i2t ranks the best-ranked of an image's ground-truth captions, t2i the caption's image; ties count
against the ground truth (`retrieval_metrics`). `--out` writes the layout of test_metrics.json. MS-COCO
prints "1K" (the mean of five folds of 1,000 images; RSUM = sum of the averaged recalls) and "5K".
`--eccv` (an MS-COCO checkpoint on the 5K test split) adds the "eccv" block: ECCV Caption mAP@R /
R-Precision / R@1, CxC R@1/5/10 and COCO 1K / 5K R@K as the optional `eccv_caption` package computes
them, from the full score matrix, on the COCO ids `data.coco_ids` finds (docs/evaluation.md).
"""
import argparse
import contextlib
import functools
import importlib
import importlib.metadata
import io
import json
import os
import sys
import tempfile
import warnings

import torch

from config import ConfigError, apply_overrides, checkpoint_config
from data import DataError, build_loader, build_text_tokenizer, coco_ids, karpathy_json_path, prepare_data
from figures import FiguresError, check_figures_request, write_figures
from model import CheckpointError, ModelError, autocast, build_model, load_checkpoint, move_to
from shapes import shapes_relation
from similarity import rank_preserving_scores, score_matrix

RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
PROTOCOLS = ("all", "1k")          # result keys that hold metrics; the others are 'collapse', 'method'...
COCO_TEST_IMAGES, COCO_FOLD_IMAGES = 5000, 1000   # MS-COCO 5K test (val) split and its 1K folds
RANK_BOUND_METHODS = ("max_pair", "greedy")         # eval.rank_bounds applies to these
MODALITIES = ("image", "caption")                   # the two sides of the collapse diagnostics
COCO_DATASETS = ("coco", "precomputed")              # data.dataset values that can hold MS-COCO
COCO_TEST_CAPTIONS = 25000                           # the 5K test split's captions, 5 per image
ECCV_INSTALL = "pip install eccv-caption"
PMRP_NOTE = ("PMRP not computed: it needs the package's plausible-match files (pm_image_to_caption.json, "
             "pm_caption_to_image.json, a separate download of over 140 MB) and, with up to 13,380 "
             "positives per query, rankings that long")


class DataMismatchError(Exception):
    """Checkpoints of one ensemble that evaluate different data; the message names the two."""


class FlagError(Exception):
    """A bad command-line flag or flag value (argparse's complaints included)."""


class EccvError(Exception):
    """--eccv cannot score this checkpoint: no eccv_caption package, not MS-COCO, not its 5K test split."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises FlagError instead of printing its usage and exiting, so a bad flag
    ends as one line `error: ...` and exit code 2 like every other user error."""

    def error(self, message):
        raise FlagError(f"{message} (see --help)")


# one line on stderr, exit code 2
USER_ERRORS = (ConfigError, DataError, ModelError, CheckpointError, DataMismatchError, FlagError, EccvError)
CIRCULAR_VARIANCE_FLOOR = 1e-6   # 1 - R below this reads as fully collapsed (float32 unit vectors)


def retrieval_metrics(scores, caption_to_image):
    """Recall@{1,5,10} both ways (percent), RSUM, median and mean ranks.

    scores (N_img, N_cap); caption_to_image (N_cap,) long, the image index of every caption.
    Ties count AGAINST the ground truth (METHOD.md §5): the rank of the ground truth (0 = first)
    is the number of OTHER items scoring greater than or equal to it.
    - i2t: the threshold of image i is the score of its best ground-truth caption; its rank is
      the number of captions of other images scoring >= that threshold in row i (its own other
      captions do not count).
    - t2i: the threshold of caption j is the score of its own image; its rank is the number of
      other images scoring >= that threshold in column j.
    A collapsed model (all scores equal) therefore ranks every ground truth last, never first.
    On tie-free scores this is the standard VSE++ ranking. Ranks depend only on the ground-truth
    scores and on whether each entry is >= its row's and its column's threshold, so a matrix whose
    non-ground-truth entries are replaced by bounds on the same side of both thresholds gives the
    same metrics. NaN scores raise ValueError (they would compare as neither better nor worse).
    """
    scores = scores if scores.dtype == torch.float64 else scores.float()   # half precision would add ties
    if torch.isnan(scores).any():
        raise ValueError("NaN in the score matrix: ranks would be meaningless")
    num_images, num_captions = scores.shape
    caption_to_image = caption_to_image.to(scores.device).long()
    if caption_to_image.shape != (num_captions,):
        raise ValueError(f"caption_to_image has shape {tuple(caption_to_image.shape)}, expected ({num_captions},)")
    if torch.bincount(caption_to_image, minlength=num_images).eq(0).any():
        raise ValueError("every image needs at least one caption in caption_to_image")
    gt_scores = scores[caption_to_image, torch.arange(num_captions, device=scores.device)]   # (N_cap,)
    best_gt_caption = scores.new_full((num_images,), float("-inf")).scatter_reduce(
        0, caption_to_image, gt_scores, reduce="amax")                                       # (N_img,)
    # i2t: all captions >= the threshold, minus the image's own captions >= it (at least its best one)
    own_at_or_above = torch.zeros(num_images, dtype=torch.long, device=scores.device).scatter_add(
        0, caption_to_image, (gt_scores >= best_gt_caption[caption_to_image]).long())
    i2t_ranks = (scores >= best_gt_caption[:, None]).sum(dim=1) - own_at_or_above          # (N_img,)
    # t2i: all images >= the threshold, minus the caption's own image (equal to it)
    t2i_ranks = (scores >= gt_scores[None, :]).sum(dim=0) - 1                               # (N_cap,)
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


def complete_positive_metrics(scores, positives, chunk_size=1024):
    """Retrieval against EVERY fitting item, both directions (percent), as ECCV Caption computes it.

    scores (N_img, N_cap); positives (N_img, N_cap) bool, True where caption t fits image i (its
    own image included). Every query needs at least one positive. For a query with R positives,
    ranked over the whole gallery (never truncated):
      R-Precision = (positives among the first R) / R
      mAP@R       = (1/R) sum_{r <= R} precision@r * [the r-th item is a positive]  (Musgrave et al., 2020)
      R@1         = [the first item is a positive]
    Ties count AGAINST the positives, as in `retrieval_metrics`: a positive tied with a
    non-positive ranks after it. Returns {"i2t": {...}, "t2i": {...}}, each {"map_at_r",
    "r_precision", "r1", "positives_per_query"} (the mean R, a count). NaN scores raise ValueError.
    """
    scores = scores if scores.dtype == torch.float64 else scores.float()
    if torch.isnan(scores).any():
        raise ValueError("NaN in the score matrix: ranks would be meaningless")
    positives = positives.to(scores.device).bool()
    if positives.shape != scores.shape:
        raise ValueError(f"positives have shape {tuple(positives.shape)}, the scores {tuple(scores.shape)}")
    return {"i2t": _query_positive_metrics(scores, positives, chunk_size),
            "t2i": _query_positive_metrics(scores.t(), positives.t(), chunk_size)}


def collapse_diagnostics(sets, global_, single_vector=False):
    """How collapsed the sets are (METHOD.md §5): sets (N, K, D) unit-norm, global_ (N, D) unit-norm.

    A measure without meaning is None, not a number (`collapse_note` says why): at K = 1 every
    measure across a set's elements (there is one element), and with single_vector=True (no set
    head: the element IS the global feature) global_cos as well.

    intra_set_cos: mean cosine between two different elements of one set (1 = collapsed);
    global_cos: mean cosine of an element to its own global feature;
    log_set_variance: log of the mean per-dimension variance across a set's elements;
    log_circular_variance: the paper's "circular variance" in log form (its ablation reports
    negative values, lower = more collapsed): per set, R = ||mean_k S_k|| is the mean resultant
    length of its unit elements (1 when they coincide, 0 when they cancel out), 1 - R the set's
    circular variance, and the measure is the mean over sets of log(1 - R). It is 0 at most and
    -log 2 = -0.69 for K = 4 orthogonal elements; 1 - R is floored at 1e-6, so a fully collapsed
    set reads log(1e-6) = -13.8. The mean is taken over the per-set logs (a geometric mean of the
    circular variance) so that every set counts on the log scale and a minority of collapsed sets
    shows; log_set_variance is the log of the arithmetic mean of (1 - R^2) / D over sets, which the
    least collapsed sets dominate.
    """
    sets, global_ = sets.float(), global_.float()
    num_elements = sets.shape[1]
    if num_elements == 1:
        global_cos = None if single_vector else (sets[:, 0] * global_).sum(-1).mean().item()
        return {"intra_set_cos": None, "global_cos": global_cos, "log_set_variance": None,
                "log_circular_variance": None}
    gram = sets @ sets.transpose(1, 2)                                         # (N, K, K)
    off_diagonal = gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(dim=1)
    pairs = max(num_elements * (num_elements - 1), 1)
    unit = torch.nn.functional.normalize(sets.double(), dim=-1)               # float64: R near 1 resolves
    resultant_length = unit.mean(dim=1).norm(dim=-1)                           # (N,)
    return {
        "intra_set_cos": (off_diagonal / pairs).mean().item(),
        "global_cos": (sets * global_.unsqueeze(1)).sum(-1).mean().item(),
        "log_set_variance": sets.var(dim=1, unbiased=False).mean().clamp_min(1e-12).log().item(),
        "log_circular_variance": (1 - resultant_length).clamp_min(CIRCULAR_VARIANCE_FLOOR).log().mean().item(),
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


def evaluate_model(model, cfg, loader, device, method=None, options=None, progress=False, encoded=None,
                   split=None):
    """Encode the loader's split, score it, and return {protocol: metrics} plus 'complete' (or
    'complete_note'), 'collapse', 'method'.

    'all' ranks within the whole split (for 5,000 MS-COCO images: the 5K protocol); 5,000
    MS-COCO images also give '1k', the mean over five folds of 1,000. With `split` named and a
    dataset whose complete relation is known (the built-in shapes data), 'complete' holds
    `complete_positive_metrics` against every fitting item; otherwise 'complete_note' says why
    not. This dict is the one JSON layout of test_metrics.json and `evaluate.py --out` (see
    `write_results`). `encoded`: encode_split's output for this loader when the caller already has it.
    """
    method, options = similarity_settings(cfg, method, options)
    positives, source = complete_relation(cfg, split, loader.dataset if loader is not None else None)
    scores, caption_to_image, collapse = score_split(model, cfg, loader, device, method, options, progress,
                                                     encoded, ranks_only=positives is None)
    results = ranking_results(scores, caption_to_image, cfg["data"]["dataset"])
    results.update(complete_results(scores, positives, source))
    results["collapse"] = collapse
    results["method"] = method
    return results


def complete_relation(cfg, split, dataset=None):
    """(positives, source): positives (N_img, N_cap) bool, True where caption t fits image i, for the
    evaluation loader's image and caption order, and the relation's source; or (None, why there is
    none). Known for the built-in shapes data (`shapes.shapes_relation`); a loader `dataset` whose
    images are not the relation's, in order, raises DataError instead of giving wrong numbers."""
    data_cfg = cfg["data"]
    if data_cfg["dataset"] != "shapes":
        return None, (f"no complete-positive metrics for data.dataset={data_cfg['dataset']}: only the built-in "
                      "shapes data records every fitting image-caption pair"
                      + (" (MS-COCO: evaluate.py --eccv)" if data_cfg["dataset"] in ("coco", "precomputed") else ""))
    if split is None:
        return None, "no complete-positive metrics: the split was not named"
    json_path = karpathy_json_path(data_cfg)
    relation = shapes_relation(json_path, split, int(data_cfg["captions_per_image"]))
    if dataset is not None and [path.name for path in dataset.paths] != relation["filenames"]:
        raise DataError(f"the images of split {split!r} are not those of {json_path} in its order: "
                        "regenerate the data (delete the folder) or point data.root at the generated one")
    caption_images = relation["caption_images"]
    positives = torch.zeros(len(relation["filenames"]), len(caption_images), dtype=torch.bool)
    captions = torch.tensor([t for t, fitting in enumerate(caption_images) for _ in fitting], dtype=torch.long)
    images = torch.tensor([i for fitting in caption_images for i in fitting], dtype=torch.long)
    positives[images, captions] = True
    return positives, "the shapes generator's relation"


def complete_results(scores, positives, source):
    """{'complete': metrics + 'source'} from `complete_positive_metrics`, or {'complete_note': why not}
    when `positives` is None (`source` then holds the reason)."""
    if positives is None:
        return {"complete_note": source}
    return {"complete": {**complete_positive_metrics(scores, positives), "source": source}}


def eccv_benchmark():
    """The optional eccv_caption package's `Metrics` (it ships the ECCV Caption, CxC and COCO 5K test
    annotations), imported only when --eccv asks; EccvError with the install line when it is missing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # it warns when its optional ujson is missing
            package = importlib.import_module("eccv_caption")
    except ImportError:
        raise EccvError(f"--eccv needs the optional eccv_caption package: {ECCV_INSTALL}") from None
    return package.Metrics()


def check_eccv_split(ids, split, benchmark=None):
    """Raise EccvError unless `ids` (data.coco_ids' output) are MS-COCO's 5K test split, each item once:
    5,000 images and 25,000 captions, and with `benchmark` (eccv_benchmark()) the very ids of its test
    split. The package scores those ids only: another split or caption choice would be a wrong number."""
    image_ids, caption_ids, source = ids
    fits = len(image_ids) == COCO_TEST_IMAGES and len(caption_ids) == COCO_TEST_CAPTIONS
    detail = ""
    if fits and benchmark is not None:
        image_hits = len(set(benchmark.coco_gts["i2t"]) & set(image_ids))
        caption_hits = len(set(benchmark.coco_gts["t2i"]) & set(caption_ids))
        repeated = len(image_ids) - len(set(image_ids)) + len(caption_ids) - len(set(caption_ids))
        fits = image_hits == COCO_TEST_IMAGES and caption_hits == COCO_TEST_CAPTIONS and not repeated
        detail = (f"; {image_hits:,} of its images and {caption_hits:,} of its captions are the package's"
                  + (f", {repeated:,} ids repeat" if repeated else ""))
    if not fits:
        raise EccvError(f"--eccv needs MS-COCO's 5K test split, {COCO_TEST_IMAGES:,} images with 5 captions each: "
                        f"split {split!r} has {len(image_ids):,} images and {len(caption_ids):,} captions (ids from "
                        f"{source}){detail} (coco: --split test; precomputed: --split testall; "
                        "data.captions_per_image=5)")


def eccv_results(scores, caption_to_image, ids, benchmark, budget=1 << 23):
    """The "eccv" block: ECCV Caption mAP@R / R-Precision / R@1, CxC R@1/5/10 and COCO 5K and 1K
    R@1/5/10 both ways (percent), as the eccv_caption package computes them on this score matrix.

    scores (N_img, N_cap), the FULL matrix (not rank_preserving_scores' bounds); caption_to_image
    (N_cap,) image-major; ids = data.coco_ids' (image ids, caption ids, source), checked by
    check_eccv_split; benchmark = eccv_benchmark(). The package takes each query's ranked list of
    gallery ids. Each benchmark gets the ranking of the matrix with ties against ITS positives (a
    positive after a tied non-positive, then by our index: the rule of retrieval_metrics), and of
    it the items the package reads: the first max(10, R) for mAP@R / R-Precision (R = the query's
    ECCV positives, at most 48) and R@K, and for COCO 1K also each fold's first 10. On those
    metrics a list so cut gives what the whole ranking gives (a test checks), at a fraction of the
    package's time on 5,000 x 25,000 lists. "coco_1k_folds_as_ours" says whether the package's
    five folds (blocks of its caption id list) hold the same images as ours (blocks of 1,000 of
    the loader's images); only then do its 1K numbers and ours rank the same sub-galleries.
    """
    image_ids, caption_ids, source = ids
    scores = scores if scores.dtype == torch.float64 else scores.float()
    if torch.isnan(scores).any():
        raise ValueError("NaN in the score matrix: ranks would be meaningless")
    num_images, num_captions = scores.shape
    if not torch.equal(caption_to_image.cpu(), torch.arange(num_images).repeat_interleave(num_captions // num_images)):
        raise ValueError("eccv_results needs the captions image-major, the same number per image")
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}
    column_of = {caption_id: column for column, caption_id in enumerate(caption_ids)}
    benchmarks = {"coco": benchmark.coco_gts, "cxc": benchmark.cxc_gts, "eccv": benchmark.eccv_gts}
    folds = [(torch.tensor(sorted({row_of[benchmark.coco_gts["t2i"][c][0]] for c in block})),
              torch.tensor(sorted(column_of[c] for c in block)))
             for block in benchmark.coco_ids.reshape(5, -1).tolist()]     # the package's 1K folds
    gallery_ids = {"i2t": torch.tensor(caption_ids), "t2i": torch.tensor(image_ids)}
    query_ids = {"i2t": image_ids, "t2i": caption_ids}
    lists = {name: {} for name in benchmarks}
    for direction in ("i2t", "t2i"):
        view = _DirectionScores(scores, direction)
        keys = {name: _positive_keys(gts[direction], *((row_of, column_of) if direction == "i2t" else
                                                        (column_of, row_of)), view.num_items)
                for name, gts in benchmarks.items()}
        count = max(10, max(len(items) for items in benchmark.eccv_gts[direction].values()))
        ranked = _ranked_lists(view, range(view.num_queries), None, keys, count, budget)
        within_fold = torch.empty(view.num_queries, 10, dtype=torch.long)
        for image_rows, caption_columns in folds:
            queries, items = (image_rows, caption_columns) if direction == "i2t" else (caption_columns, image_rows)
            within_fold[queries] = _ranked_lists(view, queries, items, {"coco": keys["coco"]}, 10, budget)["coco"]
        to_ids = gallery_ids[direction]
        chosen = {"coco": _merged_lists(view, ranked["coco"][:, :10], within_fold, keys["coco"], to_ids),
                  "cxc": to_ids[ranked["cxc"][:, :10]].tolist(), "eccv": to_ids[ranked["eccv"]].tolist()}
        for name, ranked_ids in chosen.items():
            lists[name][direction] = dict(zip(query_ids[direction], ranked_ids))
    return _package_block(benchmark, lists, folds_as_ours(image_ids, folds), source)


def folds_as_ours(image_ids, folds):
    """Whether the package's five COCO 1K folds ((image rows, caption columns) per fold) hold the
    same images as ours, five blocks of 1,000 consecutive images of the loader."""
    ours = {frozenset(range(first, first + COCO_FOLD_IMAGES)) for first in range(0, len(image_ids), COCO_FOLD_IMAGES)}
    return ours == {frozenset(rows.tolist()) for rows, _ in folds}


def evaluate_checkpoints(paths, overrides=(), split=None, method=None, progress=False, draw=None, eccv=False):
    """Evaluate each checkpoint and, for several, their ensemble: the mean of their score matrices.

    Each checkpoint encodes the split with its own config (plus `overrides`), vocabulary and
    similarity (`method` overrides it for all). Returns (per_model, ensemble): per_model a list of
    {"ckpt": path, "split": name, **results}, ensemble None for one checkpoint, else
    {protocol: metrics, "method": "..."} ranked by `retrieval_metrics` like a single model. The
    sum is accumulated in place in the first model's matrix: one score matrix plus the one being
    added are in memory at a time. Checkpoints whose split differs (other images, captions,
    caption counts or order) raise DataMismatchError naming the two. `draw(model, cfg, loader, device,
    encoded, results, options, positives=...)`, if given, is called for each model with its encoded
    split and `complete_relation`'s positives (None without a known relation) (--figures).
    eccv=True adds each model's (and the ensemble's) "eccv" block (`eccv_results`), scored on the
    full matrix; a checkpoint that is not MS-COCO fails before anything is loaded, its ids and the
    package before its split is encoded.
    """
    for path in paths:                      # a missing file fails before hours of encoding the others
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {path!r} does not exist")
    for path in paths:                      # so does a corrupt one, a bad config or a bad similarity
        cfg, _, _ = checkpoint_settings(load_checkpoint(path), path, overrides, method)
        if eccv and cfg["data"]["dataset"] not in COCO_DATASETS:
            raise EccvError(f"--eccv scores MS-COCO's 5K test split, and checkpoint {path!r} evaluates "
                            f"data.dataset={cfg['data']['dataset']} (use a coco or precomputed COCO checkpoint)")
    per_model, summed, reference, benchmark = [], None, None, None
    for path in paths:
        checkpoint = load_checkpoint(path)
        cfg, model_method, options = checkpoint_settings(checkpoint, path, overrides, method)
        model_split = split or cfg["data"]["test_split"]
        model, loader, device = build_eval_context(cfg, checkpoint, model_split)
        del checkpoint
        signature = split_signature(loader.dataset)
        if reference is None:
            reference = (path, model_split, signature)
        else:
            check_same_split(reference, (path, model_split, signature))
        if eccv:
            ids = coco_ids(cfg["data"], model_split, loader.dataset)
            check_eccv_split(ids, model_split)                  # the counts; then the package's very ids
            benchmark = benchmark or eccv_benchmark()
            check_eccv_split(ids, model_split, benchmark)
        encoded = encode_split(model, loader, device, cfg["train"]["amp"]) if draw else None
        positives, source = complete_relation(cfg, model_split, loader.dataset)
        scores, caption_to_image, collapse = score_split(
            model, cfg, loader, device, model_method, options, progress, encoded,
            ranks_only=len(paths) == 1 and positives is None and not eccv)
        results = ranking_results(scores, caption_to_image, cfg["data"]["dataset"])
        results.update(complete_results(scores, positives, source))
        if eccv:
            results["eccv"] = eccv_results(scores, caption_to_image, ids, benchmark)
        per_model.append({"ckpt": path, "split": model_split, **results, "collapse": collapse,
                          "method": model_method})
        if draw:
            draw(model, cfg, loader, device, encoded, per_model[-1], options, positives=positives)
        del model, encoded
        if len(paths) > 1:
            if summed is None:
                summed = scores                      # the first model's matrix becomes the accumulator
            else:
                summed += scores.to(summed.device)
        del scores
    if summed is None:
        return per_model, None
    summed /= len(paths)
    ensemble = ranking_results(summed, caption_to_image, cfg["data"]["dataset"])
    ensemble.update(complete_results(summed, positives, source))
    if eccv:
        ensemble["eccv"] = eccv_results(summed, caption_to_image, ids, benchmark)
    ensemble["method"] = f"mean of {len(paths)} score matrices ({', '.join(r['method'] for r in per_model)})"
    return per_model, ensemble


def checkpoint_settings(checkpoint, path, overrides, method):
    """(config with `overrides`, similarity method, options) of a loaded checkpoint; raises the
    user errors of a bad config or similarity."""
    cfg = apply_overrides(checkpoint_config(checkpoint, path), overrides)
    model_method, options = similarity_settings(cfg, method)
    check_similarity(model_method, options, cfg["model"]["num_embeds"])
    return cfg, model_method, options


def score_split(model, cfg, loader, device, method, options, progress=False, encoded=None, ranks_only=False):
    """Encode the split once and score it: scores (N_img, N_cap), caption_to_image (N_cap,), and the
    collapse diagnostics {'image': ..., 'caption': ...}. The sets are freed on return unless the
    caller passed them in as `encoded` (encode_split's output). ranks_only=True (the caller only
    ranks the matrix): with eval.rank_bounds, max_pair and greedy pairs that cannot change a rank
    hold an upper bound instead of their score (similarity.rank_preserving_scores)."""
    image_sets, image_globals, caption_sets, caption_globals, caption_to_image = (
        encoded if encoded is not None else encode_split(model, loader, device, cfg["train"]["amp"]))
    if ranks_only and cfg["eval"]["rank_bounds"] and method in RANK_BOUND_METHODS:
        scores, _ = rank_preserving_scores(image_sets, caption_sets, caption_to_image, method=method,
                                           chunk_size=cfg["eval"]["chunk_size"], progress=progress, **options)
    else:
        scores = score_matrix(image_sets, caption_sets, method=method, chunk_size=cfg["eval"]["chunk_size"],
                              progress=progress, **options)
    single_vector = cfg["model"]["set_head"]["type"] == "none"
    collapse = {
        "image": collapse_diagnostics(image_sets, image_globals, single_vector),
        "caption": collapse_diagnostics(caption_sets, caption_globals, single_vector),
    }
    note = collapse_note(image_sets.shape[1], single_vector)
    if note:
        collapse["note"] = note
    return scores, caption_to_image, collapse


def collapse_note(num_elements, single_vector):
    """Why some collapse measures are absent (None), or None when all are defined."""
    if single_vector:
        return ("one vector per item (model.set_head.type=none): no set to collapse, and its element is "
                "the global feature; every collapse measure is absent")
    if num_elements == 1:
        return ("K = 1: intra-set cosine, set variance and circular variance need two elements per set "
                "and are absent")
    return None


def ranking_results(scores, caption_to_image, dataset):
    """{'all': metrics} plus '1k' (five folds) for a 5,000-image MS-COCO split."""
    results = {"all": retrieval_metrics(scores, caption_to_image)}
    if dataset in ("coco", "precomputed") and scores.shape[0] == COCO_TEST_IMAGES:
        results["1k"] = five_fold_metrics(scores, caption_to_image, fold_size=COCO_FOLD_IMAGES)
    return results


def similarity_settings(cfg, method=None, options=None):
    """The similarity method and options to evaluate with: the arguments, else eval.method and
    eval.similarity_options, else the trained loss.similarity with its options."""
    method = method or cfg["eval"]["method"] or cfg["loss"]["similarity"]
    if options is None:
        options = cfg["eval"]["similarity_options"]
        if options is None:
            options = cfg["loss"]["similarity_options"] if method == cfg["loss"]["similarity"] else {}
    return method, dict(options or {})


def check_similarity(method, options, num_embeds):
    """Raise FlagError for an unknown method or a bad option, before anything is encoded."""
    sets = torch.nn.functional.normalize(torch.randn(2, num_embeds, 4), dim=-1)
    try:
        score_matrix(sets, sets, method=method, **options)
    except (ValueError, TypeError) as error:
        raise FlagError(f"similarity {method!r}: {error}") from None


def split_signature(dataset):
    """What must agree for two checkpoints' score matrices to be averaged: the images (their files,
    or the feature file with its row step and count) and every image's captions, in order."""
    if hasattr(dataset, "paths"):
        images = [os.path.abspath(str(path)) for path in dataset.paths]
    else:
        images = (os.path.abspath(str(dataset.images_path)), dataset.image_step, len(dataset))
    return {"images": images, "captions per image": dataset.captions_per_image,
            "captions": [list(captions) for captions in dataset.captions]}


def check_same_split(first, second):
    """Raise DataMismatchError naming both checkpoints when (path, split, signature) differ."""
    for part in first[2]:
        if first[2][part] != second[2][part]:
            raise DataMismatchError(
                f"checkpoints {first[0]!r} (split {first[1]!r}) and {second[0]!r} (split {second[1]!r}) "
                f"evaluate different data ({part} differ): an ensemble needs the same split in the same order")


def write_results(results, path):
    """The results dict as JSON: {"all": {...}, "1k": {...} (5,000-image COCO splits only),
    "collapse": {"image": {...}, "caption": {...}}, "method": "..."}. An ensemble writes
    {"models": [{"ckpt": path, "split": name, <that layout>}, ...], "ensemble": {"all": ..., "1k": ...,
    "method": ...}}. A path that cannot be written raises FlagError."""
    try:
        with open(path, "w") as handle:
            json.dump(results, handle, indent=2)
    except OSError as error:
        raise FlagError(f"results file {path!r} cannot be written ({error.strerror or error})") from None


def build_eval_context(cfg, checkpoint, split, device=None):
    """Model (weights from the checkpoint), eval loader and device for evaluating `split`."""
    prepare_data(cfg["data"])
    model, tokenizer, device = build_trained_model(cfg, checkpoint, device)
    return model, build_loader(cfg, split, tokenizer, train=False), device


def build_trained_model(cfg, checkpoint, device=None):
    """The checkpoint's model in eval mode on `device` (default: CUDA when present, unless run.device
    is cpu), its tokenizer, and the device. Needs no dataset. The model is built without its
    initial weights (model.image.weights, model.text.word_vectors): every weight comes from the
    checkpoint, so no download or word-vector file is needed."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() and cfg["run"]["device"] != "cpu" else "cpu"))
    tokenizer = build_text_tokenizer(cfg["model"]["text"], checkpoint.get("vocab"))
    without_initial_weights = apply_overrides(cfg, ["model.image.weights=null", "model.text.word_vectors=null"])
    model = build_model(without_initial_weights, checkpoint.get("vocab"))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint weights do not fit the model of its config ({str(error)[:200]})") from None
    return model.to(device).eval(), tokenizer, device


def format_results(results, title=""):
    """A fixed-width table: one row per protocol, then the collapse diagnostics."""
    lines = [title] if title else []
    lines.append(metrics_header(""))
    lines += [f"{protocol:8s}{metrics_row(metrics)}" for protocol, metrics in results.items() if protocol in PROTOCOLS]
    lines += eccv_lines(results) if "eccv" in results else complete_lines(results)    # COCO's note points to --eccv
    lines.append(f"similarity: {results.get('method')}   {COLLAPSE_HEADER}")
    lines += [f"  {modality:8s}{collapse_row(results['collapse'][modality])}" for modality in MODALITIES]
    if results["collapse"].get("note"):
        lines.append(f"  ({results['collapse']['note']})")
    return "\n".join(lines)


def format_ensemble(per_model, ensemble):
    """One table: a row per model and protocol, then the ensemble's; the collapse diagnostics below,
    in the columns of format_results."""
    width = max(len("ensemble"), *(len(r["ckpt"]) for r in per_model)) + 2
    lines = [f"split {per_model[0]['split']}", metrics_header(f"{'':{width}s}")]
    for name, results in [(r["ckpt"], r) for r in per_model] + [("ensemble", ensemble)]:
        lines += [f"{name:{width}s}{protocol:8s}{metrics_row(metrics)}"
                  for protocol, metrics in results.items() if protocol in PROTOCOLS]
    for name, results in [(r["ckpt"], r) for r in per_model] + [("ensemble", ensemble)]:
        lines += eccv_lines(results, f"{name}: ") if "eccv" in results else complete_lines(results, f"{name}: ")
    lines.append(f"ensemble: {ensemble['method']}")
    lines.append(COLLAPSE_HEADER)
    for results in per_model:
        lines += [f"  {results['ckpt']:{width}s}{modality:8s}{collapse_row(results['collapse'][modality])}"
                  for modality in MODALITIES]
        if results["collapse"].get("note"):
            lines.append(f"  {results['ckpt']:{width}s}({results['collapse']['note']})")
    return "\n".join(lines)


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--ckpt", nargs="+", required=True,
                        help="a best.pt or last.pt written by train.py; several: each, then their ensemble")
    parser.add_argument("--split", default=None, help="split to evaluate (default: data.test_split)")
    parser.add_argument("--method", default=None, help="similarity for scoring (default: the trained one)")
    parser.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--progress", action="store_true", help="show a progress bar while scoring")
    parser.add_argument("--figures", default=None, metavar="DIR", help="also draw the sets as PNGs + DIR/index.html")
    parser.add_argument("--figures-count", type=int, default=8, metavar="N", help="images in the figures (default 8)")
    parser.add_argument("--eccv", action="store_true", help="MS-COCO 5K test split: also ECCV Caption, CxC and "
                        f"COCO R@K by the eccv_caption package ({ECCV_INSTALL})")
    try:
        flags, overrides = separate_overrides(sys.argv[1:] if argv is None else list(argv), parser)
        args = parser.parse_args(flags)
        if args.out:
            check_out_request(args.out)
        draw = figures_request(args)
        per_model, ensemble = evaluate_checkpoints(args.ckpt, overrides, split=args.split, method=args.method,
                                                   progress=args.progress, draw=draw, eccv=args.eccv)
    except USER_ERRORS + (FiguresError,) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if ensemble is None:
        results = {key: value for key, value in per_model[0].items() if key not in ("ckpt", "split")}
        print(format_results(results, title=f"{args.ckpt[0]} | split {per_model[0]['split']}"))
    else:
        results = {"models": per_model, "ensemble": ensemble}
        print(format_ensemble(per_model, ensemble))
    if args.out:
        try:
            write_results(results, args.out)
        except FlagError as error:      # e.g. the folder went away during the evaluation
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0


# ----------------------------------------------------------------------------- helpers

def figures_request(args):
    """None without --figures; else a check that DIR is writable (before any evaluation) and the
    draw callback of evaluate_checkpoints that writes the figures of the one checkpoint into DIR,
    with the curves of the log.jsonl beside it when there is one."""
    if args.figures is None:
        return None
    if len(args.ckpt) > 1:
        raise FiguresError("--figures draws one checkpoint; give --ckpt a single path")
    check_figures_request(args.figures, args.figures_count)
    log = os.path.join(os.path.dirname(os.path.abspath(args.ckpt[0])), "log.jsonl")    # train.py writes it there
    return functools.partial(write_figures, args.figures, count=args.figures_count, title=args.ckpt[0], log=log)


def check_out_request(path, flag="--out", kind="JSON"):
    """Raise FlagError unless a file can be written where `flag` points, before any evaluation."""
    if os.path.isdir(path):
        raise FlagError(f"{flag} {path!r} is a folder; give a {kind} file name")
    try:
        with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(path))):
            pass
    except OSError as error:
        raise FlagError(f"{flag} {path!r} cannot be written ({error.strerror or error})") from None


def separate_overrides(argv, parser):
    """Split a command line into the parser's flags and key.sub=value overrides, in any order.

    An argument containing '=' is an override (a leading '--' dropped), never a checkpoint, unless
    it is --flag=value of a flag of `parser`; an unknown --key.sub followed by a value is the
    override key.sub=value. Returns (flags for parser.parse_args, overrides in their order).
    """
    known = {option for action in parser._actions for option in action.option_strings}
    flags, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-") and arg.split("=", 1)[0] in known:
            flags.append(arg)
        elif "=" in arg:
            overrides.append(arg[2:] if arg.startswith("--") else arg)
        elif arg.startswith("--") and i + 1 < len(argv) and "=" not in argv[i + 1] \
                and not argv[i + 1].startswith("--"):
            overrides.append(f"{arg[2:]}={argv[i + 1]}")
            i += 1
        elif arg.startswith("--"):
            overrides.append(arg[2:])     # no value: apply_overrides names it
        else:
            flags.append(arg)             # a flag's value, or a stray word argparse will name
        i += 1
    return flags, overrides


def _query_positive_metrics(scores, positives, chunk_size):
    """complete_positive_metrics for the queries of the rows: scores, positives (Q, N)."""
    counts = positives.sum(dim=1)                                                   # R per query, (Q,)
    if counts.eq(0).any():
        raise ValueError(f"{int(counts.eq(0).sum())} queries have no positive: every query needs one")
    map_at_r, r_precision, r1 = [], [], []
    for first in range(0, scores.shape[0], chunk_size):
        rows, relevant = scores[first:first + chunk_size], positives[first:first + chunk_size]
        # non-positives first, then a stable sort by score: a tie puts the positive after the non-positive
        positives_last = torch.sort(relevant.to(torch.uint8), dim=1, stable=True).indices         # (q, N)
        by_score = torch.sort(rows.gather(1, positives_last), dim=1, descending=True, stable=True).indices
        ranked = relevant.gather(1, positives_last.gather(1, by_score))             # (q, N) bool, ranked order
        hits = ranked.cumsum(dim=1).double()                                         # positives in the first r
        count = counts[first:first + chunk_size]
        position = torch.arange(1, ranked.shape[1] + 1, device=ranked.device)
        within = position[None, :] <= count[:, None]
        map_at_r.append((hits / position * ranked * within).sum(dim=1) / count)
        r_precision.append(hits.gather(1, (count - 1)[:, None]).squeeze(1) / count)
        r1.append(ranked[:, 0].double())
    return {"map_at_r": 100.0 * torch.cat(map_at_r).mean().item(),
            "r_precision": 100.0 * torch.cat(r_precision).mean().item(),
            "r1": 100.0 * torch.cat(r1).mean().item(),
            "positives_per_query": counts.double().mean().item()}


class _DirectionScores:
    """One retrieval direction of a score matrix (N_img, N_cap): queries are images (i2t) or
    captions (t2i), items the other side; block(queries, items) is their (q, m) scores."""

    def __init__(self, scores, direction):
        self.scores, self.direction = scores, direction
        self.num_queries, self.num_items = scores.shape if direction == "i2t" else scores.shape[::-1]

    def block(self, queries, items):
        """(q, m) scores; `queries` a range(first, stop) or an index tensor, `items` None (all) or an index tensor."""
        device = self.scores.device
        if self.direction == "i2t":
            rows = self.scores[queries.start:queries.stop] if isinstance(queries, range) else \
                self.scores.index_select(0, queries.to(device))
            return rows if items is None else rows.index_select(1, items.to(device))
        rows = self.scores if items is None else self.scores.index_select(0, items.to(device))  # rows first: contiguous
        columns = rows[:, queries.start:queries.stop] if isinstance(queries, range) else \
            rows.index_select(1, queries.to(device))
        return columns.t()                       # a view: topk reads it as fast as a transposed copy

    def pairs(self, queries, items):
        """Scores of (q, m) query-item index pairs."""
        queries, items = queries.to(self.scores.device), items.to(self.scores.device)
        if self.direction == "i2t":
            return self.scores[queries[:, None], items]
        return self.scores[items, queries[:, None]]


def _positive_keys(gts, query_index, item_index, num_items):
    """Sorted query * num_items + item keys of a benchmark's positives {query id: [item ids]} that
    lie in our gallery (a few ECCV positives are captions outside the 25,000)."""
    keys = [query_index[query] * num_items + item_index[item]
            for query, items in gts.items() for item in items if item in item_index and query in query_index]
    return torch.tensor(sorted(keys), dtype=torch.long)


def _ranked_lists(view, queries, items, keys, count, budget):
    """{benchmark: (len(queries), count) item indices}: each query's first `count` of `items` (None:
    all), ranked by score descending, a positive of that benchmark after a tied non-positive, then
    by index. `queries` a range or an index tensor of query indices.

    Only the items scoring at least the query's count-th largest score can come first: the top
    count + 1 show whether a tie runs past that boundary; where none does, the top `count` are the
    candidates, else every item at or above the boundary is (queries with as many, together)."""
    num_items = view.num_items if items is None else len(items)
    count = min(count, num_items)
    item_index = torch.arange(num_items) if items is None else items
    query_index = torch.arange(queries.start, queries.stop) if isinstance(queries, range) else queries
    ranked = {name: torch.empty(len(query_index), count, dtype=torch.long) for name in keys}
    step = max(1, budget // max(num_items, 1))
    for first in range(0, len(query_index), step):
        chunk = range(queries.start + first, min(queries.start + first + step, queries.stop)) \
            if isinstance(queries, range) else query_index[first:first + step]
        chunk_index = query_index[first:first + step]
        block = view.block(chunk, items)                                             # (q, m)
        values, top = block.topk(min(count + 1, num_items), dim=1)
        spill = values[:, count] == values[:, count - 1] if count < num_items else torch.zeros(
            len(chunk_index), dtype=torch.bool, device=block.device)
        groups = [((~spill).nonzero().squeeze(1), top[~spill][:, :count], values[~spill][:, :count])]
        if spill.any():
            rows = spill.nonzero().squeeze(1)
            at_or_above = block[rows] >= values[rows, count - 1:count]
            sizes = at_or_above.sum(dim=1)
            for size in sizes.unique().tolist():
                same = (sizes == size).nonzero().squeeze(1)
                local = at_or_above[same].nonzero()[:, 1].view(len(same), size)      # ascending item order
                groups.append((rows[same], local, block[rows[same]].gather(1, local)))
        for rows, local, group_values in groups:
            candidates = item_index.to(local.device)[local]                          # (r, size) item indices
            query_keys = chunk_index.to(rows.device)[rows][:, None] * view.num_items
            for name, positive in keys.items():
                flags = torch.isin(query_keys + candidates, positive.to(candidates.device))
                order = _positives_last_order(group_values, flags, candidates)[:, :count]
                ranked[name][first + rows.cpu()] = candidates.gather(1, order).cpu()
    return ranked


def _merged_lists(view, first, second, positive, to_ids):
    """Per query, the ids of the items of two (Q, k) rankings of one benchmark merged into one list
    in its order (score descending, a positive after a tied non-positive, then by index), each once."""
    queries = torch.arange(first.shape[0])
    candidates = torch.cat([first, second], dim=1)                                   # (Q, 2k)
    values = view.pairs(queries, candidates).cpu()
    flags = torch.isin(queries[:, None] * view.num_items + candidates, positive)
    merged = candidates.gather(1, _positives_last_order(values, flags, candidates))
    fresh = torch.ones_like(merged, dtype=torch.bool)
    fresh[:, 1:] = merged[:, 1:] != merged[:, :-1]                                   # a repeat sorts next to itself
    return [[item for item, keep in zip(row, keeps) if keep]
            for row, keeps in zip(to_ids[merged].tolist(), fresh.tolist())]


def _positives_last_order(values, flags, items):
    """(r, m) permutation ordering each row by value descending, then non-positives before
    positives, then item index: three stable sorts, the last key first."""
    order = items.argsort(dim=1)
    order = order.gather(1, flags.gather(1, order).to(torch.uint8).sort(dim=1, stable=True).indices)
    return order.gather(1, values.gather(1, order).sort(dim=1, descending=True, stable=True).indices)


def _package_block(benchmark, lists, folds_agree, source):
    """Call the package on the ranked id lists and lay its fractions out as percent."""
    def recalls(method, retrieved):
        metrics = {}
        for k in (1, 5, 10):
            score = method(retrieved, "all", K=k)
            metrics.update({f"{direction}_r{k}": 100.0 * float(score[direction]) for direction in ("i2t", "t2i")})
        metrics = {key: metrics[key] for key in RECALL_KEYS}
        metrics["rsum"] = sum(metrics.values())
        return metrics

    with contextlib.redirect_stderr(io.StringIO()):      # its ECCV loop draws a tqdm bar whatever verbose says
        eccv = benchmark.eccv_metrics(lists["eccv"], "all")
        block = {"eccv_caption": {
                     direction: {"map_at_r": 100.0 * float(eccv["eccv_map_at_r"][direction]),
                                 "r_precision": 100.0 * float(eccv["eccv_rprecision"][direction]),
                                 "r1": 100.0 * float(eccv["eccv_r1"][direction]),
                                 "queries": len(benchmark.eccv_gts[direction]),
                                 "positives_per_query": sum(map(len, benchmark.eccv_gts[direction].values()))
                                 / len(benchmark.eccv_gts[direction])}
                     for direction in ("i2t", "t2i")},
                 "cxc": recalls(benchmark.cxc_recalls, lists["cxc"]),
                 "coco_5k": recalls(benchmark.coco_5k_recalls, lists["coco"]),
                 "coco_1k": recalls(benchmark.coco_1k_recalls, lists["coco"])}
    block.update({"coco_1k_folds_as_ours": folds_agree, "ids": source, "package": _package_version(),
                  "pmrp": None, "pmrp_note": PMRP_NOTE})
    return block


def _package_version():
    try:
        return f"eccv_caption {importlib.metadata.version('eccv-caption')}"
    except importlib.metadata.PackageNotFoundError:
        return "eccv_caption"


COLLAPSE_HEADER = "set collapse (intra-set cos | cos to global | log var | log circ var):"


def complete_lines(results, prefix=""):
    """The complete-positive metrics as two rows under the R@K table, or the one line saying why not."""
    if "complete" not in results:
        return [f"{prefix}{results['complete_note']}"] if results.get("complete_note") else []
    complete = results["complete"]
    lines = [f"{prefix}against every fitting item ({complete['source']}):",
             f"{'':8s}{'mAP@R':>9s}{'R-Prec':>9s}{'R@1':>9s}{'positives':>11s}"]
    for direction in ("i2t", "t2i"):
        metrics = complete[direction]
        lines.append(f"{direction:8s}{metrics['map_at_r']:9.2f}{metrics['r_precision']:9.2f}{metrics['r1']:9.2f}"
                     f"{metrics['positives_per_query']:11.2f}")
    return lines


def eccv_lines(results, prefix=""):
    """The "eccv" block under the tables: ECCV Caption's three numbers, then CxC, COCO 5K and 1K R@K."""
    if "eccv" not in results:
        return []
    block = results["eccv"]
    lines = [f"{prefix}ECCV Caption, CxC and COCO by {block['package']} (ids: {block['ids']}):",
             f"{'ECCV':8s}{'mAP@R':>9s}{'R-Prec':>9s}{'R@1':>9s}{'queries':>9s}{'positives':>11s}"]
    for direction in ("i2t", "t2i"):
        metrics = block["eccv_caption"][direction]
        lines.append(f"{direction:8s}{metrics['map_at_r']:9.2f}{metrics['r_precision']:9.2f}{metrics['r1']:9.2f}"
                     f"{metrics['queries']:9d}{metrics['positives_per_query']:11.2f}")
    lines.append(metrics_header("")[:8 + 9 * (len(RECALL_KEYS) + 1)])
    for key, name in (("cxc", "CxC"), ("coco_5k", "COCO 5K"), ("coco_1k", "COCO 1K")):
        lines.append(f"{name:8s}" + "".join(f"{block[key][k]:9.2f}" for k in RECALL_KEYS + ("rsum",)))
    lines.append("COCO 1K folds: " + ("the same five folds of 1,000 images as ours" if block["coco_1k_folds_as_ours"]
                                      else "the package's (blocks of its caption id list), not ours: its 1K ranks "
                                           "other sub-galleries than our 1k row"))
    lines.append(block["pmrp_note"])
    return lines


def metrics_header(prefix):
    """The column names of metrics_row, after `prefix` and an 8-character protocol column."""
    return f"{prefix}{'':8s}" + "".join(f"{k:>9s}" for k in RECALL_KEYS + ("rsum",)) + f"{'medr i/t':>10s}"


def metrics_row(metrics):
    row = "".join(f"{metrics[k]:9.2f}" for k in RECALL_KEYS + ("rsum",))
    return f"{row}{metrics['i2t_medr']:5.0f}/{metrics['t2i_medr']:<4.0f}"


def collapse_row(diag):
    def cell(key, width, digits=3):
        return f"{'n/a':>{width}s}" if diag[key] is None else f"{diag[key]:{width}.{digits}f}"

    return (f"{cell('intra_set_cos', 8)} | {cell('global_cos', 6)} | {cell('log_set_variance', 7)} | "
            f"{cell('log_circular_variance', 7)}")


if __name__ == "__main__":
    sys.exit(main())
