"""Retrieval against every fitting item: the shapes data's complete relation (shapes.shapes_relation)
and the metrics against it (evaluate.complete_positive_metrics), each checked against brute force."""
import itertools
import json

import pytest
import torch

import data
import evaluate
import shapes
from evaluate import complete_positive_metrics, retrieval_metrics

SMALL = dict(seed=5, num_train=30, num_val=10, num_test=40, image_size=16)
CROWDED = dict(SMALL, min_objects=4, max_objects=6, caption_objects_probs=[0.5, 0.5])


@pytest.fixture(scope="module", params=[SMALL, CROWDED], ids=["default", "crowded"])
def generated(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return shapes.generate_shapes(root, **request.param)


# ----------------------------------------------------------------------------- the relation

def brute_force_fits(sentence, described_objects, image_objects):
    """Does the caption fit the image? Every injective assignment of described objects to image objects."""
    for chosen in itertools.product(range(len(image_objects)), repeat=len(described_objects)):
        if len(set(chosen)) < len(chosen):
            continue
        assigned = [image_objects[i] for i in chosen]
        matches = True
        for wanted, mentioned, obj in zip(described_objects, sentence["mentioned"], assigned):
            keys = {"shape", "colour"} | ({"size"} if "size" in mentioned else set())
            keys |= {"row", "col"} if "position" in mentioned else set()
            matches &= all(wanted[key] == obj[key] for key in keys)
        relation = sentence["relation"]
        if matches and relation is not None:
            first, second = assigned[0], assigned[1]
            matches = {"left": first["col"] < second["col"], "right": first["col"] > second["col"],
                       "above": first["row"] < second["row"], "below": first["row"] > second["row"]}[relation]
        if matches:
            return True
    return False


@pytest.mark.parametrize("split", ["val", "test"])
def test_the_relation_equals_a_brute_force_check_of_every_caption_against_every_image(generated, split):
    entries = [e for e in json.loads(generated.read_text())["images"] if e["split"] == split]
    relation = shapes.shapes_relation(generated, split)
    expected = [[number for number, image in enumerate(entries)
                 if brute_force_fits(sentence, [entry["objects"][i] for i in sentence["objects"]], image["objects"])]
                for entry in entries for sentence in entry["sentences"]]
    assert relation["caption_images"] == expected
    assert relation["filenames"] == [e["filename"] for e in entries]
    transposed = [[t for t, fitting in enumerate(expected) if i in fitting] for i in range(len(entries))]
    assert relation["image_captions"] == transposed
    assert all(owner in fitting for owner, fitting in zip(relation["caption_to_image"], expected))
    if split == "test":
        assert any(len(fitting) > 1 for fitting in expected)      # the one-to-many case is in the fixture


def test_the_relation_follows_the_evaluation_loaders_caption_order(generated):
    """First C captions of each image, cycled when fewer: the order evaluate.encode_split gives."""
    entries = [e for e in json.loads(generated.read_text())["images"] if e["split"] == "test"]
    for count in (2, 7):
        relation = shapes.shapes_relation(generated, "test", captions_per_image=count)
        assert relation["caption_to_image"] == [i for i in range(len(entries)) for _ in range(count)]
        full = shapes.shapes_relation(generated, "test")
        for caption, owner in enumerate(relation["caption_to_image"]):
            position = (caption % count) % len(entries[owner]["sentences"])
            assert relation["caption_images"][caption] == full["caption_images"][owner * 5 + position]


def test_the_ambiguity_diagnostic_is_the_mean_inverse_count_of_the_relation(generated):
    caption_images = shapes.shapes_relation(generated, "test")["caption_images"]
    stats = shapes.shapes_caption_ambiguity(generated, "test")
    assert stats["oracle_t2i_r1"] == pytest.approx(sum(1 / len(f) for f in caption_images) / len(caption_images))
    assert stats["unique"] == pytest.approx(sum(len(f) == 1 for f in caption_images) / len(caption_images))


def test_evaluate_builds_the_positive_matrix_in_the_loader_order_and_refuses_other_images(generated, tmp_path):
    cfg = {"data": {"dataset": "shapes", "root": str(generated.parent), "karpathy_json": None,
                    "captions_per_image": 3}}
    positives, source = evaluate.complete_relation(cfg, "test")
    relation = shapes.shapes_relation(generated, "test", captions_per_image=3)
    assert positives.shape == (40, 120) and "shapes" in source
    assert [sorted(positives[:, t].nonzero().squeeze(1).tolist()) for t in range(120)] == relation["caption_images"]

    class Reordered:
        paths = [generated.parent / "images" / name for name in reversed(relation["filenames"])]

    with pytest.raises(data.DataError, match="not those of"):
        evaluate.complete_relation(cfg, "test", Reordered())
    for dataset in ("coco", "f30k", "precomputed"):
        positives, reason = evaluate.complete_relation({"data": {**cfg["data"], "dataset": dataset}}, "test")
        assert positives is None and f"data.dataset={dataset}" in reason


def test_relation_of_a_thousand_by_five_thousand_split_is_fast(tmp_path):
    """The default test split's size (the relation runs in every final test); a generous bound."""
    import time
    path = shapes.generate_shapes(tmp_path, seed=1, num_train=0, num_val=0, num_test=1000, image_size=8)
    started = time.perf_counter()
    relation = shapes.shapes_relation(path, "test")
    assert len(relation["caption_images"]) == 5000
    assert time.perf_counter() - started < 10.0


# ----------------------------------------------------------------------------- the metrics

def brute_force_metrics(scores, positives):
    """Per direction: sort each query's gallery by (-score, positive), a positive after a tied
    non-positive; then R-Precision, mAP@R and R@1 by their definitions, in plain Python."""
    def direction(rows, relevant):
        maps, precisions, firsts, counts = [], [], [], []
        for row, flags in zip(rows.tolist(), relevant.tolist()):
            order = sorted(range(len(row)), key=lambda j: (-row[j], flags[j]))
            ranked = [flags[j] for j in order]
            count = sum(flags)
            hits, total = 0, 0.0
            for r in range(1, count + 1):
                hits += ranked[r - 1]
                total += hits / r if ranked[r - 1] else 0.0
            maps.append(total / count)
            precisions.append(sum(ranked[:count]) / count)
            firsts.append(float(ranked[0]))
            counts.append(count)
        mean = lambda values: 100.0 * sum(values) / len(values)       # noqa: E731
        return {"map_at_r": mean(maps), "r_precision": mean(precisions), "r1": mean(firsts),
                "positives_per_query": sum(counts) / len(counts)}

    return {"i2t": direction(scores, positives), "t2i": direction(scores.t(), positives.t())}


def random_positives(num_images, num_captions, generator, density=0.2):
    positives = torch.rand(num_images, num_captions, generator=generator) < density
    positives[torch.arange(num_captions) % num_images, torch.arange(num_captions)] = True   # every query has one
    return positives


def assert_metrics_close(got, expected):
    for direction in ("i2t", "t2i"):
        for key, value in expected[direction].items():
            assert got[direction][key] == pytest.approx(value, abs=1e-9), (direction, key)


@pytest.mark.parametrize("seed", range(4))
def test_metrics_equal_brute_force_on_random_scores_and_positives(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(13, 29, generator=generator)
    positives = random_positives(13, 29, generator, density=0.1 + 0.1 * seed)
    assert_metrics_close(complete_positive_metrics(scores, positives, chunk_size=5),
                         brute_force_metrics(scores, positives))


@pytest.mark.parametrize("seed", range(3))
def test_metrics_equal_brute_force_with_planted_ties(seed):
    generator = torch.Generator().manual_seed(100 + seed)
    scores = torch.randint(0, 4, (11, 23), generator=generator).double()      # four values: ties everywhere
    positives = random_positives(11, 23, generator, density=0.3)
    assert_metrics_close(complete_positive_metrics(scores, positives), brute_force_metrics(scores, positives))


def test_hand_worked_example():
    """Query 0 ranks P N P N (R = 2): AP@R = (1/1) / 2 = 0.5, R-Prec 1/2, R@1 1. Query 1 ranks N P N P
    because its positive ties with a non-positive: AP@R = (1/2) / 2 = 0.25, R-Prec 1/2, R@1 0."""
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.5, 0.5, 0.1, 0.0]])
    positives = torch.tensor([[True, False, True, False], [False, True, False, True]])
    i2t = complete_positive_metrics(scores, positives)["i2t"]
    assert i2t == {"map_at_r": 37.5, "r_precision": 50.0, "r1": 50.0, "positives_per_query": 2.0}


def one_direction(scores, positives):
    """The metrics of the row queries alone (columns may lack positives here)."""
    return evaluate._query_positive_metrics(scores, positives, chunk_size=8)


def test_a_tie_with_a_non_positive_lowers_the_score_and_equal_scores_score_nothing():
    untied = torch.tensor([[0.9, 0.5, 0.1]])
    tied = torch.tensor([[0.9, 0.9, 0.1]])
    positives = torch.tensor([[True, False, False]])
    assert one_direction(untied, positives)["map_at_r"] == 100.0
    assert one_direction(tied, positives)["map_at_r"] == 0.0
    assert one_direction(tied, torch.tensor([[True, True, False]]))["map_at_r"] == 100.0   # tied positives: both hits
    collapsed = complete_positive_metrics(torch.zeros(6, 12), random_positives(6, 12, torch.Generator(), 0.0))
    assert all(collapsed[d][key] == 0.0 for d in ("i2t", "t2i") for key in ("map_at_r", "r_precision", "r1"))


def test_only_the_written_ground_truth_as_positives_gives_retrieval_metrics_r1():
    """With one image per caption as its only positive, t2i R@1 is R@K's t2i R@1; with more fitting
    items counted, R@1 can only rise (a fitting non-ground-truth item first is a hit, not a miss)."""
    generator = torch.Generator().manual_seed(7)
    scores = torch.randn(20, 100, generator=generator)
    owners = torch.arange(100) // 5
    written = torch.zeros(20, 100, dtype=torch.bool)
    written[owners, torch.arange(100)] = True
    strict, ours = retrieval_metrics(scores, owners), complete_positive_metrics(scores, written)
    assert ours["t2i"]["r1"] == pytest.approx(strict["t2i_r1"]) and ours["i2t"]["r1"] == pytest.approx(strict["i2t_r1"])
    wider = complete_positive_metrics(scores, written | random_positives(20, 100, generator, 0.1))
    assert wider["t2i"]["r1"] >= strict["t2i_r1"] and wider["i2t"]["r1"] >= strict["i2t_r1"]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        complete_positive_metrics(torch.tensor([[float("nan")]]), torch.tensor([[True]]))
    with pytest.raises(ValueError, match="no positive"):
        complete_positive_metrics(torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="shape"):
        complete_positive_metrics(torch.zeros(2, 3), torch.ones(3, 2, dtype=torch.bool))


def test_rankings_are_never_truncated():
    """A positive ranked last of a long gallery still counts in mAP@R's denominator R."""
    scores = torch.linspace(1, 0, 500)[None, :]
    positives = torch.zeros(1, 500, dtype=torch.bool)
    positives[0, [0, 499]] = True
    assert one_direction(scores, positives)["map_at_r"] == pytest.approx(50.0)
