"""The built-in `shapes` dataset (METHOD.md §6): coloured shapes on a dark background, captioned.

Generated deterministically from a seed into `<root>/images/*.png` + `<root>/dataset_shapes.json`
(Karpathy layout), so data.py reads it like COCO. Each image holds `min_objects`..`max_objects`
coloured shapes on a 3x3 grid; each of its captions describes a subset of them (shape, colour,
optionally size and position, or a left/above relation between two). Val and test images never
show a set of object types that a training image shows.

The generator's parameters are the `data.shapes` section of config.yaml; the keyword defaults of
`generate_shapes` equal it (tests/test_config.py checks), for callers who use this file alone.
Imports no other file of this repository.
"""
import collections
import contextlib
import inspect
import json
import math
import os
import random
import re
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES_GENERATOR_VERSION = 1
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


def shapes_defaults():
    """{parameter: default} of generate_shapes: config.yaml's `data.shapes` section."""
    return {name: parameter.default for name, parameter in inspect.signature(generate_shapes).parameters.items()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY}


def ensure_shapes(root, params):
    """Generate the dataset into `root` unless it is there with exactly these generator parameters.

    Processes started together on a fresh folder take turns (a lock file in `root`, where the OS has
    `fcntl`): the first generates, the others wait and find the data done."""
    root, params = Path(root), {**shapes_defaults(), **params}     # a partial dict means the defaults
    wanted = _jsonable(params)                    # as stored in the dataset's JSON
    if stored_shapes_params(root) == wanted:
        return
    root.mkdir(parents=True, exist_ok=True)
    with _generation_lock(root):
        stored = stored_shapes_params(root)       # read again: another process may have just finished
        if stored is None:
            print(f"generating the shapes dataset into {root} ...", flush=True)
            generate_shapes(root, **params)
        elif stored != wanted:
            changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
            print(f"shapes dataset in {root} was generated with other parameters ({', '.join(changed)}): "
                  "regenerating", flush=True)
            generate_shapes(root, **params)


def stored_shapes_params(root):
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


def shapes_relation(json_path, split="test", captions_per_image=None):
    """The complete image-caption relation of a generated split: which images every caption fits.

    A caption fits an image when distinct objects of the image match every object the caption
    describes, in the attributes the caption mentions (shape and colour always; size and grid cell
    when worded), and its stated left/right/above/below relation holds between the first two.
    Its own image always fits. Captions are taken as the evaluation loader takes them (data.py):
    the first `captions_per_image` of each image, cycled when an image has fewer; None = all.

    Returns {"filenames": the split's image files in file order, "caption_to_image": the index of
    every caption's own image, "caption_images": for every caption the sorted indices of the images
    it fits, "image_captions": for every image the sorted indices of the captions that fit it}.
    Candidates are indexed by object type, so 1,000 x 5,000 takes well under a second.
    """
    content = json.loads(Path(json_path).read_text(encoding="utf-8"))
    entries = [entry for entry in content["images"] if entry["split"] == split]
    # An image's objects have distinct (shape, colour) types and every described object names both,
    # so each described object can only be the image's object of its type: no assignment to search.
    images = [{(obj["shape"], obj["colour"]): obj for obj in entry["objects"]} for entry in entries]
    by_type = collections.defaultdict(set)
    for number, objects in enumerate(images):
        for object_type in objects:
            by_type[object_type].add(number)
    caption_to_image, caption_images = [], []
    image_captions = [[] for _ in images]
    for number, entry in enumerate(entries):
        sentences = entry["sentences"]
        count = len(sentences) if captions_per_image is None else captions_per_image
        for position in range(count):
            sentence = sentences[position % len(sentences)]
            described = [(entry["objects"][i], set(m)) for i, m in zip(sentence["objects"], sentence["mentioned"])]
            candidates = set.intersection(*(by_type[(o["shape"], o["colour"])] for o, _ in described))
            fitting = sorted(c for c in candidates if _caption_fits(described, sentence["relation"], images[c]))
            for image in fitting:
                image_captions[image].append(len(caption_images))
            caption_to_image.append(number)
            caption_images.append(fitting)
    return {"filenames": [entry["filename"] for entry in entries], "caption_to_image": caption_to_image,
            "caption_images": caption_images, "image_captions": image_captions}


def shapes_caption_ambiguity(json_path, split="test"):
    """Difficulty diagnostic for a generated shapes split: for each caption, how many images of the
    split it truly describes (`shapes_relation`). Returns {'oracle_t2i_r1': mean 1/matches (the best
    text-to-image R@1 any model can reach), 'unique': share of captions matching one image, 'captions': count}."""
    inverse_matches = [1.0 / len(fitting) for fitting in shapes_relation(json_path, split)["caption_images"]]
    return {"oracle_t2i_r1": sum(inverse_matches) / len(inverse_matches),
            "unique": sum(x == 1.0 for x in inverse_matches) / len(inverse_matches),
            "captions": len(inverse_matches)}


def tokenize_words(text):
    """Lower-case words of `text`, split on every non-letter."""
    return re.findall(r"[a-z]+", text.lower())


# ----------------------------------------------------------------------------------------------
# Helpers


def _jsonable(value):
    return json.loads(json.dumps(value))


@contextlib.contextmanager
def _generation_lock(root):
    """An exclusive lock on <root>/.generating.lock for the duration of the block. Unlocked, as before
    locks existed, where the OS has no fcntl (Windows) or the file system refuses flock (some NFS,
    Lustre and FUSE mounts): start one process first there."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(Path(root) / ".generating.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
    """True when the image's objects of the described types ({type: object}, types distinct) match every
    described (object, mentioned attributes) and the stated relation holds between the first two."""
    chosen = []
    for wanted, attributes in described:
        obj = objects.get((wanted["shape"], wanted["colour"]))
        if obj is None or ("size" in attributes and obj["size"] != wanted["size"]) or (
                "position" in attributes and (obj["row"], obj["col"]) != (wanted["row"], wanted["col"])):
            return False
        chosen.append(obj)
    return relation is None or _relation_holds(relation, chosen[0], chosen[1])


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
