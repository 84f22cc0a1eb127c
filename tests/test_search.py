"""search.py: the load-and-encode API equals evaluate.py's encodings (every encoder family), the
bound-pruned top k equals the exhaustive ranking (random, structured and tied galleries, K = 4 and
8), incremental and interruption-safe indexing, one-line user errors, and the README's commands
end to end (--approximate is tests/test_set_index.py's). One tiny trained run (CNN + BiGRU) is
shared by the module."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import config
import evaluate
import search
import train
from model import build_model, load_checkpoint
from similarity import score_matrix
from test_figures import with_encoders
from test_train import REPO, tiny_overrides

QUERY = "a large red circle above a small blue square"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One epoch of the tiny shapes run (16 test images of 32 px, K = 2, D = 32): its best.pt."""
    folder = tmp_path_factory.mktemp("search_run")
    assert train.main(tiny_overrides(folder, name="search") + ["train.epochs=1"]) == 0
    return str(folder / "runs" / "search" / "best.pt")


@pytest.fixture(scope="module")
def split_encodings(trained_run):
    """evaluate.py's view of the run's test split: (cfg, dataset, image sets, caption sets, caption_to_image)."""
    checkpoint = load_checkpoint(trained_run)
    cfg, _, _ = evaluate.checkpoint_settings(checkpoint, trained_run, [], None)
    model, loader, device = evaluate.build_eval_context(cfg, checkpoint, "test")
    image_sets, _, caption_sets, _, owners = evaluate.encode_split(model, loader, device)
    return cfg, loader.dataset, image_sets, caption_sets, owners


def run_search(capsys, *args):
    code = search.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def split_captions(dataset):
    """The caption strings evaluate.py encodes: the first C of every image, image-major."""
    per_image = dataset.captions_per_image
    assert all(len(captions) >= per_image for captions in dataset.captions)
    return [text for captions in dataset.captions for text in captions[:per_image]]


def unit(tensor):
    return torch.nn.functional.normalize(tensor, dim=-1)


def brute_force_top_k(query, gallery, k, method, options, gallery_kind):
    """Every item scored (float64, rounded to float32), sorted by score, then gallery position."""
    if gallery_kind == "images":
        scores = score_matrix(gallery.double(), query.double()[None], method, **options)[:, 0].float()
    else:
        scores = score_matrix(query.double()[None], gallery.double(), method, **options)[0].float()
    order = sorted(range(len(scores)), key=lambda i: (-scores[i].item(), i))[:k]
    return order, scores[order]


# ----------------------------------------------------------------------------- the API

def test_api_encodings_and_recalls_equal_evaluate_on_the_test_split_of_a_trained_run(trained_run, split_encodings,
                                                                                         tmp_path):
    cfg, dataset, image_sets, caption_sets, owners = split_encodings
    trained = search.load_trained(trained_run, device="cpu")
    api_images = trained.encode_images([str(path) for path in dataset.paths], batch_size=5)   # other batches
    api_captions = trained.encode_captions(split_captions(dataset), batch_size=7)
    assert api_images.dtype == api_captions.dtype == torch.float32
    torch.testing.assert_close(api_images, image_sets, atol=1e-6, rtol=0)
    torch.testing.assert_close(api_captions, caption_sets, atol=1e-6, rtol=0)
    torch.testing.assert_close(api_images.norm(dim=-1), torch.ones(api_images.shape[:2]), atol=1e-5, rtol=0)
    with Image.open(dataset.paths[3]) as picture:                   # a PIL image is the same image
        torch.testing.assert_close(trained.encode_images([picture.copy()]), api_images[3:4], atol=1e-6, rtol=0)
    out = tmp_path / "metrics.json"
    assert evaluate.main(["--ckpt", trained_run, "--out", str(out)]) == 0
    assert evaluate.retrieval_metrics(trained.similarity(api_images, api_captions), owners) == \
        json.loads(out.read_text())["all"]
    assert trained.method == "max_pair" and trained.options == {}


@pytest.mark.parametrize("image, text", [("vit", "bert"), ("precomputed", "gru")])
def test_api_encodings_equal_evaluate_for_vit_bert_and_region_checkpoints(trained_run, tmp_path, image, text):
    cfg, vocab = with_encoders(config.checkpoint_config(load_checkpoint(trained_run), trained_run), tmp_path, image,
                               text)
    torch.manual_seed(0)
    path = tmp_path / "random.pt"
    torch.save({"model": build_model(cfg, vocab).state_dict(), "config": cfg, "vocab": vocab, "epoch": 0}, path)
    checkpoint = load_checkpoint(str(path))
    model, loader, device = evaluate.build_eval_context(cfg, checkpoint, "test")
    image_sets, _, caption_sets, _, _ = evaluate.encode_split(model, loader, device)
    trained = search.load_trained(path)
    dataset = loader.dataset
    if image == "vit":
        images = [str(p) for p in dataset.paths]
    else:           # feature arrays, and for one image the .npy file holding its array
        rows = np.load(dataset.images_path)[::dataset.image_step]
        np.save(tmp_path / "one.npy", rows[1])
        images = [rows[0], str(tmp_path / "one.npy"), *torch.from_numpy(rows[2:])]
    torch.testing.assert_close(trained.encode_images(images, batch_size=4), image_sets, atol=1e-6, rtol=0)
    torch.testing.assert_close(trained.encode_captions(split_captions(dataset)), caption_sets, atol=1e-6, rtol=0)


def test_similarity_is_the_checkpoints_method_with_its_options(trained_run, tmp_path):
    checkpoint = torch.load(trained_run, weights_only=True)
    checkpoint["config"]["loss"]["similarity_options"] = {"score": "exp"}
    torch.save(checkpoint, tmp_path / "exp.pt")
    checkpoint["config"]["eval"].update(method="greedy", similarity_options={"score": "mean"})
    torch.save(checkpoint, tmp_path / "greedy.pt")
    generator = torch.Generator().manual_seed(0)
    images = unit(torch.randn(6, 2, 32, generator=generator))
    captions = unit(torch.randn(9, 2, 32, generator=generator))
    for name, method, options in (("exp.pt", "max_pair", {"score": "exp"}), ("greedy.pt", "greedy", {"score": "mean"})):
        trained = search.load_trained(tmp_path / name)
        assert (trained.method, trained.options) == (method, options)
        expected = score_matrix(images, captions, method, **options)
        torch.testing.assert_close(trained.similarity(images, captions), expected, atol=0, rtol=0)


def test_a_single_string_is_refused_rather_than_encoded_letter_by_letter(trained_run):
    trained = search.load_trained(trained_run)
    with pytest.raises(TypeError, match="list"):
        trained.encode_captions("a red circle")
    assert trained.encode_captions([]).shape == (0, 2, 32)


# ----------------------------------------------------------------------------- exact top k

def make_gallery(kind, count, k_gallery, k_query, dim=16, seed=0):
    """(gallery (N, K_g, D), queries (Q, K_q, D)): random sets, or trained-like sets (elements are
    concepts of a small shared bank plus noise; a query takes half its elements from one gallery
    item's concepts), or trained-like sets with planted ties (duplicated items, including the items
    each query was drawn from)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return unit(torch.randn(count, k_gallery, dim, generator=g)), unit(torch.randn(6, k_query, dim, generator=g))
    bank = unit(torch.randn(10, dim, generator=g))
    concepts = torch.randint(10, (count, max(k_gallery, k_query)), generator=g)
    sources = torch.randint(count, (6,), generator=g)
    query_concepts = concepts[sources][:, :k_query].clone()
    unrelated = torch.rand(query_concepts.shape, generator=g) < 0.5
    query_concepts[unrelated] = torch.randint(10, (int(unrelated.sum()),), generator=g)
    gallery = unit(bank[concepts[:, :k_gallery]] + 0.6 * unit(torch.randn(count, k_gallery, dim, generator=g)))
    queries = unit(bank[query_concepts] + 0.6 * unit(torch.randn(6, k_query, dim, generator=g)))
    if kind == "tied":
        for offset, source in enumerate(sources.tolist()):
            gallery[(source * 7 + 3 + offset) % count] = gallery[source]          # a twin elsewhere
            gallery[(source + count // 2) % count] = gallery[source].flip(0)      # the same set, elements reordered
    return gallery, queries


@pytest.mark.parametrize("kind", ["random", "trained_like", "tied"])
@pytest.mark.parametrize("set_size", [4, 8])
@pytest.mark.parametrize("method, options", [("max_pair", {}), ("max_pair", {"score": "exp"}), ("greedy", {})],
                         ids=["max_pair", "max_pair_exp", "greedy"])
def test_pruned_top_k_equals_the_exhaustive_ranking_with_ties_in_gallery_order(kind, set_size, method, options):
    for gallery_kind in ("images", "captions"):
        gallery, queries = make_gallery(kind, 300, set_size, set_size, seed=set_size)
        for query in queries:
            for k in (1, 10):
                found = search.top_k(query, gallery, k, method, options, gallery_kind, chunk_items=37)
                expected, scores = brute_force_top_k(query, gallery, k, method, options, gallery_kind)
                assert found.positions.tolist() == expected, (gallery_kind, k)
                assert torch.equal(found.scores, scores)
                assert found.matched >= k


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", ["max_pair", "chamfer"])
def test_nan_or_inf_in_the_query_or_the_gallery_raises(bad, method):
    gallery, queries = make_gallery("random", 100, 4, 4, seed=2)
    broken_gallery, broken_query = gallery.clone(), queries[0].clone()
    broken_gallery[63, 2, 5] = bad
    broken_query[1, 0] = bad
    for gallery_kind in ("images", "captions"):
        for query, sets in ((queries[0], broken_gallery), (broken_query, gallery)):
            with pytest.raises(ValueError, match="non-finite"):
                search.top_k(query, sets, 10, method, {}, gallery_kind, chunk_items=37)


def test_planted_ties_come_out_in_gallery_order():
    gallery, queries = make_gallery("trained_like", 50, 4, 4, seed=1)
    best = search.top_k(queries[0], gallery, 1).positions.item()
    gallery = torch.cat([gallery[:best], gallery[best:best + 1].repeat(3, 1, 1), gallery[best:]])   # 4 copies
    found = search.top_k(queries[0], gallery, 5)
    assert found.positions[:4].tolist() == [best, best + 1, best + 2, best + 3]
    assert found.scores[:4].unique().numel() == 1 and found.scores[4] < found.scores[0]


def test_the_bounds_leave_most_items_of_a_structured_gallery_unmatched():
    gallery, queries = make_gallery("trained_like", 2000, 4, 4, dim=32, seed=3)
    matched = [search.top_k(query, gallery, 10).matched for query in queries]
    assert max(matched) < 0.25 * len(gallery), matched


@pytest.mark.parametrize("method, options", [("smooth_chamfer", {}), ("chamfer", {}), ("mil", {}), ("topk", {"k": 2})])
def test_other_similarities_are_searched_exactly_too(method, options):
    gallery, queries = make_gallery("tied", 200, 4, 3, seed=5)
    for gallery_kind in ("images", "captions"):
        for query in queries[:3]:
            found = search.top_k(query, gallery, 10, method, options, gallery_kind, chunk_items=41)
            expected, scores = brute_force_top_k(query, gallery, 10, method, options, gallery_kind)
            assert found.positions.tolist() == expected and torch.equal(found.scores, scores)


# ----------------------------------------------------------------------------- index and query

def test_index_a_split_then_query_it_exactly_with_json_and_html(trained_run, split_encodings, tmp_path, capsys):
    _, dataset, image_sets, _, _ = split_encodings
    gallery_dir = tmp_path / "gallery"
    code, out, err = run_search(capsys, "index", "--ckpt", trained_run, "--split", "test", "--out", gallery_dir)
    assert code == 0, err
    assert out.strip().endswith("images/s)") and "16 images (16 new, 0 changed, 0 unchanged" in out
    gallery = search.Gallery.open(gallery_dir)
    assert gallery.keys == [os.path.abspath(str(path)) for path in dataset.paths]       # the split's order
    replayed = search.Gallery.open(gallery_dir, for_index=True)                          # the log, not the snapshot
    assert replayed.keys == gallery.keys and (replayed.rows == gallery.rows).all()
    stored = np.memmap(gallery_dir / "sets.bin", np.float32, "r").reshape(-1, 2, 32)   # as the docstring says
    torch.testing.assert_close(torch.from_numpy(np.array(stored)), image_sets, atol=1e-6, rtol=0)

    code, out, err = run_search(capsys, "query", "--index", gallery_dir, QUERY, "--top", "5",
                                "--json", tmp_path / "r.json", "--html", tmp_path / "r.html")
    assert code == 0, err
    trained = search.load_trained(trained_run)
    expected, scores = brute_force_top_k(trained.encode_captions([QUERY])[0], image_sets, 5, "max_pair", {}, "images")
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["query"] == QUERY and [r["path"] for r in written["results"]] == [gallery.keys[i] for i in expected]
    assert [r["score"] for r in written["results"]] == pytest.approx(scores.tolist(), abs=1e-6)
    lines = out.splitlines()
    assert lines[1].split() == ["rank", "score", "path"] and len(lines) == 2 + 5
    assert [line.split()[0] for line in lines[2:]] == ["1", "2", "3", "4", "5"]
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and QUERY in page
    assert all(f"score {score:.4f}" in page for score in scores.tolist())
    code, out, err = run_search(capsys, "query", "--index", gallery_dir, "circle = round", "--top", "1")
    assert code == 0 and out.startswith("query: 'circle = round'"), err     # text, not a config override


def copy_images(dataset, folder, names):
    for index, name in names.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        shutil.copyfile(dataset.paths[index], os.path.join(folder, name))


def count_encoded(monkeypatch):
    """Record every image batch handed to the model during indexing."""
    encoded, real = [], search.TrainedModel.encode_loaded

    def encode_loaded(self, batches):
        batches = [list(batch) for batch in batches]
        encoded.extend(len(batch) for batch in batches)
        return real(self, batches)
    monkeypatch.setattr(search.TrainedModel, "encode_loaded", encode_loaded)
    return encoded


def test_reindexing_encodes_only_new_and_changed_files_and_drops_deleted_ones(trained_run, split_encodings, tmp_path,
                                                                             capsys, monkeypatch):
    _, dataset, image_sets, _, _ = split_encodings
    folder, gallery_dir = tmp_path / "photos", tmp_path / "gallery"
    copy_images(dataset, folder, {0: "a.png", 1: "b.png", 2: "sub/c.png", 3: "d.png"})
    (folder / "notes.txt").write_text("not an image")
    encoded = count_encoded(monkeypatch)
    assert run_search(capsys, "index", "--ckpt", trained_run, "--images", folder, "--out", gallery_dir)[0] == 0
    assert sum(encoded) == 4
    copy_images(dataset, folder, {4: "e.png", 5: "sub/f.png"})                 # two new files
    shutil.copyfile(dataset.paths[6], folder / "b.png")                        # b.png now shows image 6
    os.utime(folder / "b.png", ns=(10**18, 10**18))
    os.remove(folder / "d.png")
    encoded.clear()
    code, out, err = run_search(capsys, "index", "--ckpt", trained_run, "--images", folder, "--out", gallery_dir)
    assert code == 0, err
    assert sum(encoded) == 3
    assert "5 images (2 new, 1 changed, 2 unchanged, 0 unreadable skipped, 1 removed)" in out
    gallery = search.Gallery.open(gallery_dir)
    names = [os.path.relpath(key, folder) for key in gallery.keys]
    assert names == ["a.png", "b.png", "sub/c.png", "e.png", "sub/f.png"]      # b.png keeps its place
    expected = image_sets[[0, 6, 2, 4, 5]]
    torch.testing.assert_close(gallery.take(np.arange(5)), expected, atol=1e-6, rtol=0)
    encoded.clear()
    assert run_search(capsys, "index", "--ckpt", trained_run, "--images", folder, "--out", gallery_dir)[0] == 0
    assert sum(encoded) == 0
    copy_images(dataset, tmp_path / "more", {7: "g.png"})                     # another source into the gallery
    assert run_search(capsys, "index", "--ckpt", trained_run, "--images", tmp_path / "more",
                      "--out", gallery_dir)[0] == 0
    os.remove(folder / "a.png")
    code, out, _ = run_search(capsys, "index", "--ckpt", trained_run, "--images", folder, "--out", gallery_dir)
    assert code == 0 and "5 images (0 new, 0 changed, 4 unchanged, 0 unreadable skipped, 1 removed)" in out
    assert [os.path.basename(key) for key in search.Gallery.open(gallery_dir).keys] == ["b.png", "c.png", "e.png",
                                                                                       "f.png", "g.png"]
    with search.gallery_lock(gallery_dir):                                    # another index run is writing
        code, _, err = run_search(capsys, "index", "--ckpt", trained_run, "--images", folder, "--out", gallery_dir)
    assert code == 2 and "is being indexed by another process" in err and len(err.strip().splitlines()) == 1


def test_unreadable_files_are_skipped_counted_and_named_on_one_warning_line_each(trained_run, split_encodings, tmp_path,
                                                                                 capsys):
    _, dataset, _, _, _ = split_encodings
    folder = tmp_path / "photos"
    copy_images(dataset, folder, {0: "a.png", 1: "b.png"})
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "empty.jpg").write_bytes(b"")
    index = ["index", "--ckpt", trained_run, "--images", folder, "--out", tmp_path / "g", "data.num_workers=1"]
    code, out, err = run_search(capsys, *index)                              # files read in a loader process
    assert code == 0
    warnings = err.strip().splitlines()
    assert len(warnings) == 2 and all(line.startswith("warning: skipped unreadable ") for line in warnings)
    assert "broken.png" in warnings[0] and "empty.jpg" in warnings[1]
    assert "2 images (2 new, 0 changed, 0 unchanged, 2 unreadable skipped, 0 removed)" in out
    (folder / "a.png").write_bytes(b"truncated")                             # a changed file now unreadable
    code, out, err = run_search(capsys, *index)
    assert code == 0 and "a.png" in err.splitlines()[0] and len(err.strip().splitlines()) == 3
    assert "1 image (0 new, 0 changed, 1 unchanged, 3 unreadable skipped, 1 removed)" in out
    assert [os.path.basename(key) for key in search.Gallery.open(tmp_path / "g").keys] == ["b.png"]


def test_an_interrupted_index_keeps_what_it_had_and_the_next_run_finishes_it(trained_run, split_encodings, tmp_path,
                                                                          capsys, monkeypatch):
    _, dataset, image_sets, _, _ = split_encodings
    folder, gallery_dir = tmp_path / "photos", tmp_path / "gallery"
    copy_images(dataset, folder, {i: f"{i:02d}.png" for i in range(4)})
    index = ["index", "--ckpt", trained_run, "--images", folder, "--out", gallery_dir, "eval.batch_size=2"]
    assert run_search(capsys, *index)[0] == 0
    copy_images(dataset, folder, {i: f"{i:02d}.png" for i in range(4, 10)})
    calls, real = [], search.TrainedModel.encode_loaded

    def interrupted(self, batches):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, batches)
    monkeypatch.setattr(search.TrainedModel, "encode_loaded", interrupted)
    code, _, err = run_search(capsys, *index)
    assert code == 130 and err.startswith("interrupted: ") and len(err.strip().splitlines()) == 1
    assert len(search.Gallery.open(gallery_dir)) == 6                       # the old 4 and one finished batch
    monkeypatch.setattr(search.TrainedModel, "encode_loaded", real)
    with open(gallery_dir / "sets.bin", "ab") as handle:                    # what a kill mid-batch leaves
        handle.write(b"\0" * 1000)
    with open(gallery_dir / "log.jsonl", "a") as handle:
        handle.write('{"key": "/half/written.png", "ro')
    assert len(search.Gallery.open(gallery_dir)) == 6
    code, out, err = run_search(capsys, *index)
    assert code == 0, err
    assert "10 images (4 new, 0 changed, 6 unchanged" in out
    gallery = search.Gallery.open(gallery_dir)
    assert [os.path.basename(key) for key in gallery.keys] == [f"{i:02d}.png" for i in range(10)]
    torch.testing.assert_close(gallery.take(np.arange(10)), image_sets[:10], atol=1e-6, rtol=0)
    assert os.path.getsize(gallery_dir / "sets.bin") == 10 * 2 * 32 * 4     # the torn tail was cut


def test_captions_index_and_an_image_query(trained_run, split_encodings, tmp_path, capsys):
    _, dataset, image_sets, caption_sets, _ = split_encodings
    captions = split_captions(dataset)[:30]
    (tmp_path / "captions.txt").write_text("\n".join(captions + ["", captions[0]]) + "\n", encoding="utf-8")
    gallery_dir = tmp_path / "captions"
    code, out, err = run_search(capsys, "index", "--ckpt", trained_run, "--captions", tmp_path / "captions.txt",
                                "--out", gallery_dir)
    assert code == 0, err
    distinct = list(dict.fromkeys(captions))
    assert f"{len(distinct)} captions ({len(distinct)} new" in out       # empty and repeated lines are not items
    code, out, err = run_search(capsys, "query", "--index", gallery_dir, "--image", dataset.paths[2], "--top", "3",
                                "--json", tmp_path / "r.json", "--html", tmp_path / "r.html")
    assert code == 0, err
    trained = search.load_trained(trained_run)
    gallery_sets = trained.encode_captions(distinct)
    expected, scores = brute_force_top_k(image_sets[2], gallery_sets, 3, "max_pair", {}, "captions")
    written = json.loads((tmp_path / "r.json").read_text())
    assert [r["caption"] for r in written["results"]] == [distinct[i] for i in expected]
    assert [r["score"] for r in written["results"]] == pytest.approx(scores.tolist(), abs=1e-6)
    assert (tmp_path / "r.html").read_text().count("<li>") == 3


@pytest.fixture(scope="module")
def other_checkpoint(trained_run, tmp_path_factory):
    """A checkpoint of the same config with other (random) weights."""
    checkpoint = torch.load(trained_run, weights_only=True)
    torch.manual_seed(1)
    checkpoint["model"] = build_model(checkpoint["config"], checkpoint["vocab"]).state_dict()
    path = tmp_path_factory.mktemp("other") / "other.pt"
    torch.save(checkpoint, path)
    return str(path)


@pytest.fixture(scope="module")
def places(trained_run, split_encodings, other_checkpoint, tmp_path_factory):
    """A one-image gallery and what the error cases point at."""
    folder = tmp_path_factory.mktemp("errors")
    copy_images(split_encodings[1], folder / "photos", {0: "a.png"})
    (folder / "captions.txt").write_text("a red circle\n")
    assert search.main(["index", "--ckpt", trained_run, "--images", str(folder / "photos"),
                        "--out", str(folder / "gallery")]) == 0
    return {"{gallery}": folder / "gallery", "{other}": other_checkpoint, "{photos}": folder / "photos",
            "{photo}": folder / "photos" / "a.png", "{ckpt}": trained_run, "{captions}": folder / "captions.txt",
            "{missing}": folder / "missing"}


@pytest.mark.parametrize("args, message", [
    (["query", "--index", "{gallery}", "--ckpt", "{other}", "a red circle"], "indexed with another checkpoint"),
    (["index", "--ckpt", "{other}", "--images", "{photos}", "--out", "{gallery}"], "indexed with another checkpoint"),
    (["query", "--index", "{gallery}", ""], "the query caption is empty"),
    (["query", "--index", "{gallery}", "   "], "the query caption is empty"),
    (["query", "--index", "{missing}", "a red circle"], "does not exist: make one with"),
    (["query", "--index", "{photos}", "a red circle"], "is not a gallery"),
    (["query", "--index", "{gallery}", "a red circle", "--top", "0"], "--top must be 1 or more"),
    (["query", "--index", "{gallery}", "a red circle", "--top", "-3"], "--top must be 1 or more"),
    (["query", "--index", "{gallery}", "a red circle", "--top", "ten"], "argument --top: invalid int value"),
    (["query", "--index", "{gallery}", "--image", "{photo}"], "holds images: query it with a caption"),
    (["query", "--index", "{gallery}"], "one of the two"),
    (["query", "--index", "{gallery}", "a red circle", "--json", "{missing}/r.json"], "--json"),
    (["index", "--ckpt", "{ckpt}", "--captions", "{captions}", "--out", "{gallery}"], "holds images, not captions"),
    (["index", "--ckpt", "{ckpt}", "--images", "{missing}", "--out", "{gallery}"], "is not a folder"),
    (["index", "--ckpt", "{missing}/best.pt", "--images", "{photos}", "--out", "{gallery}"], "does not exist"),
    (["index", "--ckpt", "{ckpt}", "--images", "{photos}", "--out", "{photo}"], "is a file"),
    (["index", "--ckpt", "{ckpt}", "--out", "{gallery}"], "one of the arguments --images --captions --split"),
    (["search", "--index", "{gallery}"], "invalid choice: 'search'"),
], ids=["query_other_ckpt", "index_other_ckpt", "empty", "blank", "missing_gallery", "not_a_gallery", "top_0",
        "top_negative", "top_word", "image_on_images", "no_query", "json_folder", "captions_into_images",
        "missing_images", "missing_ckpt", "out_is_file", "no_source", "no_command"])
def test_user_errors_are_one_line_and_exit_2(places, capsys, args, message):
    pattern = "|".join(map(re.escape, places))
    args = [re.sub(pattern, lambda match: str(places[match.group()]), arg) for arg in args]
    code, out, err = run_search(capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_a_replaced_or_moved_checkpoint_is_named_and_a_caption_gallery_wants_an_image(
        trained_run, other_checkpoint, tmp_path, capsys):
    shutil.copyfile(trained_run, tmp_path / "model.pt")
    (tmp_path / "captions.txt").write_text("a red circle\na blue square\n")
    assert run_search(capsys, "index", "--ckpt", tmp_path / "model.pt", "--captions", tmp_path / "captions.txt",
                      "--out", tmp_path / "captions")[0] == 0
    code, _, err = run_search(capsys, "query", "--index", tmp_path / "captions", "a red circle")
    assert code == 2 and "holds captions: query it with --image PATH" in err
    image = tmp_path / "query.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    shutil.copyfile(other_checkpoint, tmp_path / "model.pt")                  # e.g. training went on
    code, _, err = run_search(capsys, "query", "--index", tmp_path / "captions", "--image", image)
    assert code == 2 and "indexed with another checkpoint" in err and len(err.strip().splitlines()) == 1
    os.remove(tmp_path / "model.pt")                                          # or the run folder moved
    code, _, err = run_search(capsys, "query", "--index", tmp_path / "captions", "--image", image)
    assert code == 2 and "is gone: pass --ckpt" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_search(capsys, "query", "--index", tmp_path / "captions", "--image", image,
                              "--ckpt", trained_run)
    assert code == 0, err


# ----------------------------------------------------------------------------- the README

def test_the_readmes_search_commands_run_end_to_end(trained_run, tmp_path):
    """The README's Search block, run as written against a tiny run put where `python train.py` puts best.pt."""
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = readme.split("\n## Search\n", 1)[1].split("\n## ", 1)[0]
    commands = [line.split("#")[0].strip() for line in section.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()]
    commands = [command for command in commands if command]
    assert commands[0] == "python train.py" and len(commands) == 3
    run_dir = tmp_path / "runs" / "shapes_maxmatch"
    os.makedirs(run_dir)
    shutil.copyfile(trained_run, run_dir / "best.pt")
    defaults = config.load_config()["run"]
    assert "runs/shapes_maxmatch/best.pt" in commands[1] and (defaults["out_dir"], defaults["name"]) == (
        "runs", "shapes_maxmatch")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    outputs = []
    for command in commands[1:]:
        argv = command.split(" ", 2)
        assert argv[:2] == ["python", "search.py"]
        result = subprocess.run([sys.executable, os.path.join(REPO, "search.py"), *shlex.split(argv[2])],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(result.stdout)
    assert QUERY in commands[2] and QUERY in outputs[1]
    assert re.search(r"^\s+1\s+-?\d\.\d{4}\s+\S+\.png$", outputs[1], re.MULTILINE), outputs[1]
