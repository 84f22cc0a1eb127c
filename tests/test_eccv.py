"""evaluate.py --eccv: the COCO ids of the loader's items (data.coco_ids)."""
import json
import random

import numpy as np
import pytest
from PIL import Image

import config
import data
from test_train import tiny_overrides, write_precomputed

WORDS = ["red", "blue", "cat", "dog", "sits", "runs", "big", "small", "on", "mat"]


# ----------------------------------------------------------------------------- ids of the loader's items

def karpathy_fixture(root, captions_per_image=3):
    """A Karpathy-layout COCO test split of three images (the last with two captions, so C = 3
    cycles) and a captions file holding their annotations shuffled among another image's, the
    texts differing from Karpathy's in whitespace, case and punctuation."""
    images = [(391895, ["A man on a moped.", "Two  dogs play ", "A red bus", "a red bus"]),
              (60623, ["A cat sits on a mat", "Kids eat cake.", "A plane in the sky"]),
              (483108, ["A man riding a bike", "A clock tower"])]
    annotations = [  # (annotation id, image id, text as COCO has it)
        (11, 391895, "A man on a moped."), (12, 391895, "Two dogs play"), (13, 391895, "A red bus"),
        (14, 391895, "a red bus"), (21, 60623, "a cat sits on a mat!"), (22, 60623, "Kids eat cake.\n"),
        (23, 60623, "A plane in the sky"), (31, 483108, "A man riding a bike"), (32, 483108, "A clock tower."),
        (91, 999, "A man on a moped.")]
    (root / "images" / "val2014").mkdir(parents=True)
    entries = []
    for image_id, texts in images:
        name = f"COCO_val2014_{image_id:012d}.jpg"
        Image.new("RGB", (8, 8)).save(root / "images" / "val2014" / name)
        entries.append({"filename": name, "filepath": "val2014", "split": "test", "cocoid": image_id,
                        "sentences": [{"raw": text} for text in texts]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    random.Random(0).shuffle(annotations)
    write_caption_annotations(root / "annotations" / "captions_val2014.json", annotations)
    cfg = config.load_config(None, ["data.dataset=coco", f"data.root={root}",
                                    f"data.captions_per_image={captions_per_image}"])
    return cfg, [image_id for image_id, _ in images]


def write_caption_annotations(path, annotations):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"annotations": [{"id": a, "image_id": i, "caption": t} for a, i, t in annotations]}))


def eval_dataset(cfg, split="test"):
    tokenizer = data.build_text_tokenizer(cfg["model"]["text"], data.SPECIAL_WORDS)
    return data.build_dataset(cfg, split, tokenizer, train=False)


def test_karpathy_captions_get_their_annotation_ids_in_the_loaders_order(tmp_path):
    cfg, image_ids = karpathy_fixture(tmp_path)
    found, captions, source = data.coco_ids(cfg["data"], "test", eval_dataset(cfg))
    assert found == image_ids
    # the first 3 captions of each image, the two-caption image cycling; "Two  dogs play " differs in
    # whitespace, "A cat sits on a mat" and "A clock tower" in case and punctuation; "A red bus" and
    # "a red bus" are two annotations: each takes its own
    assert captions == [11, 12, 13, 21, 22, 23, 31, 32, 31]
    assert "cocoid of dataset_coco.json" in source and "captions_val2014.json" in source


def test_equal_texts_of_one_image_take_its_annotations_in_order():
    annotations = [(5, "a dog"), (6, "a dog"), (7, "A cat.")]
    assert data._match_image_captions(["a dog", "a  dog", "a cat"], annotations) == [5, 6, 7]


def test_two_differing_texts_for_two_annotations_equal_up_to_case_are_not_guessed():
    annotations = [(5, "A dog."), (6, "a dog!")]
    assert data._match_image_captions(["A DOG", "a Dog?"], annotations) == [None, None]
    assert data._match_image_captions(["A DOG"], annotations[:1]) == [5]


def test_a_caption_without_its_annotation_is_one_error_with_the_count_and_the_file(tmp_path):
    cfg, _ = karpathy_fixture(tmp_path)
    dataset = eval_dataset(cfg)
    dataset.captions[1][0] = "A dog on a sofa"                    # no annotation of image 60623 says this
    with pytest.raises(data.DataError) as error:
        data.coco_ids(cfg["data"], "test", dataset)
    message = str(error.value)
    assert "1 of the 9 evaluated captions have no annotation" in message and "captions_val2014.json" in message
    assert "0 of their images have none at all" in message and "data.coco_captions" in message


def test_captions_the_loader_does_not_take_need_no_annotation(tmp_path):
    cfg, _ = karpathy_fixture(tmp_path)
    dataset = eval_dataset(cfg)
    dataset.captions[0][3] = "not in the annotations"             # the 4th caption of an image, C = 3
    assert data.coco_ids(cfg["data"], "test", dataset)[1] == [11, 12, 13, 21, 22, 23, 31, 32, 31]


def test_a_missing_captions_file_names_it_and_the_key(tmp_path):
    cfg, _ = karpathy_fixture(tmp_path)
    cfg = config.apply_overrides(cfg, [f"data.coco_captions={tmp_path / 'nowhere.json'}"])
    with pytest.raises(data.DataError, match=r"COCO captions file .*nowhere.json not found: set data.coco_captions"):
        data.coco_ids(cfg["data"], "test", eval_dataset(cfg))


def test_several_captions_files_are_read_together(tmp_path):
    cfg, _ = karpathy_fixture(tmp_path)
    annotations = json.loads((tmp_path / "annotations" / "captions_val2014.json").read_text())["annotations"]
    write_caption_annotations(tmp_path / "a.json", [(a["id"], a["image_id"], a["caption"])
                                                    for a in annotations if a["image_id"] != 483108])
    write_caption_annotations(tmp_path / "b.json", [(a["id"], a["image_id"], a["caption"])
                                                    for a in annotations if a["image_id"] == 483108])
    cfg = config.apply_overrides(cfg, [f"data.coco_captions=[{tmp_path / 'a.json'}, {tmp_path / 'b.json'}]"])
    assert data.coco_ids(cfg["data"], "test", eval_dataset(cfg))[1] == [11, 12, 13, 21, 22, 23, 31, 32, 31]


def test_a_karpathy_json_without_cocoid_is_refused(tmp_path):
    cfg, _ = karpathy_fixture(tmp_path)
    content = json.loads((tmp_path / "dataset_coco.json").read_text())
    del content["images"][1]["cocoid"]
    (tmp_path / "dataset_coco.json").write_text(json.dumps(content))
    with pytest.raises(data.DataError, match="1 images of split 'test' have no integer 'cocoid'"):
        data.coco_ids(cfg["data"], "test", eval_dataset(cfg))


def precomputed_fixture(root, image_ids, caption_ids, texts, prefix="testall", per_row_ids=True, capids=True,
                        seed=0):
    """A SCAN-layout split {prefix}_ims.npy (N, 2, 12) with {prefix}_caps.txt, 5 captions per image,
    and the id files of the VSE-infinity release: {prefix}_ids.txt (an image id per caption row, or
    per image) and {prefix}_capids.txt. train / dev / test come from write_precomputed."""
    if not (root / "train_caps.txt").exists():
        write_precomputed(root)
    rng = np.random.default_rng(seed)
    np.save(root / f"{prefix}_ims.npy", rng.standard_normal((len(image_ids), 2, 12)).astype(np.float32))
    (root / f"{prefix}_caps.txt").write_text("".join(f"{text}\n" for text in texts))
    rows = [i for i in image_ids for _ in range(5)] if per_row_ids else image_ids
    (root / f"{prefix}_ids.txt").write_text("".join(f"{i}\n" for i in rows))
    if capids:
        (root / f"{prefix}_capids.txt").write_text("".join(f"{c}\n" for c in caption_ids))


def precomputed_cfg(tmp_path, *extra):
    return config.load_config(None, tiny_overrides(tmp_path, dataset="precomputed")
                              + ["data.test_split=testall", *extra])


@pytest.mark.parametrize("per_row_ids", [True, False], ids=["id_per_caption_row", "id_per_image"])
def test_precomputed_ids_files_give_the_ids_row_by_row(tmp_path, per_row_ids):
    image_ids, caption_ids = [7, 3, 5], list(range(100, 115))
    precomputed_fixture(tmp_path / "precomp", image_ids, caption_ids, ["a dog"] * 15, per_row_ids=per_row_ids)
    cfg = precomputed_cfg(tmp_path)
    assert data.coco_ids(cfg["data"], "testall", eval_dataset(cfg, "testall"))[:2] == (image_ids, caption_ids)
    # C = 3 of the 5 rows of each image: its first three; C = 7 cycles through them
    cfg = precomputed_cfg(tmp_path, "data.captions_per_image=3")
    assert data.coco_ids(cfg["data"], "testall", eval_dataset(cfg, "testall"))[1] == [100, 101, 102, 105, 106, 107,
                                                                                   110, 111, 112]
    cfg = precomputed_cfg(tmp_path, "data.captions_per_image=7")
    assert data.coco_ids(cfg["data"], "testall", eval_dataset(cfg, "testall"))[1][:7] == [100, 101, 102, 103, 104,
                                                                                       100, 101]


def test_precomputed_without_capids_matches_the_captions_by_text(tmp_path):
    texts = [f"{word} number {i}" for i, word in enumerate(WORDS[:10])]
    precomputed_fixture(tmp_path / "precomp", [7, 3], None, texts, capids=False)
    annotations = [(500 + i, 7 if i < 5 else 3, text.upper() + ".") for i, text in enumerate(texts)]
    write_caption_annotations(tmp_path / "captions.json", annotations[::-1])
    cfg = precomputed_cfg(tmp_path, f"data.coco_captions={tmp_path / 'captions.json'}")
    image_ids, caption_ids, source = data.coco_ids(cfg["data"], "testall", eval_dataset(cfg, "testall"))
    assert (image_ids, caption_ids) == ([7, 3], list(range(500, 510)))
    assert "testall_ids.txt" in source and "captions matched by text in" in source


@pytest.mark.parametrize("broken, message", [
    ("no_ids", r"testall_ids.txt not found: --eccv on precomputed features needs the COCO image id of every "
               r"caption row"),
    ("capids_count", r"testall_capids.txt has 14 ids for the 15 caption rows"),
    ("mixed_ids", r"the caption rows of 1 images carry different image ids"),
    ("not_integers", r"testall_ids.txt is not a list of integer ids"),
])
def test_broken_precomputed_id_files_are_one_error_naming_the_file(tmp_path, broken, message):
    root = tmp_path / "precomp"
    precomputed_fixture(root, [7, 3, 5], list(range(100, 115)), ["a dog"] * 15)
    rows = (root / "testall_ids.txt").read_text().split()
    if broken == "no_ids":
        (root / "testall_ids.txt").unlink()
    elif broken == "capids_count":
        (root / "testall_capids.txt").write_text("\n".join(map(str, range(100, 114))))
    elif broken == "mixed_ids":
        (root / "testall_ids.txt").write_text("\n".join(rows[:6] + ["8"] + rows[7:]))
    else:
        (root / "testall_ids.txt").write_text("\n".join(rows[:-1] + ["five"]))
    cfg = precomputed_cfg(tmp_path)
    with pytest.raises(data.DataError, match=message):
        data.coco_ids(cfg["data"], "testall", eval_dataset(cfg, "testall"))
