"""Use a trained MaxMatch checkpoint on your own images and captions: encode, score, search a gallery.

    python search.py index --ckpt runs/shapes_maxmatch/best.pt --split test --out runs/gallery_test
    python search.py index --ckpt CKPT --images DIR --out GALLERY            # every image file under DIR
    python search.py index --ckpt CKPT --captions FILE.txt --out GALLERY     # one caption a line
    python search.py query --index GALLERY "a large red circle above a small blue square" --top 10 \\
        [--json FILE] [--html FILE] [--approximate [--candidates N] [--probe P]]
    python search.py query --index CAPTION_GALLERY --image PATH --top 10

From Python (everything comes from the checkpoint: config, vocabulary or tokenizer, evaluation
transform, similarity and its options):

    from search import load_trained, top_k
    trained = load_trained("runs/shapes_maxmatch/best.pt", device="cpu")
    image_sets = trained.encode_images(["a.png", pil_image])        # (N, K, D) float32 unit vectors
    caption_sets = trained.encode_captions(["a red circle"])         # (M, K, D)
    scores = trained.similarity(image_sets, caption_sets)            # (N, M)
    best = top_k(caption_sets[0], image_sets, 10, trained.method, trained.options)

Exact search (`top_k`): one cosine product of the query's K elements with every gallery element
gives each item the row-maxima bound of METHOD.md §5 (no matching can score more); items are then
matched exactly in decreasing order of their bound until the next bound lies below the current
k-th exact score by more than a rounding slack. The top k equals the exhaustive ranking, with exact
scores (the checkpoint's similarity computed in float64 from the stored sets, rounded to float32);
equal scores are ordered by gallery position. Other similarities than max_pair and greedy get a
float32 score per item as their "bound". `--approximate` takes the candidates from the gallery's
set index (gallery.py: the centroid Chamfer sum of PLAID's first stage) instead and matches only
them exactly: an order of magnitude less CPU at a million sets, exact scores, but not guaranteed
to find the exact top k (docs/search.md has the measured recall).

A gallery is a folder of sets and their keys that `index` updates incrementally; gallery.py holds
its format and the set index. docs/search.md has the details and the benchmark.
"""
import base64
import dataclasses
import hashlib
import html
import io
import json
import math
import os
import re
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data import DataError, ImageTransform, build_dataset, collate_captions, collate_images, open_image, prepare_data
from evaluate import (USER_ERRORS, ArgumentParser, FlagError, build_trained_model, check_out_request,
                      checkpoint_settings, separate_overrides)
from figures import LIGHT, MARK, PAGE_STYLE, SMALL_TILE, display_picture, fit_tile
from gallery import (INDEX_CANDIDATES, INDEX_PROBE, INDEX_TUNED_FOR, Gallery, SearchError, gallery_chunks,
                     gallery_lock, gallery_shape, load_set_index, save_set_index, take_sets)
from model import autocast, load_checkpoint, move_to
from similarity import rounding_slack, score_matrix, upper_bound_sums

BOUND_METHODS = ("max_pair", "greedy")     # similarities the row-maxima bound prunes
CHUNK_BYTES = 32 * 2**20                   # gallery sets read per step of the bound pass
FIRST_MATCHED = 32                         # top_k matches the best max(2k, this) bounds first
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
REGION_EXTENSIONS = (".npy",)              # region (BUTD) checkpoints index feature arrays
OVERRIDE = re.compile(r"\w+(\.\w+)+=")        # config overrides are key.sub=value


def load_trained(path, device=None, overrides=()):
    """The checkpoint at `path` ready to encode and score, in eval mode, on `device` (default: CUDA
    when present, unless run.device is cpu), with the AMP of its train.amp on CUDA. `overrides`:
    key.sub=value config overrides (e.g. model.text.bert=/new/folder). Raises the project's
    one-line user errors (CheckpointError, ConfigError, DataError, ModelError, FlagError)."""
    path = str(path)
    checkpoint = load_checkpoint(path)
    cfg, method, options = checkpoint_settings(checkpoint, path, list(overrides), None)
    model, tokenizer, device = build_trained_model(cfg, checkpoint, device)
    return TrainedModel(model=model, cfg=cfg, tokenizer=tokenizer, device=device, method=method, options=options,
                        path=os.path.abspath(path), fingerprint=checkpoint_fingerprint(checkpoint, cfg),
                        epoch=checkpoint.get("epoch"))


@dataclasses.dataclass
class TrainedModel:
    """A loaded checkpoint (load_trained): encode_images, encode_captions, similarity."""
    model: torch.nn.Module
    cfg: dict
    tokenizer: object
    device: torch.device
    method: str                # the checkpoint's evaluation similarity (eval.method, else loss.similarity)
    options: dict              # and its options
    path: str
    fingerprint: str           # sha256 of the weights and the encoding config (checkpoint_fingerprint)
    epoch: object = None

    @property
    def uses_regions(self):
        """True for region (BUTD, `precomputed`) checkpoints: images are (regions, features) arrays."""
        return self.cfg["model"]["image"]["type"] == "precomputed"

    @property
    def image_loader(self):
        """A picklable callable turning one image (path, PIL image, feature array) into the model's input."""
        image_cfg = self.cfg["model"]["image"]
        if self.uses_regions:
            return ImageLoader(None, image_cfg["feature_dim"])
        return ImageLoader(ImageTransform(self.cfg["data"]["image_size"], train=False), None)

    @torch.no_grad()
    def encode_images(self, images, batch_size=None):
        """(N, K, D) float32 sets on the CPU. images: a list of image file paths or PIL images; for region
        checkpoints, (regions, feature_dim) arrays or tensors, or .npy files holding one."""
        items = check_list(images, "images")
        batch_size = batch_size or self.cfg["eval"]["batch_size"]
        loader = self.image_loader
        return self.encode_loaded([loader(item) for item in items[start:start + batch_size]]
                                  for start in range(0, len(items), batch_size))

    @torch.no_grad()
    def encode_captions(self, captions, batch_size=None):
        """(M, K, D) float32 sets on the CPU, one per caption string, tokenised as in training."""
        texts = check_list(captions, "captions")
        if not all(isinstance(text, str) for text in texts):
            raise TypeError("encode_captions takes a list of strings")
        batch_size = batch_size or self.cfg["eval"]["batch_size"] * self.cfg["data"]["captions_per_image"]
        sets = [self._encode(collate_captions([self.tokenizer.encode(text) for text in texts[start:start + batch_size]],
                                              self.tokenizer.pad_id), self.model.encode_captions)
                for start in range(0, len(texts), batch_size)]
        return torch.cat(sets) if sets else self._no_sets()

    @torch.no_grad()
    def encode_loaded(self, batches):
        """Sets of image batches already made model inputs by `image_loader` (lists of tensors)."""
        key = "regions" if self.uses_regions else "image"
        sets = [self._encode(collate_images([{key: item} for item in batch]), self.model.encode_images)
                for batch in batches if len(batch)]
        return torch.cat(sets) if sets else self._no_sets()

    def similarity(self, image_sets, caption_sets):
        """(N, M) scores of image sets (N, K, D) against caption sets (M, K, D): the checkpoint's
        similarity with its options (exact maximal matching for MaxMatch), as evaluate.py scores."""
        return score_matrix(image_sets, caption_sets, method=self.method, chunk_size=self.cfg["eval"]["chunk_size"],
                            **self.options)

    def _encode(self, batch, encoder):
        self.model.eval()
        with autocast(self.device, self.cfg["train"]["amp"]):
            return encoder(move_to(batch, self.device)).sets.float().cpu()

    def _no_sets(self):
        return torch.empty(0, self.cfg["model"]["num_embeds"], self.cfg["model"]["embed_dim"])


class ImageLoader:
    """One image -> the model's input: pixels (3, S, S) through the evaluation transform, or region
    features (regions, feature_dim) float32 for region checkpoints. Picklable (DataLoader workers)."""

    def __init__(self, transform, feature_dim):
        self.transform, self.feature_dim = transform, feature_dim

    def __call__(self, item):
        if self.feature_dim is None:
            if isinstance(item, Image.Image):
                return self.transform(item.convert("RGB"))
            if isinstance(item, (str, os.PathLike)):
                return self.transform(open_image(item))
            raise TypeError(f"an image is a file path or a PIL image, got {type(item).__name__}")
        if isinstance(item, FeatureRow):
            item = np.load(item.path, mmap_mode="r")[item.row]
        elif isinstance(item, (str, os.PathLike)):
            item = load_feature_file(item)
        regions = torch.as_tensor(np.asarray(item, dtype=np.float32))
        if regions.dim() != 2 or regions.shape[1] != self.feature_dim or regions.shape[0] == 0:
            raise DataError(f"region features of shape {tuple(regions.shape)}: this checkpoint takes "
                            f"(regions, {self.feature_dim}) arrays")
        return regions


class FeatureRow(NamedTuple):
    """Row `row` of a (rows, regions, features) .npy file (a split of SCAN features)."""
    path: str
    row: int


def top_k(query, gallery, k, method="max_pair", options=None, gallery_kind="images", chunk_items=None):
    """The k best items of a gallery for one query set by the exact similarity, best first.

    query (K_q, D): a caption set against an image gallery (gallery_kind "images"), an image set
    against a caption gallery ("captions"); scores are always similarity(image, caption).
    gallery: (N, K_g, D) tensor or a Gallery. Returns a SearchResult: positions (k',) long and scores
    (k',) float32 with k' = min(k, N), equal scores ordered by gallery position, and `matched`, how
    many items were matched exactly. For max_pair and greedy only items whose row-maxima bound
    reaches the running k-th exact score (less the rounding slack) are matched, the best max(2k, 32)
    bounds first; for the other methods the bound pass computes every float32 score and the same
    rule picks which to recompute. NaN or inf in the query or the gallery raise a ValueError.
    """
    options = dict(options or {})
    count = len(gallery)
    k = min(int(k), count)
    if k < 1:
        return SearchResult(torch.empty(0, dtype=torch.long), torch.empty(0), 0)
    query = query.detach().float()
    bounds, largest = bound_pass(query, gallery, method, options, gallery_kind, chunk_items)   # (N,)
    slack = rounding_slack(largest, torch.float32, options.get("score", "mean"))
    step = min(count, max(2 * k, FIRST_MATCHED))
    first_bounds, chosen = bounds.topk(step)               # the best bounds; every other one is <= their minimum
    positions = [chosen]
    scores = [exact_scores(query, take_sets(gallery, chosen, query.device), method, options, gallery_kind)]
    threshold = scores[0].topk(k).values[-1].item()        # the running k-th exact score
    if step < count and first_bounds[-1].item() >= threshold - slack:      # some other item could still enter
        done = torch.zeros(count, dtype=torch.bool, device=bounds.device)
        done[chosen] = True
        while True:
            undecided = ~done & (bounds >= threshold - slack)
            remaining = int(undecided.sum())
            if remaining == 0:
                break
            step *= 4
            chosen = bounds.masked_fill(~undecided, -math.inf).topk(min(step, remaining)).indices
            done[chosen] = True
            positions.append(chosen)
            scores.append(exact_scores(query, take_sets(gallery, chosen, query.device), method, options,
                                       gallery_kind))
            threshold = torch.cat(scores).topk(k).values[-1].item()
    positions, scores = torch.cat(positions), torch.cat(scores)
    order = gallery_order(scores, positions)[:k]
    return SearchResult(positions[order].cpu(), scores[order].cpu(), int(positions.numel()))


class SearchResult(NamedTuple):
    positions: torch.Tensor    # (k,) gallery positions, best first
    scores: torch.Tensor       # (k,) float32 exact scores
    matched: int               # items matched exactly to find them


def exact_scores(query, sets, method, options, gallery_kind):
    """Exact similarity of one query set with gallery sets (n, K_g, D) -> (n,) float32: computed in
    float64 and rounded, so equal sets get equal scores wherever they sit in a batch. The bound pass
    has checked every value for NaN and inf already (those checks cost more than matching 32 sets)."""
    query, sets = query.double().unsqueeze(0), sets.double()
    if gallery_kind == "images":
        scores = score_matrix(sets, query, method=method, check_finite=False, **options)[:, 0]
    else:
        scores = score_matrix(query, sets, method=method, check_finite=False, **options)[0]
    return scores.float()


def bound_pass(query, gallery, method, options, gallery_kind, chunk_items=None):
    """Per gallery item an upper bound of its score (N,) float32, and a bound of every |cosine| (for
    the slack): the mean of the smaller side's row maxima (METHOD.md §5) for max_pair and greedy,
    the float32 score itself for the other methods. One pass over the gallery in chunks; a NaN or
    inf anywhere in the query or the gallery raises a ValueError (it reaches the cosines' extremes)."""
    num_embeds, dim = query.shape
    gallery_embeds = gallery_shape(gallery)[1]
    chunk_items = chunk_items or max(1, CHUNK_BYTES // (4 * gallery_embeds * dim))
    bounds = torch.empty(len(gallery), device=query.device)
    largest, score = 0.0, options.get("score", "mean")
    for start, sets in gallery_chunks(gallery, chunk_items, query.device):
        end = start + sets.shape[0]
        if method in BOUND_METHODS:
            cos = (sets.reshape(-1, dim) @ query.T).view(-1, gallery_embeds, num_embeds)     # (n, K_g, K_q)
            # batch-last (1, K_v, K_t, n): the maxima are then vectorised over the items (copy included,
            # about 4x faster here than reducing the 4 x 4 blocks in place; docs/search.md)
            blocks = cos.permute(1, 2, 0) if gallery_kind == "images" else cos.permute(2, 1, 0)
            bounds[start:end] = upper_bound_sums(blocks.contiguous().unsqueeze(0), score)[0]   # matched sums
            smallest_cos, largest_cos = (value.item() for value in torch.aminmax(cos))
            if not math.isfinite(smallest_cos + largest_cos):
                raise ValueError("non-finite values (NaN or inf) in the query or the gallery sets: "
                                 "cosines would be meaningless")
            largest = max(largest, -smallest_cos, largest_cos)
        else:
            bounds[start:end] = exact_float32(query, sets, method, options, gallery_kind)
            largest = max(largest, 1.0, bounds[start:end].abs().amax().item())
    if method in BOUND_METHODS:
        bounds /= min(num_embeds, gallery_embeds)            # matched sums -> scores, once (not per chunk)
    return bounds, largest


def exact_float32(query, sets, method, options, gallery_kind):
    if gallery_kind == "images":
        return score_matrix(sets, query.unsqueeze(0), method=method, **options)[:, 0]
    return score_matrix(query.unsqueeze(0), sets, method=method, **options)[0]


def gallery_order(scores, positions):
    """Indices sorting by decreasing score, equal scores by increasing gallery position."""
    by_position = positions.argsort()
    return by_position[scores[by_position].sort(descending=True, stable=True).indices]


def approximate_top_k(query, gallery, index, k, method="max_pair", options=None, gallery_kind="images",
                      candidates=INDEX_CANDIDATES, probe=INDEX_PROBE):
    """Approximate top k, exact scores: the `candidates` items that gallery.SetIndex ranks best for
    the query (`probe` centroids per query element) are searched exactly by top_k, so every score
    is the exact similarity and ties keep gallery order; an item the index does not rank among
    the candidates is missed. Returns a SearchResult (`matched` = the candidates)."""
    positions = index.candidates(query, candidates, probe)                  # (c,) increasing
    found = top_k(query.cpu(), take_sets(gallery, positions, torch.device("cpu")), k, method, options, gallery_kind)
    return SearchResult(positions[found.positions], found.scores, int(positions.numel()))


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = command_parser()
    try:
        command = argv[0] if argv and argv[0] in ("index", "query") else None
        if command is None:
            parser.parse_args(argv[:1] or [])        # names the missing or unknown command
            raise FlagError("give a command: index or query (see --help)")
        subparser = parser.subcommands[command]
        # a caption such as "a = b" is text, not a key.sub=value override
        texts = [arg for arg in argv[1:] if "=" in arg and not arg.startswith("-") and not OVERRIDE.match(arg)]
        flags, overrides = separate_overrides([arg for arg in argv[1:] if arg not in texts], subparser)
        args = subparser.parse_args(flags + texts)
        if command == "index":
            return index_command(args, overrides)
        return query_command(args, overrides)
    except USER_ERRORS + (SearchError,) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the gallery keeps every batch encoded so far; run the same command again to finish",
              file=sys.stderr)
        return 130


def command_parser():
    parser = ArgumentParser(prog="search.py", description=__doc__.split("\n")[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", allow_abbrev=False,
                                help="encode images or captions into a gallery folder (new and changed ones only)")
    index.add_argument("--ckpt", required=True, help="a best.pt or last.pt written by train.py")
    source = index.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", help="every image file under DIR (.npy feature files for "
                        "region checkpoints)")
    source.add_argument("--captions", metavar="FILE", help="a UTF-8 text file, one caption a line")
    source.add_argument("--split", help="the images of a split of the checkpoint's dataset (e.g. test)")
    index.add_argument("--out", required=True, metavar="GALLERY", help="gallery folder (created or updated)")
    index.add_argument("--approximate", action="store_true", help="also build the set index for query --approximate")
    query = commands.add_parser("query", allow_abbrev=False, help="the best gallery items for a caption or an image")
    query.add_argument("--index", required=True, metavar="GALLERY", help="a gallery folder made by `index`")
    query.add_argument("text", nargs="?", default=None, help="a caption (against an image gallery)")
    query.add_argument("--image", default=None, metavar="PATH", help="an image (against a caption gallery)")
    query.add_argument("--top", type=int, default=10, help="results to show (default 10)")
    query.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    query.add_argument("--html", default=None, metavar="FILE", help="also write a page with thumbnails")
    query.add_argument("--ckpt", default=None, help="the checkpoint (default: the one the gallery was indexed with)")
    query.add_argument("--approximate", action="store_true", help="candidates from the gallery's set index, then "
                       f"exact matching: faster on large galleries, not exact ({INDEX_TUNED_FOR})")
    query.add_argument("--candidates", type=int, default=INDEX_CANDIDATES, metavar="N",
                       help=f"with --approximate: items searched exactly (default {INDEX_CANDIDATES})")
    query.add_argument("--probe", type=int, default=INDEX_PROBE, metavar="P",
                       help=f"with --approximate: nearest centroids per query element (default {INDEX_PROBE})")
    parser.subcommands = {"index": index, "query": query}
    return parser


def index_command(args, overrides):
    """`index`: encode what is new or changed under the source into the gallery, then drop the
    source's items that are gone. Prints one summary line; warns once per unreadable file."""
    if args.images is not None and not os.path.isdir(args.images):
        raise SearchError(f"--images {args.images!r} is not a folder")
    if args.captions is not None and not os.path.isfile(args.captions):
        raise SearchError(f"--captions {args.captions!r} is not a file (one caption a line)")
    trained = load_trained(args.ckpt, overrides=overrides)
    kind = "captions" if args.captions is not None else "images"
    listing, source = list_source(args, trained)           # [(key, fingerprint, item to encode)]
    gallery = open_for_index(args.out, kind, trained)
    with gallery_lock(args.out):
        gallery.repair()
        wanted = [(key, fp, item) for key, fp, item in listing
                  if key not in gallery.items or gallery.items[key][1] != fp]
        existed = {key for key, _, _ in wanted if key in gallery.items}
        started, skipped = time.perf_counter(), []
        encode_into(gallery, trained, wanted, source, skipped)
        seconds = time.perf_counter() - started
        unreadable = set(skipped)                                    # a changed file now unreadable goes too
        listed = {key for key, _, _ in listing} - unreadable
        gone = [key for key, (_, _, item_source) in gallery.items.items()
                if (item_source == source and key not in listed) or key in unreadable]
        gallery.remove(gone)
        gallery.write_snapshot()
        if args.approximate and len(gallery):
            save_set_index(gallery)
    encoded = len(wanted) - len(skipped)
    changed = len(existed - unreadable)
    unit = "images" if kind == "images" else "captions"
    count = f"{len(gallery)} {unit if len(gallery) != 1 else unit[:-1]}"
    print(f"{args.out}: {count} ({encoded - changed} new, {changed} changed, "
          f"{len(listing) - len(wanted)} unchanged, {len(skipped)} unreadable skipped, {len(gone)} removed); "
          f"encoded {encoded} in {seconds:.1f} s ({encoded / max(seconds, 1e-9):.1f} {unit}/s)")
    return 0


def list_source(args, trained):
    """[(key, fingerprint, item)] of the index source in gallery order, and the source's name."""
    if args.captions is not None:
        try:
            with open(args.captions, encoding="utf-8") as handle:
                lines = [line.strip() for line in handle]
        except UnicodeDecodeError as error:
            raise SearchError(f"--captions {args.captions!r} is not UTF-8 text ({error})") from None
        texts = list(dict.fromkeys(line for line in lines if line))
        if not texts:
            raise SearchError(f"--captions {args.captions!r} holds no caption (one caption a line)")
        return [(text, None, text) for text in texts], os.path.abspath(args.captions)
    if args.split is not None:
        prepare_data(trained.cfg["data"])
        dataset = build_dataset(trained.cfg, args.split, trained.tokenizer, train=False)
        if trained.uses_regions:
            path = os.path.abspath(str(dataset.images_path))
            stamp = file_fingerprint(path)
            rows = [FeatureRow(path, index * dataset.image_step) for index in range(len(dataset))]
            return [(f"{path}[{row.row}]", stamp, row) for row in rows], f"split {args.split}"
        paths = [os.path.abspath(str(path)) for path in dataset.paths]
        return [(path, file_fingerprint(path), path) for path in paths], f"split {args.split}"
    extensions = REGION_EXTENSIONS if trained.uses_regions else IMAGE_EXTENSIONS
    folder = os.path.abspath(args.images)
    found = []
    for root, folders, files in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        found += [os.path.join(root, name) for name in sorted(files)
                  if not name.startswith(".") and name.lower().endswith(extensions)]
    return [(path, file_fingerprint(path), path) for path in found], folder


def open_for_index(path, kind, trained):
    """The gallery at `path`, created when missing; refuses another kind or another checkpoint."""
    if not os.path.exists(os.path.join(str(path), "gallery.json")):
        if os.path.isfile(str(path)):
            raise SearchError(f"--out {str(path)!r} is a file; give a gallery folder")
        try:
            return Gallery.create(path, kind, trained)
        except OSError as error:
            raise SearchError(f"--out {str(path)!r} cannot be written ({error.strerror or error})") from None
    gallery = Gallery.open(path, for_index=True)
    check_same_checkpoint(gallery, trained)
    if gallery.kind != kind:
        raise SearchError(f"gallery {str(path)!r} holds {gallery.kind}, not {kind}: index {kind} into another folder")
    return gallery


def check_same_checkpoint(gallery, trained):
    recorded = gallery.header["checkpoint"]
    if recorded["fingerprint"] != trained.fingerprint:
        raise SearchError(f"gallery {gallery.path!r} was indexed with another checkpoint ({recorded['path']}, "
                          f"fingerprint {recorded['fingerprint'][:12]}) than {trained.path} (fingerprint "
                          f"{trained.fingerprint[:12]}): its sets cannot be compared; index into a new folder")


def encode_into(gallery, trained, wanted, source, skipped):
    """Encode the wanted items batch by batch into the gallery (each batch durable before the next),
    with a progress bar on a terminal; unreadable images are skipped (their keys added to `skipped`)
    with one warning line each."""
    if not wanted:
        return
    with tqdm(total=len(wanted), unit=" " + gallery.kind, file=sys.stderr, disable=None, leave=False) as bar:
        if gallery.kind == "captions":
            size = trained.cfg["eval"]["batch_size"] * trained.cfg["data"]["captions_per_image"]
            for start in range(0, len(wanted), size):
                part = wanted[start:start + size]
                gallery.append([key for key, _, _ in part], [fp for _, fp, _ in part],
                               trained.encode_captions([text for _, _, text in part]), source)
                bar.update(len(part))
            return
        loader = DataLoader(LoadedImages([item for _, _, item in wanted], trained.image_loader),
                            batch_size=trained.cfg["eval"]["batch_size"], collate_fn=list,
                            num_workers=int(trained.cfg["data"]["num_workers"]))
        for batch in loader:
            good = [(position, value) for position, value in batch if not isinstance(value, str)]
            for position, message in batch:
                if isinstance(message, str):
                    print(f"warning: skipped unreadable {wanted[position][0]}: {message}", file=sys.stderr)
                    skipped.append(wanted[position][0])
            if good:
                gallery.append([wanted[p][0] for p, _ in good], [wanted[p][1] for p, _ in good],
                               trained.encode_loaded([[value for _, value in good]]), source)
            bar.update(len(batch))


class LoadedImages(Dataset):
    """(position, model input) for each image; (position, one-line reason) when it cannot be read."""

    def __init__(self, items, loader):
        self.items, self.loader = items, loader

    def __len__(self):
        return len(self.items)

    def __getitem__(self, position):
        try:
            return position, self.loader(self.items[position])
        except (DataError, OSError, ValueError) as error:
            return position, (str(error).splitlines() or [type(error).__name__])[0]


def query_command(args, overrides):
    """`query`: encode the caption (or --image), find the exact top k (or, with --approximate, the set
    index's approximate one), print them."""
    if args.top < 1:
        raise SearchError(f"--top must be 1 or more, got {args.top}")
    for flag, path, kind in (("--json", args.json, "JSON"), ("--html", args.html, "HTML")):
        if path:
            check_out_request(path, flag, kind)
    gallery = Gallery.open(args.index)
    if (args.text is None) == (args.image is None):
        raise SearchError("give a caption to search an image gallery, or --image PATH to search a caption gallery "
                          "(one of the two)")
    if args.text is not None and not args.text.strip():
        raise SearchError("the query caption is empty")
    wanted_kind = "images" if args.text is not None else "captions"
    if gallery.kind != wanted_kind:
        raise SearchError(f"gallery {args.index!r} holds {gallery.kind}: query it with "
                          + ("a caption" if gallery.kind == "images" else "--image PATH"))
    if args.image is not None and not os.path.isfile(args.image):
        raise SearchError(f"--image {args.image!r} does not exist")
    for flag, value in (("--candidates", args.candidates), ("--probe", args.probe)):
        if value < 1:
            raise SearchError(f"{flag} must be 1 or more, got {value}")
    checkpoint = args.ckpt or gallery.header["checkpoint"]["path"]
    if args.ckpt is None and not os.path.isfile(checkpoint):
        raise SearchError(f"the checkpoint {checkpoint!r} that gallery {args.index!r} was indexed with is gone: "
                          "pass --ckpt with it (or a copy)")
    trained = load_trained(checkpoint, device="cpu", overrides=overrides)
    check_same_checkpoint(gallery, trained)
    if args.text is not None:
        query, query_input = trained.encode_captions([args.text])[0], None
    else:
        query_input = trained.image_loader(args.image)
        query = trained.encode_loaded([[query_input]])[0]
    if args.approximate and len(gallery):
        found = approximate_top_k(query, gallery, load_set_index(gallery), args.top, trained.method, trained.options,
                                  gallery.kind, args.candidates, args.probe)
        how = (f"approximate: exact scores of {found.matched} candidates from the set index, {args.probe} "
               f"centroids per query element; the default --candidates {INDEX_CANDIDATES} --probe {INDEX_PROBE} "
               f"is {INDEX_TUNED_FOR}")
    else:
        found = top_k(query, gallery, args.top, trained.method, trained.options, gallery.kind)
        how = f"exact, {found.matched} of {len(gallery)} items matched"
    keys = gallery.keys
    results = [(keys[position], score) for position, score in zip(found.positions.tolist(), found.scores.tolist())]
    query_text = args.text if args.text is not None else args.image
    print(f"query: {query_text!r} | gallery {args.index}: {len(gallery)} {gallery.kind} | {trained.method} ({how})")
    field = "path" if gallery.kind == "images" else "caption"
    print(f"{'rank':>4s}  {'score':>7s}  {field}")
    for rank, (key, score) in enumerate(results, 1):
        print(f"{rank:4d}  {score:7.4f}  {shown_key(key, gallery.kind)}")
    if args.json:
        payload = {"query": query_text, "results": [{field: key, "score": score} for key, score in results]}
        write_output(args.json, json.dumps(payload, indent=2) + "\n", "--json")
    if args.html:
        write_output(args.html, results_page(query_text, query_input, results, gallery, trained, how), "--html")
    return 0


def shown_key(key, kind):
    """A path relative to the working folder when it lies inside it; captions as they are."""
    if kind == "captions":
        return key
    relative = os.path.relpath(key)
    return relative if not relative.startswith("..") else key


def write_output(path, text, flag):
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as error:
        raise SearchError(f"{flag} {path!r} cannot be written ({error.strerror or error})") from None


def results_page(query_text, query_input, results, gallery, trained, how):
    """A self-contained HTML page: the query, then the results as framed thumbnails (images, as the
    model saw them) or lines (captions), with their rank and score; the evaluation figures' style."""
    frame = "rgb({},{},{})".format(*LIGHT)
    style = (PAGE_STYLE + f".results{{display:flex;flex-wrap:wrap;gap:8px}}"
             f".result{{margin:0;width:{SMALL_TILE + 8}px;font-size:12px;word-wrap:break-word}}"
             f".result img{{width:{SMALL_TILE}px;height:{SMALL_TILE}px;border:4px solid {frame}}}"
             ".captions li{margin:4px 0}")
    parts = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\"><title>MaxMatch search</title>",
             f"<style>{style}</style></head><body>", "<h1>MaxMatch search</h1>"]
    if query_input is None:
        parts.append(f"<p>Query: <b>&ldquo;{html.escape(query_text)}&rdquo;</b></p>")
    else:
        parts.append(f"<p>Query image: {html.escape(query_text)}</p>")
        parts.append(thumbnail_tag(query_input, query_text, "rgb({},{},{})".format(*MARK)))
    parts.append(f"<p>Gallery {html.escape(gallery.path)}: {len(gallery)} {gallery.kind}; similarity "
                 f"{html.escape(trained.method)} ({html.escape(how)}); checkpoint {html.escape(trained.path)}</p>")
    if gallery.kind == "images":
        parts.append("<div class=\"results\">")
        loader = trained.image_loader
        for rank, (key, score) in enumerate(results, 1):
            try:
                item = FeatureRow(*split_row_key(key)) if trained.uses_regions and key.endswith("]") else key
                picture = thumbnail_tag(loader(item), key)
            except (DataError, OSError, ValueError):
                picture = "<p>(not readable now)</p>"
            parts.append(f"<figure class=\"result\">{picture}<figcaption>{rank}. score {score:.4f}<br>"
                         f"{html.escape(shown_key(key, 'images'))}</figcaption></figure>")
        parts.append("</div>")
    else:
        parts.append("<ol class=\"captions\">")
        parts += [f"<li>{score:.4f} {html.escape(key)}</li>" for key, score in results]
        parts.append("</ol>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def thumbnail_tag(model_input, alt, frame=None):
    """An <img> of the image as the model saw it (pixels) as an inline PNG; region features have none."""
    if model_input.dim() != 3:
        return f"<p>({model_input.shape[0]} regions)</p>"
    buffer = io.BytesIO()
    fit_tile(display_picture({"image": model_input}), SMALL_TILE).save(buffer, format="PNG")
    style = f" style=\"border-color:{frame}\"" if frame else ""
    return (f"<img src=\"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}\" "
            f"alt=\"{html.escape(alt)}\"{style}>")


def split_row_key(key):
    path, _, row = key.rpartition("[")
    return path, int(row[:-1])


# ----------------------------------------------------------------------------- helpers

def checkpoint_fingerprint(checkpoint, cfg):
    """sha256 of what decides a checkpoint's sets: its weights, vocabulary, the model config without
    the initialisation paths, and the image size and caption length of the transform and tokenizer."""
    digest = hashlib.sha256()
    model_cfg = json.loads(json.dumps(cfg["model"]))
    model_cfg["image"].pop("weights", None)
    for key in ("bert", "tokenizer", "word_vectors"):
        model_cfg["text"].pop(key, None)
    digest.update(json.dumps({"model": model_cfg, "image_size": cfg["data"]["image_size"],
                              "vocab": checkpoint.get("vocab")}, sort_keys=True).encode("utf-8"))
    for name in sorted(checkpoint["model"]):
        tensor = checkpoint["model"][name]
        if torch.is_tensor(tensor):
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode("utf-8"))
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def file_fingerprint(path):
    """[size, mtime_ns]: a file whose fingerprint changed is encoded again."""
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def load_feature_file(path):
    try:
        return np.load(path)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read feature file {path}: {str(error).splitlines()[0]}") from None


def check_list(items, what):
    if isinstance(items, (str, bytes, os.PathLike)) or not hasattr(items, "__len__"):
        raise TypeError(f"encode_{what} takes a list of {what} (wrap a single one in a list)")
    return list(items)


if __name__ == "__main__":
    sys.exit(main())
