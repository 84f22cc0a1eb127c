"""Data side of MaxMatch (SPEC sections 4 and 6): datasets, text tokenisation, batching.

- Built-in `shapes` dataset: generated deterministically from a seed into `<root>/images/*.png` +
  `<root>/dataset_shapes.json` (Karpathy layout), so the Karpathy loader reads it like COCO.
  Each image holds 2-4 coloured shapes; each of its captions describes a subset of them.
- Karpathy JSON + image folder datasets (`coco`, `f30k`) and SCAN precomputed region features
  (`precomputed`: `{split}_ims.npy` memory-mapped, `{split}_caps.txt`).
- Text: word vocabulary + tokeniser (GRU) or a transformers `AutoTokenizer` (BERT); caption token
  drop augmentation (SPEC 4).
- Batches: every item is an image with its C captions; `collate_batch` orders captions
  image-major (caption j of a batch belongs to image j // C). `ShardedBatchSampler` cuts one
  global permutation per epoch into global batches and gives each process a contiguous slice.

All training randomness (crop, caption choice, token drop, region drop) is derived from
(run seed, epoch, item index), so it does not depend on the number of workers or processes.

User-caused problems raise `DataError` with one message naming the file/key and the fix.
CLI: `python data.py --check CONFIG.yaml [key.sub=value ...]` (and `--prepare` to generate shapes).
"""
import argparse
import collections
import itertools
import json
import math
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, Sampler

SPECIAL_WORDS = ["<pad>", "<start>", "<end>", "<unk>", "<mask>"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KARPATHY_NAMES = {"coco": "coco", "f30k": "flickr30k", "flickr30k": "flickr30k", "shapes": "shapes"}
IMAGE_DATASETS = ("shapes", "coco", "f30k", "flickr30k")
# Karpathy split names per requested split (COCO trains on train + restval).
KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "dev": ("val",), "test": ("test",)}
# SCAN precomputed file prefixes per requested split.
PRECOMPUTED_SPLITS = {"train": "train", "val": "dev", "dev": "dev", "test": "test", "testall": "testall"}
# Token drop (SPEC 4, as VSE-infinity/DivE): of the dropped tokens 50% -> <mask>, 10% -> random word, 40% deleted.
DROP_MASK_SHARE = 0.5
DROP_RANDOM_SHARE = 0.1

SHAPES_GENERATOR_VERSION = 1
SHAPES_DEFAULTS = {
    "seed": 0,
    "num_train": 4000,
    "num_val": 500,
    "num_test": 1000,
    "image_size": 64,
    "min_objects": 2,               # objects per image: uniform in [min_objects, max_objects]
    "max_objects": 3,
    "num_shapes": 7,                # first N of SHAPE_NAMES
    "num_colours": 8,               # first N of COLOUR_NAMES
    "caption_objects_probs": [0.05, 0.65, 0.3],  # P(a caption describes 1, 2, 3 objects)
    "omit_size_prob": 0.3,          # per described object
    "omit_position_prob": 0.3,      # per described object in multi-object captions
    "relation_prob": 0.25,          # two-object captions: "a X left of / above a Y" instead of positions
    "captions_per_image": 5,
}
SHAPE_NAMES = ["circle", "square", "triangle", "diamond", "cross", "star", "hexagon"]
SHAPE_WORDS = {
    "circle": ["circle", "disk", "round shape"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle"],
    "diamond": ["diamond", "rhombus"],
    "cross": ["cross", "plus sign"],
    "star": ["star"],
    "hexagon": ["hexagon", "six sided shape"],
}
COLOUR_NAMES = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "white"]
COLOUR_RGB = {
    "red": (230, 40, 40), "orange": (255, 140, 0), "yellow": (240, 230, 50), "green": (40, 190, 60),
    "cyan": (40, 220, 230), "blue": (50, 80, 245), "purple": (165, 60, 225), "white": (245, 245, 245),
}
COLOUR_WORDS = {
    "red": ["red", "scarlet"], "orange": ["orange"], "yellow": ["yellow", "golden"], "green": ["green"],
    "cyan": ["cyan", "turquoise"], "blue": ["blue"], "purple": ["purple", "violet"], "white": ["white"],
}
SIZE_NAMES = ["small", "large"]
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
# Phrases per 3x3 grid cell (row, col).
POSITION_WORDS = {
    (0, 0): ["in the top left corner", "at the top left", "in the upper left corner"],
    (0, 1): ["at the top", "at the top center", "in the upper middle"],
    (0, 2): ["in the top right corner", "at the top right", "in the upper right corner"],
    (1, 0): ["on the left", "at the left side", "in the middle left"],
    (1, 1): ["in the center", "in the middle", "in the centre"],
    (1, 2): ["on the right", "at the right side", "in the middle right"],
    (2, 0): ["in the bottom left corner", "at the bottom left", "in the lower left corner"],
    (2, 1): ["at the bottom", "at the bottom center", "in the lower middle"],
    (2, 2): ["in the bottom right corner", "at the bottom right", "in the lower right corner"],
}
RELATION_WORDS = {
    "left": ["to the left of", "left of"], "right": ["to the right of", "right of"],
    "above": ["above", "over"], "below": ["below", "under", "beneath"],
}
TEMPLATES = {
    1: ["{0}", "there is {0}", "an image with {0}", "{0} on a dark background", "this picture shows {0}"],
    2: ["{0} and {1}", "there is {0} and {1}", "an image of {0} and {1}", "{0} with {1}",
        "this picture shows {0} and {1}"],
    3: ["{0}, {1} and {2}", "an image with {0}, {1} and {2}", "there is {0}, {1} and {2}"],
    "relation": ["{0} {rel} {1}", "there is {0} {rel} {1}", "a picture of {0} {rel} {1}"],
}
GRID = 3
SUPERSAMPLE = 2  # shapes are drawn at 2x and downsampled (anti-aliasing)


class DataError(Exception):
    """A problem with the user's data or data config; the message says what and how to fix it."""


# ----------------------------------------------------------------------------------------------
# Preparing / checking data


def prepare_data(data_cfg):
    """Make the dataset usable: generate `shapes` when missing or stale; validate other datasets."""
    dataset = data_cfg["dataset"]
    if dataset == "shapes":
        root = Path(data_cfg["root"])
        params = shapes_params(data_cfg)
        stored = _stored_shapes_params(root)
        if stored is None:
            print(f"generating the shapes dataset into {root} ...", flush=True)
            generate_shapes(root, **params)
        elif stored != _jsonable(params):
            changed = sorted(k for k in set(stored) | set(params) if stored.get(k) != _jsonable(params).get(k))
            print(f"shapes dataset in {root} was generated with other parameters ({', '.join(changed)}): "
                  "regenerating", flush=True)
            generate_shapes(root, **params)
        return
    problems, _ = _inspect_data(data_cfg)
    if problems:
        raise DataError("data not ready:\n  " + "\n  ".join(problems))


def shapes_params(data_cfg):
    """Generator parameters for `shapes`: SHAPES_DEFAULTS overridden by config `data.shapes`."""
    overrides = dict(data_cfg.get("shapes") or {})
    unknown = sorted(set(overrides) - set(SHAPES_DEFAULTS))
    if unknown:
        raise DataError(f"unknown key(s) data.shapes.{', data.shapes.'.join(unknown)}; "
                        f"known: {', '.join(SHAPES_DEFAULTS)}")
    return {**SHAPES_DEFAULTS, **overrides}


def check_data(cfg):
    """Human-readable problems with the data that `cfg` (full config) points at; [] when OK."""
    problems, _ = _inspect_data(cfg["data"])
    return problems


def shapes_caption_ambiguity(json_path, split="test"):
    """Difficulty diagnostic for a generated shapes split: for each caption, how many images of the
    split it truly describes. Returns {'oracle_t2i_r1': mean 1/matches (the best text-to-image R@1
    any model can reach), 'unique': share of captions matching one image, 'captions': count}."""
    content = json.loads(Path(json_path).read_text(encoding="utf-8"))
    images = [entry["objects"] for entry in content["images"] if entry["split"] == split]
    by_type = collections.defaultdict(set)
    for number, objects in enumerate(images):
        for obj in objects:
            by_type[(obj["shape"], obj["colour"])].add(number)
    inverse_matches = []
    for entry in (e for e in content["images"] if e["split"] == split):
        for sentence in entry["sentences"]:
            described = [(entry["objects"][i], set(m)) for i, m in zip(sentence["objects"], sentence["mentioned"])]
            candidates = set.intersection(*(by_type[(o["shape"], o["colour"])] for o, _ in described))
            matches = sum(_caption_fits(described, sentence["relation"], images[c]) for c in candidates)
            inverse_matches.append(1.0 / matches)
    return {"oracle_t2i_r1": sum(inverse_matches) / len(inverse_matches),
            "unique": sum(x == 1.0 for x in inverse_matches) / len(inverse_matches),
            "captions": len(inverse_matches)}


def generate_shapes(root, *, seed=0, num_train=4000, num_val=500, num_test=1000, image_size=64,
                    min_objects=2, max_objects=3, num_shapes=7, num_colours=8,
                    caption_objects_probs=(0.05, 0.65, 0.3), omit_size_prob=0.3, omit_position_prob=0.3,
                    relation_prob=0.25, captions_per_image=5):
    """Write the built-in dataset into `root` (images/*.png + dataset_shapes.json); return the JSON path.

    Byte-identical for the same arguments. Val and test images never show a set of
    (shape, colour) object types that any training image shows.
    """
    params = dict(seed=seed, num_train=num_train, num_val=num_val, num_test=num_test, image_size=image_size,
                  min_objects=min_objects, max_objects=max_objects, num_shapes=num_shapes,
                  num_colours=num_colours, caption_objects_probs=list(caption_objects_probs),
                  omit_size_prob=omit_size_prob, omit_position_prob=omit_position_prob,
                  relation_prob=relation_prob, captions_per_image=captions_per_image)
    _validate_shapes_params(params)
    root = Path(root)
    image_dir = root / "images"
    if image_dir.exists():
        shutil.rmtree(image_dir)
    image_dir.mkdir(parents=True)
    rng = random.Random(seed)
    records, train_type_sets = [], set()
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        for _ in range(count):
            objects = _sample_objects(rng, params)
            type_set = frozenset((o["shape"], o["colour"]) for o in objects)
            while split != "train" and type_set in train_type_sets:
                objects = _sample_objects(rng, params)
                type_set = frozenset((o["shape"], o["colour"]) for o in objects)
            if split == "train":
                train_type_sets.add(type_set)
            imgid = len(records)
            filename = f"shapes_{imgid:05d}.png"
            background = rng.randint(0, 40)
            _render_shapes(objects, image_size, background, rng).save(image_dir / filename, format="PNG")
            sentences = [_caption(objects, subject, rng, params) for subject in
                         _caption_subjects(len(objects), rng, params)]
            for sentence in sentences:
                sentence["tokens"] = tokenize_words(sentence["raw"])
            records.append({"filename": filename, "filepath": "", "split": split, "imgid": imgid,
                            "objects": objects, "sentences": sentences})
    json_path = root / "dataset_shapes.json"
    _write_atomic(json_path, json.dumps({"dataset": "shapes", "generator": _jsonable(
        {**params, "version": SHAPES_GENERATOR_VERSION}), "images": records}, sort_keys=True))
    return json_path


# ----------------------------------------------------------------------------------------------
# Text


def tokenize_words(text):
    """Lower-case words of `text`, split on every non-letter."""
    return re.findall(r"[a-z]+", text.lower())


def build_vocabulary(captions, min_count=1):
    """Specials then words with count >= min_count, sorted by (-count, word)."""
    counts = collections.Counter(word for caption in captions for word in tokenize_words(caption))
    words = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIAL_WORDS),
                   key=lambda w: (-counts[w], w))
    return SPECIAL_WORDS + words


def training_captions(data_cfg):
    """Raw captions of the training split only (COCO: train + restval; precomputed: train_caps.txt)."""
    if data_cfg["dataset"] == "precomputed":
        return _read_caption_file(Path(data_cfg["root"]) / "train_caps.txt")
    records = _split_records(_load_karpathy(data_cfg), "train", _karpathy_path(data_cfg))
    return [caption for record in records for caption in record["captions"]]


def build_text_tokenizer(text_cfg, vocab=None):
    """Tokeniser for config `model.text`: word vocabulary for `gru`, AutoTokenizer for `bert`."""
    kind = text_cfg.get("type", "gru")
    if kind == "gru":
        if not vocab:
            raise DataError("model.text.type=gru needs the word vocabulary: "
                            "build_vocabulary(training_captions(cfg['data'])) or the checkpoint's 'vocab'")
        return WordTokenizer(vocab)
    if kind == "bert":
        name = text_cfg.get("tokenizer") or text_cfg.get("bert")
        if not name:
            raise DataError("model.text.type=bert needs model.text.bert (a local model folder or hub name) "
                            "or model.text.tokenizer (a local tokenizer folder)")
        return BertTextTokenizer(name, max_length=text_cfg.get("max_length"))
    raise DataError(f"unknown model.text.type {kind!r}: use gru or bert")


class WordTokenizer:
    """Word-level tokeniser over a vocabulary list: encode(text) = <start> words <end>."""

    kind = "word"

    def __init__(self, words):
        self.words = list(words)
        if self.words[:len(SPECIAL_WORDS)] != SPECIAL_WORDS:
            raise DataError(f"word vocabulary must start with {SPECIAL_WORDS}; got {self.words[:5]}")
        self.index = {word: i for i, word in enumerate(self.words)}
        self.pad_id, self.start_id, self.end_id, self.unk_id, self.mask_id = range(len(SPECIAL_WORDS))
        self.vocab_size = len(self.words)
        self.special_ids = frozenset(range(len(SPECIAL_WORDS)))  # never dropped nor drawn as random words

    def encode(self, text):
        return [self.start_id] + [self.index.get(w, self.unk_id) for w in tokenize_words(text)] + [self.end_id]

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids if i not in (self.pad_id, self.start_id, self.end_id))


class BertTextTokenizer:
    """transformers AutoTokenizer from a local folder (or a hub name when online)."""

    kind = "bert"

    def __init__(self, name, max_length=None):
        from transformers import AutoTokenizer
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(name))
        except (OSError, ValueError) as error:
            hint = (f"{name} is not a loadable tokenizer folder (needs tokenizer.json or vocab.txt)"
                    if Path(str(name)).exists() else
                    f"cannot load tokenizer {name!r} (no internet or unknown name): point model.text.bert "
                    "(or model.text.tokenizer) at a local copy of the model folder")
            raise DataError(f"{hint} [{type(error).__name__}: {str(error).splitlines()[0][:200]}]") from None
        self.max_length = max_length or min(self.tokenizer.model_max_length, 512)
        self.pad_id = self.tokenizer.pad_token_id
        self.mask_id = self.tokenizer.mask_token_id
        self.vocab_size = len(self.tokenizer)
        self.special_ids = frozenset(self.tokenizer.all_special_ids)
        if self.pad_id is None or self.mask_id is None:
            raise DataError(f"tokenizer {name!r} has no pad or mask token: use a BERT-family tokenizer")

    def encode(self, text):
        return self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"]

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def drop_tokens(ids, prob, rng, mask_id, vocab_size, special_ids):
    """Caption token drop (SPEC 4): each non-special token is dropped with `prob`; of the dropped,
    half become `mask_id`, 10% a random non-special token, the rest are deleted. Specials stay."""
    out = []
    for token in ids:
        draw = rng.random()
        if token in special_ids or draw >= prob:
            out.append(token)
            continue
        share = draw / prob
        if share < DROP_MASK_SHARE:
            out.append(mask_id)
        elif share < DROP_MASK_SHARE + DROP_RANDOM_SHARE:
            out.append(_random_token(rng, vocab_size, special_ids, mask_id))
    return out


# ----------------------------------------------------------------------------------------------
# Datasets, batches, loaders


def build_dataset(cfg, split, tokenizer, train):
    """Dataset of (image or regions, C captions) items for `split` (train/val/test; SCAN: dev/testall)."""
    data_cfg = cfg["data"]
    common = dict(tokenizer=tokenizer, captions_per_image=int(data_cfg["captions_per_image"]), train=train,
                  token_drop=float(data_cfg.get("token_drop", 0.0)), seed=int(cfg.get("run", {}).get("seed", 0)))
    dataset = data_cfg["dataset"]
    if dataset == "precomputed":
        root = Path(data_cfg["root"])
        prefix = PRECOMPUTED_SPLITS.get(split)
        if prefix is None:
            raise DataError(f"unknown split {split!r} for precomputed data: use {', '.join(PRECOMPUTED_SPLITS)}")
        return PrecomputedDataset(root / f"{prefix}_ims.npy", root / f"{prefix}_caps.txt",
                                  region_drop=float(data_cfg.get("region_drop", 0.0)), **common)
    if dataset not in IMAGE_DATASETS:
        raise DataError(f"unknown data.dataset {dataset!r}: use shapes, coco, f30k or precomputed")
    records = _split_records(_load_karpathy(data_cfg), split, _karpathy_path(data_cfg))
    image_dir = _image_dir(data_cfg)
    paths = [image_dir / r["filepath"] / r["filename"] for r in records]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} image file(s) of split {split!r} not found, e.g. {missing[0]} "
                        f"(set data.image_dir; images are read from <image_dir>/<filepath>/<filename>)")
    return ImageCaptionDataset(paths, [r["captions"] for r in records], image_size=int(data_cfg["image_size"]),
                               crop_scale=tuple(data_cfg.get("train_crop_scale", (0.8, 1.0))),
                               hflip=bool(data_cfg.get("hflip", False)), **common)


class ImageCaptionDataset(Dataset):
    """Image files with their captions; item = {'image': (3, S, S), 'captions': C id lists, 'index'}."""

    def __init__(self, paths, captions, tokenizer, captions_per_image, train, token_drop, seed,
                 image_size, crop_scale=(0.8, 1.0), hflip=False):
        self.paths, self.captions = list(paths), [list(c) for c in captions]
        self.tokenizer, self.captions_per_image, self.train = tokenizer, captions_per_image, train
        self.token_drop, self.seed, self.epoch = token_drop, seed, 0
        self.transform = ImageTransform(image_size, train, crop_scale, hflip)

    def __len__(self):
        return len(self.paths)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __getitem__(self, index):
        rng = _item_rng(self.seed, self.epoch, index) if self.train else None
        pixels = self.transform(_open_image(self.paths[index]), rng)  # (3, S, S)
        return {"image": pixels, "index": index,
                "captions": _encode_captions(self.captions[index], self.captions_per_image, self.tokenizer,
                                             rng, self.token_drop)}


class ImageTransform:
    """PIL image -> normalised (3, S, S) tensor. Train: RandomResizedCrop(S, scale) (+ hflip) drawn from
    the item's random.Random (torchvision's algorithm, no global torch RNG); eval: resize + center crop."""

    def __init__(self, image_size, train, crop_scale=(0.8, 1.0), hflip=False, ratio=(3 / 4, 4 / 3)):
        self.image_size, self.train, self.crop_scale = int(image_size), train, tuple(crop_scale)
        self.hflip, self.ratio = hflip, tuple(ratio)

    def __call__(self, image, rng=None):
        from torchvision.transforms import functional
        size = [self.image_size, self.image_size]
        if self.train:
            top, left, height, width = _random_resized_crop_box(image.size, self.crop_scale, self.ratio, rng)
            image = functional.resized_crop(image, top, left, height, width, size, antialias=True)
            if self.hflip and rng.random() < 0.5:
                image = functional.hflip(image)
        else:
            image = functional.center_crop(functional.resize(image, self.image_size, antialias=True), size)
        return functional.normalize(functional.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)


class PrecomputedDataset(Dataset):
    """SCAN region features (memory-mapped) + captions; item = {'regions': (N, F), 'captions', 'index'}."""

    def __init__(self, images_path, captions_path, tokenizer, captions_per_image, train, token_drop, seed,
                 region_drop=0.0):
        self.images_path, self.captions_path = Path(images_path), Path(captions_path)
        self.tokenizer, self.captions_per_image, self.train = tokenizer, captions_per_image, train
        self.token_drop, self.region_drop, self.seed, self.epoch = token_drop, region_drop, seed, 0
        self._features = None
        num_rows, _ = _npy_shape(self.images_path)
        captions = _read_caption_file(self.captions_path)
        self.image_step, per_image = _precomputed_layout(num_rows, len(captions), captions_per_image,
                                                         self.images_path, self.captions_path)
        self.num_images = num_rows // self.image_step
        self.captions = [captions[i * per_image:(i + 1) * per_image] for i in range(self.num_images)]

    def __len__(self):
        return self.num_images

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __getstate__(self):  # never pickle the memory map into worker processes
        return {**self.__dict__, "_features": None}

    def __getitem__(self, index):
        if self._features is None:
            self._features = np.load(self.images_path, mmap_mode="r")
        regions = torch.from_numpy(np.array(self._features[index * self.image_step], dtype=np.float32))  # (N, F)
        rng = _item_rng(self.seed, self.epoch, index) if self.train else None
        if rng is not None and self.region_drop > 0:
            keep = [i for i in range(regions.shape[0]) if rng.random() >= self.region_drop]
            regions = regions[keep or [rng.randrange(regions.shape[0])]]
        return {"regions": regions, "index": index,
                "captions": _encode_captions(self.captions[index], self.captions_per_image, self.tokenizer,
                                             rng, self.token_drop)}


def collate_batch(items, pad_id):
    """Stack B items: images (B,3,H,W) or regions (B,Nmax,F)+region_lengths; tokens (B*C, Lmax) image-major,
    lengths, image_ids, caption_image_ids, and caption_order (indices sorting the captions longest first)."""
    batch = {}
    if "image" in items[0]:
        batch["images"] = torch.stack([item["image"] for item in items])  # (B, 3, H, W)
    else:
        lengths = torch.tensor([item["regions"].shape[0] for item in items], dtype=torch.long)  # (B,)
        regions = items[0]["regions"].new_zeros(len(items), int(lengths.max()), items[0]["regions"].shape[1])
        for row, item in enumerate(items):
            regions[row, :item["regions"].shape[0]] = item["regions"]
        batch["regions"], batch["region_lengths"] = regions, lengths  # (B, Nmax, F), (B,)
    captions = [ids for item in items for ids in item["captions"]]  # B*C, image-major
    lengths = torch.tensor([len(ids) for ids in captions], dtype=torch.long)  # (B*C,)
    tokens = torch.full((len(captions), int(lengths.max())), pad_id, dtype=torch.long)  # (B*C, Lmax)
    for row, ids in enumerate(captions):
        tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    image_ids = torch.tensor([item["index"] for item in items], dtype=torch.long)  # (B,)
    per_image = torch.tensor([len(item["captions"]) for item in items])
    # Captions stay image-major; caption_order sorts them longest first (a GRU packs with it, so
    # it moves to the device with the batch instead of being uploaded at every step).
    batch.update(tokens=tokens, lengths=lengths, image_ids=image_ids,
                 caption_image_ids=image_ids.repeat_interleave(per_image),  # (B*C,)
                 caption_order=lengths.argsort(descending=True, stable=True))  # (B*C,)
    return batch


class ShardedBatchSampler(Sampler):
    """Per epoch one global permutation from (seed, epoch), cut into global batches; rank r gets the
    contiguous slice [r*b, (r+1)*b) of every global batch, b = global_batch_size // world_size."""

    def __init__(self, num_items, global_batch_size, rank=0, world_size=1, seed=0, shuffle=True, drop_last=True):
        if global_batch_size % world_size:
            raise DataError(f"train.batch_size={global_batch_size} (global) must be divisible by the number of "
                            f"processes ({world_size})")
        if not drop_last and world_size > 1:
            raise DataError("ShardedBatchSampler: drop_last=False needs world_size=1 (evaluate on rank 0 only)")
        self.num_items, self.global_batch_size = int(num_items), int(global_batch_size)
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.local_batch_size = global_batch_size // world_size
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self):
        """Batches in a full epoch (ignores start_batch)."""
        if self.drop_last:
            return self.num_items // self.global_batch_size
        return math.ceil(self.num_items / self.global_batch_size)

    def set_epoch(self, epoch, start_batch=0):
        """Epoch to iterate next; `start_batch` skips the first batches (exact resume mid-epoch)."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self):
        return max(self.batches_per_epoch - self.start_batch, 0)

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(_derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_items, generator=generator).tolist()
        else:
            order = list(range(self.num_items))
        lo, hi = self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size
        for batch in range(self.start_batch, self.batches_per_epoch):
            global_batch = order[batch * self.global_batch_size:(batch + 1) * self.global_batch_size]
            yield global_batch[lo:hi]


def build_loader(cfg, split, tokenizer, train, rank=0, world_size=1, batch_size=None):
    """DataLoader over build_dataset(...) with a ShardedBatchSampler (train: shuffle + drop_last)."""
    dataset = build_dataset(cfg, split, tokenizer, train)
    if batch_size is None:
        batch_size = cfg["train"]["batch_size"] if train else cfg["eval"]["batch_size"]
    sampler = ShardedBatchSampler(len(dataset), batch_size, rank=rank, world_size=world_size,
                                  seed=int(cfg.get("run", {}).get("seed", 0)), shuffle=train, drop_last=train)
    if train and len(sampler) == 0:
        raise DataError(f"split {split!r} has {len(dataset)} images, fewer than one batch of {batch_size}: "
                        "lower train.batch_size")
    # A private generator: creating an iterator must not draw from the global torch RNG, or an
    # exact resume (which restores that RNG mid-epoch) would see different dropout masks.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=int(cfg["data"].get("num_workers", 0)),
                      collate_fn=_Collate(tokenizer.pad_id), pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(int(cfg.get("run", {}).get("seed", 0))))


def set_loader_epoch(loader, epoch, start_batch=0):
    """Call before iterating an epoch: sets the sampler's permutation and the dataset's item RNGs."""
    loader.batch_sampler.set_epoch(epoch, start_batch)
    loader.dataset.set_epoch(epoch)


# ----------------------------------------------------------------------------------------------
# Helpers: datasets


class _Collate:
    """Picklable collate_batch with a fixed pad id (for worker processes)."""

    def __init__(self, pad_id):
        self.pad_id = pad_id

    def __call__(self, items):
        return collate_batch(items, self.pad_id)


def _derive_seed(*parts):
    """A 63-bit seed from integers, stable across processes and Python hash seeds."""
    return random.Random(":".join(str(int(p)) for p in parts)).getrandbits(63)


def _item_rng(seed, epoch, index):
    return random.Random(_derive_seed(seed, epoch, index))


def _select_captions(captions, count, rng):
    """C captions: repeat when fewer; first C at eval (rng None), a random C in training."""
    if len(captions) < count:
        return [captions[i % len(captions)] for i in range(count)]
    if rng is None:
        return captions[:count]
    return rng.sample(captions, count)


def _encode_captions(captions, count, tokenizer, rng, token_drop):
    encoded = [tokenizer.encode(text) for text in _select_captions(captions, count, rng)]
    if rng is None or token_drop <= 0:
        return encoded
    return [drop_tokens(ids, token_drop, rng, tokenizer.mask_id, tokenizer.vocab_size, tokenizer.special_ids)
            for ids in encoded]


def _random_token(rng, vocab_size, special_ids, mask_id):
    while True:
        token = rng.randrange(vocab_size)
        if token not in special_ids and token != mask_id:
            return token


def _random_resized_crop_box(image_size, scale, ratio, rng):
    """(top, left, height, width) as torchvision RandomResizedCrop.get_params, drawn from `rng`."""
    width, height = image_size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return rng.randint(0, height - crop_h), rng.randint(0, width - crop_w), crop_h, crop_w
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_w, crop_h = int(round(height * max(ratio))), height
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def _open_image(path):
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image file not found: {path} (check data.image_dir / data.root)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image file {path}: {type(error).__name__}: {error} "
                        "(replace or re-download it)") from None


def _karpathy_path(data_cfg):
    if data_cfg.get("karpathy_json"):
        return Path(data_cfg["karpathy_json"])
    name = KARPATHY_NAMES.get(data_cfg["dataset"], data_cfg["dataset"])
    return Path(data_cfg["root"]) / f"dataset_{name}.json"


def _image_dir(data_cfg):
    return Path(data_cfg["image_dir"]) if data_cfg.get("image_dir") else Path(data_cfg["root"]) / "images"


def _load_karpathy(data_cfg):
    """Validated records [{'filename', 'filepath', 'split', 'captions': [raw, ...]}] of a Karpathy JSON."""
    path = _karpathy_path(data_cfg)
    root = Path(data_cfg["root"])
    if not data_cfg.get("karpathy_json") and not root.is_dir():
        raise DataError(f"data root {root} does not exist: set data.root to the dataset folder")
    if not path.is_file():
        raise DataError(f"Karpathy JSON {path} not found: set data.karpathy_json (or put "
                        f"{path.name} into data.root)")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is not valid JSON ({error}): re-download the Karpathy split file") from None
    if not isinstance(content, dict) or not isinstance(content.get("images"), list):
        raise DataError(f"{path} has no 'images' list: expected the Karpathy layout "
                        '{"images": [{"filename", "filepath", "split", "sentences": [{"raw"}]}]}')
    return [_karpathy_record(entry, number, path) for number, entry in enumerate(content["images"])]


def _karpathy_record(entry, number, path):
    if not isinstance(entry, dict):
        raise DataError(f"{path}: images[{number}] is not an object (expected Karpathy layout)")
    missing = [key for key in ("filename", "split", "sentences") if key not in entry]
    if missing:
        raise DataError(f"{path}: images[{number}] has no key(s) {', '.join(map(repr, missing))} "
                        "(expected Karpathy layout: filename, filepath, split, sentences)")
    captions = []
    for sentence in entry["sentences"] or []:
        if isinstance(sentence, dict) and ("raw" in sentence or "tokens" in sentence):
            captions.append(sentence["raw"] if "raw" in sentence else " ".join(sentence["tokens"]))
        else:
            raise DataError(f"{path}: a sentence of image {entry['filename']!r} has no 'raw' text")
    if not captions:
        raise DataError(f"{path}: image {entry['filename']!r} has no captions (empty 'sentences'): "
                        "remove it or add its captions")
    return {"filename": entry["filename"], "filepath": entry.get("filepath") or "",
            "split": entry["split"], "captions": captions}


def _split_records(records, split, path):
    if split not in KARPATHY_SPLITS:
        raise DataError(f"unknown split {split!r}: use train, val or test")
    chosen = [r for r in records if r["split"] in KARPATHY_SPLITS[split]]
    if not chosen:
        found = sorted({r["split"] for r in records})
        raise DataError(f"split {split!r} has no images in {path} (its splits: {', '.join(found) or 'none'}); "
                        f"expected split values {', '.join(KARPATHY_SPLITS[split])}")
    return chosen


def _read_caption_file(path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"caption file {path} not found: set data.root to the SCAN feature folder")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"caption file {path} is not UTF-8 text ({error})") from None
    return [line.strip() for line in lines if line.strip()]


def _npy_shape(path):
    """(num_rows, shape) of an .npy file from its header only."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"feature file {path} not found: set data.root to the SCAN feature folder")
    try:
        shape = np.load(path, mmap_mode="r").shape
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read feature file {path} as .npy ({error})") from None
    if len(shape) != 3:
        raise DataError(f"feature file {path} has shape {shape}; expected (images, regions, features)")
    return shape[0], shape


def _precomputed_layout(num_rows, num_captions, captions_per_image, images_path, captions_path):
    """(row step, captions per image): equal counts = every image repeated C times (take every C-th)."""
    if num_rows == num_captions and num_rows % captions_per_image == 0:
        return captions_per_image, captions_per_image
    if num_rows and num_captions % num_rows == 0:
        return 1, num_captions // num_rows
    raise DataError(f"feature/caption count mismatch: {images_path} has {num_rows} rows but {captions_path} has "
                    f"{num_captions} captions; expected equal counts (images repeated "
                    f"{captions_per_image}x) or a whole number of captions per image")


def _inspect_data(data_cfg):
    """(problems, {split: image count}) for a data config, without generating anything."""
    dataset = data_cfg["dataset"]
    counts, problems = {}, []
    if dataset == "precomputed":
        for split in ("train", "dev", "test"):
            prefix = PRECOMPUTED_SPLITS[split]
            root = Path(data_cfg["root"])
            try:
                num_rows, _ = _npy_shape(root / f"{prefix}_ims.npy")
                captions = _read_caption_file(root / f"{prefix}_caps.txt")
                step, _ = _precomputed_layout(num_rows, len(captions), int(data_cfg["captions_per_image"]),
                                              root / f"{prefix}_ims.npy", root / f"{prefix}_caps.txt")
                counts[split] = num_rows // step
            except DataError as error:
                problems.append(str(error))
        return problems, counts
    if dataset not in IMAGE_DATASETS:
        return [f"unknown data.dataset {dataset!r}: use shapes, coco, f30k or precomputed"], counts
    if dataset == "shapes" and _stored_shapes_params(Path(data_cfg["root"])) is None:
        return [f"shapes dataset not generated yet in {data_cfg['root']}: "
                "run `python data.py --check CONFIG --prepare` (train.py generates it too)"], counts
    try:
        records = _load_karpathy(data_cfg)
    except DataError as error:
        return [str(error)], counts
    path, image_dir = _karpathy_path(data_cfg), _image_dir(data_cfg)
    for split in ("train", "val", "test"):
        try:
            chosen = _split_records(records, split, path)
        except DataError as error:
            problems.append(str(error))
            continue
        counts[split] = len(chosen)
        missing = [image_dir / r["filepath"] / r["filename"] for r in chosen
                   if not (image_dir / r["filepath"] / r["filename"]).is_file()]
        if missing:
            listed = ", ".join(str(p) for p in missing[:5]) + (" ..." if len(missing) > 5 else "")
            problems.append(f"{len(missing)} image file(s) of split {split!r} missing under {image_dir}: {listed}")
    return problems, counts


# ----------------------------------------------------------------------------------------------
# Helpers: shapes generator


def _stored_shapes_params(root):
    """Generator parameters recorded in <root>/dataset_shapes.json, or None when not generated."""
    path = Path(root) / "dataset_shapes.json"
    if not path.is_file():
        return None
    try:
        stored = dict(json.loads(path.read_text(encoding="utf-8")).get("generator") or {})
    except (ValueError, AttributeError):
        return None
    if stored.pop("version", None) != SHAPES_GENERATOR_VERSION:
        return {}
    return stored


def _jsonable(value):
    return json.loads(json.dumps(value))


def _write_atomic(path, text):
    temp = Path(f"{path}.tmp{os.getpid()}")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def _validate_shapes_params(params):
    if not 1 <= params["min_objects"] <= params["max_objects"] <= GRID * GRID:
        raise DataError(f"data.shapes: need 1 <= min_objects <= max_objects <= {GRID * GRID}")
    if not 1 <= params["num_shapes"] <= len(SHAPE_NAMES) or not 1 <= params["num_colours"] <= len(COLOUR_NAMES):
        raise DataError(f"data.shapes: num_shapes must be in 1..{len(SHAPE_NAMES)}, "
                        f"num_colours in 1..{len(COLOUR_NAMES)}")
    if params["num_shapes"] * params["num_colours"] < params["max_objects"]:
        raise DataError("data.shapes: num_shapes * num_colours must be >= max_objects (object types are distinct)")
    probs = params["caption_objects_probs"]
    if not 1 <= len(probs) <= 3 or any(p < 0 for p in probs) or sum(probs) <= 0:
        raise DataError("data.shapes.caption_objects_probs: 1 to 3 non-negative weights for 1, 2, 3 objects")
    if params["captions_per_image"] < 1:
        raise DataError("data.shapes.captions_per_image must be >= 1")


def _sample_objects(rng, params):
    """2-4 objects with distinct (shape, colour) types in distinct grid cells."""
    count = rng.randint(params["min_objects"], params["max_objects"])
    cells = rng.sample(range(GRID * GRID), count)
    types = rng.sample([(s, c) for s in SHAPE_NAMES[:params["num_shapes"]]
                        for c in COLOUR_NAMES[:params["num_colours"]]], count)
    return [{"shape": shape, "colour": colour, "size": rng.choice(SIZE_NAMES), "row": cell // GRID,
             "col": cell % GRID} for cell, (shape, colour) in zip(cells, types)]


def _render_shapes(objects, image_size, background, rng):
    """PIL image (image_size^2) with the objects drawn at 2x then downsampled."""
    side = image_size * SUPERSAMPLE
    cell = side / GRID
    image = Image.new("RGB", (side, side), (background,) * 3)
    draw = ImageDraw.Draw(image)
    jitter = 0.07 * cell
    for obj in objects:
        cx = (obj["col"] + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (obj["row"] + 0.5) * cell + rng.uniform(-jitter, jitter)
        radius = cell * (0.42 if obj["size"] == "large" else 0.25)
        _draw_shape(draw, obj["shape"], cx, cy, radius, COLOUR_RGB[obj["colour"]])
    return image.resize((image_size, image_size), Image.Resampling.BOX)


def _draw_shape(draw, shape, cx, cy, r, colour):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        h = 0.82 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=colour)
    elif shape == "cross":
        t = 0.33 * r
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=colour)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=colour)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=colour)


def _polygon(shape, cx, cy, r):
    if shape == "triangle":
        radii, start, corners = [r], -90, 3
    elif shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    elif shape == "star":
        radii, start, corners = [r, 0.45 * r], -90, 10
    elif shape == "hexagon":
        radii, start, corners = [r], 0, 6
    else:
        raise ValueError(f"unknown shape {shape}")
    return [(cx + radii[i % len(radii)] * math.cos(math.radians(start + 360 * i / corners)),
             cy + radii[i % len(radii)] * math.sin(math.radians(start + 360 * i / corners)))
            for i in range(corners)]


def _caption_subjects(num_objects, rng, params):
    """Object indices described by each caption: a cycling pointer over a shuffled order, so
    consecutive captions talk about different objects and every object is covered."""
    order = list(range(num_objects))
    rng.shuffle(order)
    probs = params["caption_objects_probs"]
    sizes = [min(rng.choices(range(1, len(probs) + 1), weights=probs)[0], num_objects)
             for _ in range(params["captions_per_image"])]
    if num_objects > 1 and all(size == num_objects for size in sizes):
        sizes[-1] = 1  # never let every caption describe the same (full) set
    subjects, pointer = [], 0
    for size in sizes:
        subjects.append([order[(pointer + j) % num_objects] for j in range(size)])
        pointer += size
    return subjects


def _caption(objects, subject, rng, params):
    """One sentence about objects[subject]: {'raw', 'objects' (indices), 'mentioned' (attribute names per
    described object), 'relation' (None or how the first lies relative to the second: left/right/above/below)}."""
    relation = None
    if len(subject) == 2 and rng.random() < params["relation_prob"]:
        relation = _relation(objects[subject[0]], objects[subject[1]], rng)
    phrases, mentioned = [], []
    for i in subject:
        with_size = rng.random() >= params["omit_size_prob"]
        with_position = relation is None and (len(subject) == 1 or rng.random() >= params["omit_position_prob"])
        phrases.append(_noun_phrase(objects[i], with_size, with_position, rng))
        mentioned.append(["shape", "colour"] + ["size"] * with_size + ["position"] * with_position)
    if relation is not None:
        raw = rng.choice(TEMPLATES["relation"]).format(*phrases, rel=rng.choice(RELATION_WORDS[relation]))
    else:
        raw = rng.choice(TEMPLATES[len(subject)]).format(*phrases)
    return {"raw": raw, "objects": list(subject), "mentioned": mentioned, "relation": relation}


def _caption_fits(described, relation, objects):
    """True when distinct objects of an image match every described (object, mentioned attributes)."""
    def fits(wanted, attributes, obj):
        keys = [k for k in ("shape", "colour", "size") if k in attributes]
        keys += ["row", "col"] if "position" in attributes else []
        return all(obj[k] == wanted[k] for k in keys)

    for chosen in itertools.permutations(objects, len(described)):
        if all(fits(wanted, attributes, obj) for (wanted, attributes), obj in zip(described, chosen)):
            if relation is None or _relation_holds(relation, chosen[0], chosen[1]):
                return True
    return False


def _relation_holds(relation, first, second):
    return {"left": first["col"] < second["col"], "right": first["col"] > second["col"],
            "above": first["row"] < second["row"], "below": first["row"] > second["row"]}[relation]


def _relation(first, second, rng):
    """'left'/'right'/'above'/'below': how `first` lies relative to `second`."""
    options = []
    if first["col"] != second["col"]:
        options.append("left" if first["col"] < second["col"] else "right")
    if first["row"] != second["row"]:
        options.append("above" if first["row"] < second["row"] else "below")
    return rng.choice(options)


def _noun_phrase(obj, with_size, with_position, rng):
    words = ([rng.choice(SIZE_WORDS[obj["size"]])] if with_size else []) + [
        rng.choice(COLOUR_WORDS[obj["colour"]]), rng.choice(SHAPE_WORDS[obj["shape"]])]
    if with_position:
        words.append(rng.choice(POSITION_WORDS[(obj["row"], obj["col"])]))
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article] + words)


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check (or prepare) the data a MaxMatch config points at.")
    parser.add_argument("--check", metavar="CONFIG", help="YAML config to check (merged over config.yaml)")
    parser.add_argument("--prepare", action="store_true", help="generate shapes / validate, then check")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_intermixed_args(argv)
    from train import ConfigError, load_config   # the one config loader (defaults + YAML + overrides)
    try:
        cfg = load_config(args.check, args.overrides)
        if args.prepare:
            prepare_data(cfg["data"])
        problems, counts = _inspect_data(cfg["data"])
    except (ConfigError, DataError) as error:
        print(f"data problem: {error}", file=sys.stderr)
        return 1
    if problems:
        print("data problems:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    val = counts.get("val", counts.get("dev", 0))
    print(f"data OK: {counts.get('train', 0)} train / {val} val / {counts.get('test', 0)} test images")
    return 0


if __name__ == "__main__":
    from data import main as module_main   # one module object, so DataError is the class train.py sees
    sys.exit(module_main())
