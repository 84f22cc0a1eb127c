"""similarity.rank_preserving_scores: bounds in place of exact scores never change a retrieval rank.

Every check compares with the full computation (score_matrix, every pair matched exactly): the
ranks of every query under BOTH tie rules (ties for / against the ground truth), and the metrics
of evaluate.retrieval_metrics, on random sets, on structured "trained-like" sets, on sets with
planted ties and on collapsed sets.
"""
import pytest
import torch

import evaluate
import similarity

CAPTIONS_PER_IMAGE = 5


def unit(tensor):
    return torch.nn.functional.normalize(tensor, dim=-1)


def make_sets(kind, num_images, k_v, k_t, dim=16, seed=0):
    """images (N, K_v, D), captions (5N, K_t, D), caption_to_image (5N,)."""
    g = torch.Generator().manual_seed(seed)
    owners = torch.arange(num_images).repeat_interleave(CAPTIONS_PER_IMAGE)
    if kind == "random":
        return (unit(torch.randn(num_images, k_v, dim, generator=g)),
                unit(torch.randn(len(owners), k_t, dim, generator=g)), owners)
    if kind == "collapsed":  # every element of every set the same vector: all scores equal
        return unit(torch.ones(num_images, k_v, dim)), unit(torch.ones(len(owners), k_t, dim)), owners
    # trained-like: elements are concepts from a small shared bank plus noise; a caption draws
    # most of its elements from its image's concepts, so images sharing concepts are hard negatives
    bank = unit(torch.randn(12, dim, generator=g))
    image_concepts = torch.randint(12, (num_images, max(k_v, k_t)), generator=g)
    caption_concepts = image_concepts[owners][:, torch.randperm(max(k_v, k_t), generator=g)]
    unrelated = torch.rand(caption_concepts.shape, generator=g) < 0.3
    caption_concepts[unrelated] = torch.randint(12, (int(unrelated.sum()),), generator=g)
    images = unit(bank[image_concepts[:, :k_v]] + 0.8 * unit(torch.randn(num_images, k_v, dim, generator=g)))
    captions = unit(bank[caption_concepts[:, :k_t]] + 0.8 * unit(torch.randn(len(owners), k_t, dim, generator=g)))
    if kind == "tied":  # exact duplicates: ties between ground truth and other items in rows and columns
        captions[CAPTIONS_PER_IMAGE] = captions[0]          # image 1's first caption = image 0's
        captions[7] = captions[2].flip(0)                   # the same set in another element order
        images[3] = images[2]                               # two identical images
        captions[4 * CAPTIONS_PER_IMAGE:5 * CAPTIONS_PER_IMAGE] = captions[:CAPTIONS_PER_IMAGE]
    return images, captions, owners


def ranks_under_both_tie_rules(scores, owners):
    """{rule: (i2t ranks, t2i ranks)}: the number of other items scoring >= (or >) the ground truth."""
    num_captions = scores.shape[1]
    ground_truth = scores[owners, torch.arange(num_captions)]
    best_caption = torch.full((scores.shape[0],), -float("inf")).scatter_reduce(0, owners, ground_truth, "amax")
    own = torch.zeros_like(scores, dtype=torch.bool)
    own[owners, torch.arange(num_captions)] = True
    result = {}
    for rule, beats in (("ties against", torch.ge), ("ties for", torch.gt)):
        result[rule] = ((beats(scores, best_caption[:, None]) & ~own).sum(1),
                        (beats(scores, ground_truth[None, :]) & ~own).sum(0))
    return result


def assert_same_ranks(full, bounded, owners):
    expected, got = ranks_under_both_tie_rules(full, owners), ranks_under_both_tie_rules(bounded, owners)
    for rule in expected:
        assert torch.equal(expected[rule][0], got[rule][0]), f"i2t ranks differ ({rule})"
        assert torch.equal(expected[rule][1], got[rule][1]), f"t2i ranks differ ({rule})"
    assert evaluate.retrieval_metrics(bounded, owners) == evaluate.retrieval_metrics(full, owners)


@pytest.mark.parametrize("kind", ["random", "trained_like", "tied", "collapsed"])
@pytest.mark.parametrize("method, options", [("max_pair", {}), ("max_pair", {"score": "exp"}), ("greedy", {})])
@pytest.mark.parametrize("shape", [(4, 4), (8, 8), (3, 5), (6, 2)])
def test_ranks_and_metrics_equal_the_full_computation(kind, method, options, shape, monkeypatch):
    images, captions, owners = make_sets(kind, 24, *shape, seed=sum(shape))
    full = similarity.score_matrix(images, captions, method, **options)
    # small chunks: captions in several chunks, image chunks of 7 that split an image's captions
    # from their chunk neighbours, and pending exact blocks flushed several times
    monkeypatch.setattr(similarity, "CHUNK_BYTES", 4 * 7 * shape[0] * shape[1] * 17)
    monkeypatch.setattr(similarity, "SCRATCH_BYTES", 2048)
    bounded, fraction = similarity.rank_preserving_scores(images, captions, owners, method, chunk_size=7, **options)
    assert_same_ranks(full, bounded, owners)
    ground_truth = torch.arange(len(owners))
    torch.testing.assert_close(bounded[owners, ground_truth], full[owners, ground_truth], rtol=0, atol=1e-6)
    assert 0 < fraction <= 1


@pytest.mark.parametrize("kind", ["random", "trained_like", "tied"])
def test_ranks_equal_the_full_computation_above_the_dp_range(kind):
    images, captions, owners = make_sets(kind, 8, 12, 12, seed=3)  # matched by scipy
    full = similarity.score_matrix(images, captions)
    bounded, _ = similarity.rank_preserving_scores(images, captions, owners)
    assert_same_ranks(full, bounded, owners)


def test_bounds_decide_most_pairs_of_trained_like_sets_and_none_of_collapsed_ones():
    images, captions, owners = make_sets("trained_like", 40, 4, 4, seed=1)
    bounded, fraction = similarity.rank_preserving_scores(images, captions, owners)
    full = similarity.score_matrix(images, captions)
    assert fraction < 0.35  # the rest hold bounds, strictly above their exact scores
    assert (bounded >= full - 1e-6).all()  # every entry is its exact score or a bound above it
    assert (bounded > full + 1e-6).float().mean() > 0.5
    _, random_fraction = similarity.rank_preserving_scores(*make_sets("random", 40, 4, 4, seed=1))
    assert random_fraction > 0.5  # random sets: the bounds rarely decide
    _, collapsed_fraction = similarity.rank_preserving_scores(*make_sets("collapsed", 10, 4, 4))
    assert collapsed_fraction == 1.0  # every score ties with every threshold: all matched


def test_five_fold_metrics_equal_the_full_computation():
    images, captions, owners = make_sets("trained_like", 20, 4, 4, seed=5)
    full = similarity.score_matrix(images, captions)
    bounded, _ = similarity.rank_preserving_scores(images, captions, owners)
    assert evaluate.five_fold_metrics(bounded, owners, fold_size=4) == evaluate.five_fold_metrics(full, owners, fold_size=4)


@pytest.mark.parametrize("method", ["max_pair", "greedy"])
def test_evaluate_model_gives_the_same_results_with_and_without_rank_bounds(monkeypatch, method):
    images, captions, owners = make_sets("trained_like", 30, 4, 4, seed=2)
    encoded = (images, images[:, 0], captions, captions[:, 0], owners)
    monkeypatch.setattr(evaluate, "encode_split", lambda *args: encoded)
    results = {}
    for rank_bounds in (True, False):
        cfg = {"eval": {"method": method, "similarity_options": None, "chunk_size": 8, "rank_bounds": rank_bounds},
               "loss": {"similarity": "max_pair", "similarity_options": {}},
               "train": {"amp": "off"}, "data": {"dataset": "shapes"}, "model": {"set_head": {"type": "slots"}}}
        results[rank_bounds] = evaluate.evaluate_model(None, cfg, None, "cpu")
    assert results[True] == results[False]


def test_other_methods_and_bad_caption_owners_raise():
    images, captions, owners = make_sets("random", 4, 3, 3)
    with pytest.raises(ValueError, match="max_pair and greedy"):
        similarity.rank_preserving_scores(images, captions, owners, "smooth_chamfer")
    with pytest.raises(ValueError, match="caption_to_image"):
        similarity.rank_preserving_scores(images, captions, owners[:-1])
    with pytest.raises(ValueError, match="caption_to_image"):
        similarity.rank_preserving_scores(images, captions, owners + 1)
