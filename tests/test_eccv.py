"""evaluate.py --eccv: MS-COCO scored by the optional eccv_caption package (ECCV Caption mAP@R /
R-Precision / R@1, CxC and COCO 1K / 5K R@K). The COCO ids of the loader's items (data.coco_ids),
the one-line errors, our metrics against the package's functions, the cut ranked lists against
whole rankings (ties included), and the CLI on the package's real ids. The tests that need the
package skip without it (pip install eccv-caption)."""
import contextlib
import importlib.util
import io
import json
import random
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import config
import data
import evaluate
import train
from evaluate import (complete_positive_metrics, eccv_results, five_fold_metrics, retrieval_metrics,
                      score_matrix)
from model import build_model, load_checkpoint
from test_train import run_cli, tiny_overrides, write_precomputed

needs_package = pytest.mark.skipif(importlib.util.find_spec("eccv_caption") is None,
                                   reason="eccv_caption is not installed (optional: pip install eccv-caption)")
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


# ----------------------------------------------------------------------------- command-line errors

def tiny_checkpoint(tmp_path, dataset="precomputed", seed=0, extra=()):
    """A freshly initialised tiny model (no training) saved as a checkpoint of `dataset`."""
    cfg = config.load_config(None, tiny_overrides(tmp_path, dataset=dataset) + list(extra))
    vocab = train.make_vocabulary(cfg) if dataset == "precomputed" else data.SPECIAL_WORDS + WORDS
    torch.manual_seed(seed)
    path = tmp_path / f"model{seed}.pt"
    torch.save({"model": build_model(cfg, vocab).state_dict(), "config": cfg, "vocab": vocab, "epoch": 0}, path)
    return str(path)


def run_eccv(capsys, *args):
    """evaluate.main with --eccv: (exit code, stdout, stderr)."""
    code = evaluate.main([*args, "--eccv"])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code, err, message):
    assert code == 2, err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_a_checkpoint_that_is_not_coco_is_one_line_before_any_loading(tmp_path, capsys):
    code, _, err = run_eccv(capsys, "--ckpt", tiny_checkpoint(tmp_path, dataset="shapes"))
    assert_one_error_line(code, err, "--eccv scores MS-COCO's 5K test split, and checkpoint")
    assert "data.dataset=shapes" in err and not (tmp_path / "shapes").exists()


def tiny_split_with_ids(tmp_path):
    """The 32-image test split of write_precomputed with id files (invented ids: not the package's)."""
    root = tmp_path / "precomp"
    write_precomputed(root)
    (root / "test_ids.txt").write_text("".join(f"{9000000 + i // 5}\n" for i in range(160)))
    (root / "test_capids.txt").write_text("".join(f"{9100000 + i}\n" for i in range(160)))
    return tiny_checkpoint(tmp_path)


def test_a_split_that_is_not_the_5k_test_split_is_one_line(tmp_path, capsys):
    code, _, err = run_eccv(capsys, "--ckpt", tiny_split_with_ids(tmp_path))
    assert_one_error_line(code, err, "--eccv needs MS-COCO's 5K test split, 5,000 images with 5 captions each: "
                                     "split 'test' has 32 images and 160 captions")
    assert "--split testall" in err


def test_a_missing_package_is_one_line_with_the_install_command(tmp_path, capsys, monkeypatch):
    path = tiny_split_with_ids(tmp_path)
    monkeypatch.setattr(evaluate, "COCO_TEST_IMAGES", 32)        # the tiny split stands in for the 5K split
    monkeypatch.setattr(evaluate, "COCO_TEST_CAPTIONS", 160)
    monkeypatch.setitem(sys.modules, "eccv_caption", None)       # as if it were not installed
    code, _, err = run_eccv(capsys, "--ckpt", path)
    assert_one_error_line(code, err, "--eccv needs the optional eccv_caption package: pip install eccv-caption")


@needs_package
def test_ids_that_are_not_the_packages_test_split_are_one_line(tmp_path, capsys, monkeypatch):
    path = tiny_split_with_ids(tmp_path)
    monkeypatch.setattr(evaluate, "COCO_TEST_IMAGES", 32)
    monkeypatch.setattr(evaluate, "COCO_TEST_CAPTIONS", 160)
    code, _, err = run_eccv(capsys, "--ckpt", path)
    assert_one_error_line(code, err, "split 'test' has 32 images and 160 captions (ids from test_ids.txt and "
                                     "test_capids.txt in ")
    assert "; 0 of its images and 0 of its captions are the package's (coco: --split test" in err


def test_missing_or_unmatched_caption_annotations_are_one_line(tmp_path, capsys):
    path = tiny_split_with_ids(tmp_path)
    (tmp_path / "precomp" / "test_capids.txt").unlink()          # caption ids must come from the captions file
    code, _, err = run_eccv(capsys, "--ckpt", path)
    assert_one_error_line(code, err, "annotations/captions_val2014.json not found: set data.coco_captions")
    write_caption_annotations(tmp_path / "captions.json", [(1, 9000000, "a caption of another image")])
    code, _, err = run_eccv(capsys, "--ckpt", path, f"data.coco_captions={tmp_path / 'captions.json'}")
    assert_one_error_line(code, err, "160 of the 160 evaluated captions have no annotation of their image "
                                     "with their text in")
    assert "(31 of their images have none at all" in err


def test_the_command_line_prints_one_line_not_a_traceback(tmp_path):
    path = tiny_split_with_ids(tmp_path)
    (tmp_path / "precomp" / "test_ids.txt").unlink()
    result = run_cli(["evaluate.py", "--ckpt", path, "--eccv"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "test_ids.txt not found" in result.stderr


# ----------------------------------------------------------------------------- against the package

def small_benchmark(num_images=50, seed=0):
    """The package's Metrics with its ground truths replaced by a small invented test split: 50
    images of 5 captions (five folds of 10), CxC = COCO plus extra pairs, ECCV Caption for 30 images
    and 100 captions with several positives each (their own among them, as in the package's data)."""
    rng = random.Random(seed)
    metrics = evaluate.eccv_benchmark()
    image_ids = rng.sample(range(1, 600000), num_images)
    caption_ids = rng.sample(range(1, 900000), 5 * num_images)
    captions_of = {image: caption_ids[5 * i:5 * i + 5] for i, image in enumerate(image_ids)}
    owner = {caption: image for image, captions in captions_of.items() for caption in captions}
    metrics.coco_ids = np.array(caption_ids)
    metrics.coco_gts = {"i2t": {i: list(c) for i, c in captions_of.items()}, "t2i": {c: [i] for c, i in owner.items()}}
    cxc_i2t = {i: c + rng.sample(caption_ids, rng.randint(0, 3)) for i, c in captions_of.items()}
    cxc_t2i = {c: [i] + rng.sample(image_ids, rng.randint(0, 2)) for c, i in owner.items()}
    metrics.cxc_gts = {"i2t": {i: sorted(set(c)) for i, c in cxc_i2t.items()},
                       "t2i": {c: sorted(set(i)) for c, i in cxc_t2i.items()}}
    eccv_i2t = {i: sorted(set(captions_of[i] + rng.sample(caption_ids, rng.randint(1, 20))))
                for i in rng.sample(image_ids, 30)}
    eccv_t2i = {c: sorted(set([owner[c]] + rng.sample(image_ids, rng.randint(1, 12))))
                for c in rng.sample(caption_ids, 100)}
    metrics.eccv_gts = {"i2t": eccv_i2t, "t2i": eccv_t2i}
    return metrics, image_ids, captions_of


def whole_rankings(scores, image_ids, caption_ids, gts):
    """Every query's WHOLE ranking of gallery ids: score descending, a positive of `gts` after a
    tied non-positive, then by our index (plain sorted(), the tie rule of retrieval_metrics)."""
    rows = scores.tolist()
    i2t, t2i = {}, {}
    for r, image in enumerate(image_ids):
        positive = set(gts["i2t"].get(image, ()))
        order = sorted(range(len(caption_ids)), key=lambda c: (-rows[r][c], caption_ids[c] in positive, c))
        i2t[image] = [caption_ids[c] for c in order]
    for c, caption in enumerate(caption_ids):
        positive = set(gts["t2i"].get(caption, ()))
        order = sorted(range(len(image_ids)), key=lambda r: (-rows[r][c], image_ids[r] in positive, r))
        t2i[caption] = [image_ids[r] for r in order]
    return {"i2t": i2t, "t2i": t2i}


def package_on_whole_rankings(benchmark, scores, image_ids, caption_ids):
    """The package's numbers (percent) from whole rankings, each benchmark ranked against its positives."""
    coco, cxc, eccv = (whole_rankings(scores, image_ids, caption_ids, gts)
                       for gts in (benchmark.coco_gts, benchmark.cxc_gts, benchmark.eccv_gts))
    with contextlib.redirect_stderr(io.StringIO()):
        found = benchmark.eccv_metrics(eccv, "all")
        expected = {"eccv_caption": {d: {"map_at_r": 100 * found["eccv_map_at_r"][d],
                                         "r_precision": 100 * found["eccv_rprecision"][d],
                                         "r1": 100 * found["eccv_r1"][d]} for d in ("i2t", "t2i")}}
        for name, method, ranked in (("cxc", benchmark.cxc_recalls, cxc), ("coco_5k", benchmark.coco_5k_recalls, coco),
                                     ("coco_1k", benchmark.coco_1k_recalls, coco)):
            expected[name] = {f"{d}_r{k}": 100 * method(ranked, "all", K=k)[d]
                              for d in ("i2t", "t2i") for k in (1, 5, 10)}
    return expected


def assert_block_matches(block, expected):
    for name, metrics in expected.items():
        for key, value in metrics.items():
            if isinstance(value, dict):
                for metric, number in value.items():
                    assert block[name][key][metric] == pytest.approx(number, abs=1e-9), (name, key, metric)
            else:
                assert block[name][key] == pytest.approx(value, abs=1e-9), (name, key)


def loader_order(image_ids, captions_of, shuffled, seed=1):
    """Image and caption ids as a loader would hold them: the package's order, or images and each
    image's captions shuffled."""
    rng = random.Random(seed)
    images = list(image_ids)
    if shuffled:
        rng.shuffle(images)
    captions = []
    for image in images:
        own = list(captions_of[image])
        if shuffled:
            rng.shuffle(own)
        captions += own
    return images, captions


@needs_package
@pytest.mark.parametrize("ties", [False, True], ids=["tie_free", "planted_ties"])
@pytest.mark.parametrize("shuffled", [False, True], ids=["package_order", "shuffled"])
def test_cut_lists_give_the_packages_numbers_on_whole_rankings(monkeypatch, ties, shuffled):
    """eccv_results hands the package each query's first items only; on every metric it computes
    that gives what the whole ranking gives, ties against each benchmark's positives included."""
    monkeypatch.setattr(evaluate, "COCO_FOLD_IMAGES", 10)
    benchmark, image_ids, captions_of = small_benchmark()
    images, captions = loader_order(image_ids, captions_of, shuffled)
    generator = torch.Generator().manual_seed(int(ties) + 2 * int(shuffled))
    scores = torch.randn(50, 250, generator=generator, dtype=torch.float64)
    if ties:
        scores = (scores * 1.5).round()                              # about six distinct values: ties everywhere
    owners = torch.arange(50).repeat_interleave(5)
    block = eccv_results(scores, owners, (images, captions, "fixture"), benchmark)
    assert_block_matches(block, package_on_whole_rankings(benchmark, scores, images, captions))
    assert block["coco_1k_folds_as_ours"] is (not shuffled)


@needs_package
def test_complete_positive_metrics_equal_the_packages_eccv_metrics_on_tie_free_rankings():
    """Our mAP@R, R-Precision and R@1 against every positive are the package's eccv_metrics
    (its _metrics.compute_eccv_metrics) given the same whole rankings and positive sets."""
    benchmark, image_ids, captions_of = small_benchmark(seed=3)
    caption_ids = [c for image in image_ids for c in captions_of[image]]
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(50, 250, generator=generator, dtype=torch.float64)
    positives = torch.rand(50, 250, generator=generator) < 0.08
    positives[torch.arange(250) // 5, torch.arange(250)] = True       # every query has one: its own
    benchmark.eccv_gts = {"i2t": {image_ids[i]: [caption_ids[c] for c in row.nonzero().squeeze(1).tolist()]
                                  for i, row in enumerate(positives)},
                          "t2i": {caption_ids[c]: [image_ids[i] for i in column.nonzero().squeeze(1).tolist()]
                                  for c, column in enumerate(positives.t())}}
    ranked = whole_rankings(scores, image_ids, caption_ids, benchmark.eccv_gts)
    with contextlib.redirect_stderr(io.StringIO()):
        package = benchmark.eccv_metrics(ranked, "all")
    ours = complete_positive_metrics(scores, positives)
    for direction in ("i2t", "t2i"):       # ours divides in float32: 1e-6 (one query moves them by 0.4 or more)
        assert ours[direction]["map_at_r"] == pytest.approx(100 * package["eccv_map_at_r"][direction], abs=1e-6)
        assert ours[direction]["r_precision"] == pytest.approx(100 * package["eccv_rprecision"][direction], abs=1e-6)
        assert ours[direction]["r1"] == pytest.approx(100 * package["eccv_r1"][direction], abs=1e-9)


@needs_package
def test_our_coco_recalls_equal_the_packages_where_the_folds_agree(monkeypatch):
    """5K: ours equal the package's whatever the image order. 1K: equal when our five blocks of
    images are its folds, and not in general otherwise (other sub-galleries)."""
    monkeypatch.setattr(evaluate, "COCO_FOLD_IMAGES", 10)
    benchmark, image_ids, captions_of = small_benchmark(seed=4)
    owners = torch.arange(50).repeat_interleave(5)
    generator = torch.Generator().manual_seed(4)
    scores = torch.randn(50, 250, generator=generator, dtype=torch.float64)
    scores[owners, torch.arange(250)] += 1.0
    for shuffled in (False, True):
        images, captions = loader_order(image_ids, captions_of, shuffled)
        package = package_on_whole_rankings(benchmark, scores, images, captions)
        ours_5k, ours_1k = retrieval_metrics(scores, owners), five_fold_metrics(scores, owners, fold_size=10)
        for key in evaluate.RECALL_KEYS:
            assert ours_5k[key] == pytest.approx(package["coco_5k"][key], abs=1e-9)
        same_1k = all(ours_1k[key] == pytest.approx(package["coco_1k"][key], abs=1e-9) for key in evaluate.RECALL_KEYS)
        assert same_1k is (not shuffled)


def small_coco_split(tmp_path, monkeypatch, benchmark, image_ids, captions_of):
    """A precomputed 50-image split carrying the small benchmark's ids (shuffled against its order),
    and evaluate.py set up to take it for the 5K test split and the benchmark for the package's."""
    images, captions = loader_order(image_ids, captions_of, shuffled=True)
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(3, 7))) for _ in captions]
    precomputed_fixture(tmp_path / "precomp", images, captions, texts)
    monkeypatch.setattr(evaluate, "COCO_TEST_IMAGES", 50)
    monkeypatch.setattr(evaluate, "COCO_TEST_CAPTIONS", 250)
    monkeypatch.setattr(evaluate, "COCO_FOLD_IMAGES", 10)
    monkeypatch.setattr(evaluate, "eccv_benchmark", lambda: benchmark)
    return images, captions


def full_scores(path, split="testall"):
    """A checkpoint's full score matrix of a split, computed here from its encoded sets."""
    checkpoint = load_checkpoint(path)
    cfg = config.checkpoint_config(checkpoint, path)
    model, loader, device = evaluate.build_eval_context(cfg, checkpoint, split)
    image_sets, _, caption_sets, _, _ = evaluate.encode_split(model, loader, device)
    return score_matrix(image_sets, caption_sets, method=cfg["loss"]["similarity"])


@needs_package
def test_the_eccv_flag_scores_the_full_matrix_of_one_model_and_of_an_ensemble(tmp_path, capsys, monkeypatch):
    """The CLI end to end on a small split: each model's block and the ensemble's equal the package
    on whole rankings of the full score matrices (never rank_preserving_scores' bounds)."""
    benchmark, image_ids, captions_of = small_benchmark(seed=5)
    images, captions = small_coco_split(tmp_path, monkeypatch, benchmark, image_ids, captions_of)
    first = tiny_checkpoint(tmp_path, seed=0, extra=["data.test_split=testall"])
    second = tiny_checkpoint(tmp_path, seed=1, extra=["data.test_split=testall"])
    out = tmp_path / "single.json"
    code, printed, err = run_eccv(capsys, "--ckpt", first, "--out", str(out))
    assert code == 0, err
    single = json.loads(out.read_text())
    matrices = [full_scores(first), full_scores(second)]
    assert_block_matches(single["eccv"], package_on_whole_rankings(benchmark, matrices[0], images, captions))
    assert single["eccv"]["ids"].startswith("testall_ids.txt and testall_capids.txt in ")
    assert "ECCV Caption, CxC and COCO by eccv_caption" in printed and "PMRP not computed" in printed
    for name in ("CxC", "COCO 5K", "COCO 1K"):
        assert any(line.startswith(name) for line in printed.splitlines()), name
    out = tmp_path / "ensemble.json"
    code, printed, err = run_eccv(capsys, "--ckpt", first, second, "--out", str(out))
    assert code == 0, err
    ensemble = json.loads(out.read_text())
    assert ensemble["models"][0]["eccv"] == single["eccv"]
    assert_block_matches(ensemble["models"][1]["eccv"],
                         package_on_whole_rankings(benchmark, matrices[1], images, captions))
    assert_block_matches(ensemble["ensemble"]["eccv"],
                         package_on_whole_rankings(benchmark, (matrices[0] + matrices[1]) / 2, images, captions))
    assert printed.count("ECCV Caption, CxC and COCO by") == 3


def real_test_split():
    """The package's own 5K test split: its caption ids in order, the image of each, and the image order."""
    benchmark = evaluate.eccv_benchmark()
    caption_ids = [int(c) for c in benchmark.coco_ids]
    image_of = {c: benchmark.coco_gts["t2i"][c][0] for c in caption_ids}
    image_ids = list(dict.fromkeys(image_of[c] for c in caption_ids))
    captions_of = {image: [] for image in image_ids}
    for caption in caption_ids:
        captions_of[image_of[caption]].append(caption)
    return benchmark, image_ids, captions_of


def topk_lists(scores, image_ids, caption_ids, folds):
    """The lists a user of the package would build on tie-free scores: each query's top 50 and, for
    COCO 1K, its top 10 within each fold, merged by score (PCME++ hands it top-k lists likewise)."""
    image_row = {image: r for r, image in enumerate(image_ids)}
    caption_column = {caption: c for c, caption in enumerate(caption_ids)}
    lists = {}
    for direction, matrix, query_ids, item_ids in (("i2t", scores, image_ids, caption_ids),
                                                   ("t2i", scores.t(), caption_ids, image_ids)):
        candidates = [matrix.topk(50, dim=1).indices]
        for fold_images, fold_captions in folds:
            rows = torch.tensor(sorted(image_row[image] for image in fold_images))
            columns = torch.tensor(sorted(caption_column[caption] for caption in fold_captions))
            queries, items = (rows, columns) if direction == "i2t" else (columns, rows)
            within = torch.full((matrix.shape[0], 10), -1, dtype=torch.long)
            within[queries] = items[matrix[queries][:, items].topk(10, dim=1).indices]
            candidates.append(within)
        candidates = torch.cat(candidates, dim=1)
        values = matrix.gather(1, candidates.clamp(min=0)).masked_fill(candidates < 0, float("-inf"))
        ranked = candidates.gather(1, values.argsort(dim=1, descending=True))
        lists[direction] = {query_ids[q]: [item_ids[item] for item in dict.fromkeys(row) if item >= 0]
                            for q, row in enumerate(ranked.tolist())}
    return lists["i2t"], lists["t2i"]


@needs_package
def test_the_eccv_block_on_the_packages_real_ids_equals_calling_the_package():
    """The real 5K test split (the package's 5,000 image and 25,000 caption ids) in a shuffled
    loader order, tie-free synthetic scores: the block equals Metrics.compute_all_metrics on the
    lists a user would build, and its COCO 5K equals our 'all' row."""
    benchmark, image_ids, captions_of = real_test_split()
    images, captions = loader_order(image_ids, captions_of, shuffled=True)
    evaluate.check_eccv_split((images, captions, "fixture"), "testall", benchmark)
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(5000, 25000, generator=generator, dtype=torch.float64)
    owners = torch.arange(5000).repeat_interleave(5)
    scores[owners, torch.arange(25000)] += 2.5
    block = eccv_results(scores, owners, (images, captions, "fixture"), benchmark)
    folds = [({benchmark.coco_gts["t2i"][c][0] for c in fold}, fold)
             for fold in benchmark.coco_ids.reshape(5, -1).tolist()]
    i2t, t2i = topk_lists(scores, images, captions, folds)
    with contextlib.redirect_stderr(io.StringIO()):
        package = benchmark.compute_all_metrics(
            i2t, t2i, target_metrics=("eccv_r1", "eccv_map_at_r", "eccv_rprecision", "coco_1k_recalls",
                                      "coco_5k_recalls", "cxc_recalls"), Ks=(1, 5, 10))
    for direction in ("i2t", "t2i"):
        for ours, theirs in (("map_at_r", "eccv_map_at_r"), ("r_precision", "eccv_rprecision"), ("r1", "eccv_r1")):
            assert block["eccv_caption"][direction][ours] == pytest.approx(100 * package[theirs][direction], abs=1e-9)
        for name in ("cxc", "coco_5k", "coco_1k"):
            for k in (1, 5, 10):
                assert block[name][f"{direction}_r{k}"] == pytest.approx(100 * package[f"{name}_r{k}"][direction],
                                                                        abs=1e-9), (name, direction, k)
    assert block["eccv_caption"]["i2t"]["queries"] == 1261 and block["eccv_caption"]["t2i"]["queries"] == 1332
    ours = retrieval_metrics(scores, owners)
    assert all(block["coco_5k"][key] == pytest.approx(ours[key], abs=1e-9) for key in evaluate.RECALL_KEYS)
    assert block["coco_1k_folds_as_ours"] is False


@needs_package
def test_evaluate_eccv_on_a_coco_shaped_split_with_the_packages_ids(tmp_path, capsys):
    """A tiny random model on 5,000 synthetic region-feature images and 25,000 captions that carry
    the package's real ids in its order: `evaluate.py --eccv` prints and writes the block, and its
    COCO 5K and 1K equal our own rows (the folds agree)."""
    benchmark, image_ids, captions_of = real_test_split()
    images, captions = loader_order(image_ids, captions_of, shuffled=False)
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(3, 7))) for _ in captions]
    precomputed_fixture(tmp_path / "precomp", images, captions, texts)
    path = tiny_checkpoint(tmp_path, extra=["data.test_split=testall", "eval.batch_size=500"])
    out = tmp_path / "metrics.json"
    code, printed, err = run_eccv(capsys, "--ckpt", path, "--out", str(out))
    assert code == 0, err
    results = json.loads(out.read_text())
    block = results["eccv"]
    assert block["coco_1k_folds_as_ours"] is True
    for key in evaluate.RECALL_KEYS:
        assert block["coco_5k"][key] == pytest.approx(results["all"][key], abs=1e-9)
        assert block["coco_1k"][key] == pytest.approx(results["1k"][key], abs=1e-9)
    assert set(block["eccv_caption"]["t2i"]) == {"map_at_r", "r_precision", "r1", "queries", "positives_per_query"}
    assert block["pmrp"] is None and "plausible-match files" in block["pmrp_note"]
    assert f"COCO 5K {block['coco_5k']['i2t_r1']:9.2f}" in printed
    assert "COCO 1K folds: the same five folds of 1,000 images as ours" in printed
