"""Tests of similarity.py: exactness of max_pair (brute force, scipy), gradient rule, every other
method against a naive loop, chunked score_matrix against pairwise_similarity, input checks."""
import itertools
import sys

import pytest
import torch

import similarity

K_RANGE_BRUTE_FORCE = range(1, 8)


def brute_force_best_sum(block):
    """Max over every injective map of the smaller side into the larger (itertools.permutations)
    of the matched sum."""
    if block.shape[0] > block.shape[1]:
        block = block.T
    k_v, k_t = block.shape
    rows = block.tolist()
    return max(sum(rows[a][p[a]] for a in range(k_v)) for p in itertools.permutations(range(k_t), k_v))


def matched_sum(block, columns):
    return block[torch.arange(block.shape[0]), columns].sum().item()


def make_blocks(kind, count, k_v, k_t, seed=0):
    """(count, K_v, K_t) float64 cosine blocks of one kind."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.rand(count, k_v, k_t, generator=g, dtype=torch.float64) * 2 - 1
    if kind == "tied":  # few distinct values: many optimal assignments
        return torch.randint(0, 2, (count, k_v, k_t), generator=g).double() / 2
    if kind == "negative":
        return -torch.rand(count, k_v, k_t, generator=g, dtype=torch.float64)
    if kind == "constant":
        return torch.full((count, k_v, k_t), 0.3, dtype=torch.float64)
    raise ValueError(kind)


def blocks_as_sets(blocks):
    """Sets whose cosine blocks are `blocks`: image i = identity rows, caption i = block^T.

    blocks (N, K_v, K_t) -> images (N, K_v, K_v), captions (N, K_t, K_v); only the diagonal
    (image i, caption i) pairs of a score matrix reproduce blocks[i]."""
    n, k_v, k_t = blocks.shape
    images = torch.eye(k_v, dtype=blocks.dtype).expand(n, k_v, k_v).clone()
    return images, blocks.transpose(1, 2).clone()


@pytest.fixture(params=["permutations", "subset_dp"])
def algorithm(request, monkeypatch):
    """Run a test once with the permutation product and once with the subset DP."""
    limit = 99 if request.param == "permutations" else 0
    monkeypatch.setattr(similarity, "PERMUTATION_MAX_K_SCORE", limit)
    monkeypatch.setattr(similarity, "PERMUTATION_MAX_K_ASSIGNMENT", limit)
    return request.param


@pytest.mark.parametrize("kind", ["random", "tied", "negative", "constant"])
@pytest.mark.parametrize("k", K_RANGE_BRUTE_FORCE)
def test_max_pair_assignment_sum_equals_brute_force(k, kind, algorithm):
    blocks = make_blocks(kind, 12, k, k, seed=k)
    columns = similarity.max_pair_assignment(blocks)
    assert columns.shape == (12, k) and columns.dtype == torch.long
    for block, cols in zip(blocks, columns):
        assert sorted(cols.tolist()) == list(range(k))  # a valid permutation
        assert matched_sum(block, cols) == pytest.approx(brute_force_best_sum(block), abs=1e-12)


@pytest.mark.parametrize("shape", [(1, 3), (2, 5), (3, 4), (4, 7), (2, 2)])
def test_max_pair_assignment_rectangular_equals_brute_force(shape, algorithm):
    k_v, k_t = shape
    for kind in ("random", "tied", "negative"):
        blocks = make_blocks(kind, 10, k_v, k_t, seed=k_t)
        columns = similarity.max_pair_assignment(blocks)
        for block, cols in zip(blocks, columns):
            assert len(set(cols.tolist())) == k_v and 0 <= cols.min() and cols.max() < k_t
            assert matched_sum(block, cols) == pytest.approx(brute_force_best_sum(block), abs=1e-12)


@pytest.mark.parametrize("kind", ["random", "tied", "negative", "constant"])
@pytest.mark.parametrize("shape", [(k, k) for k in K_RANGE_BRUTE_FORCE] + [(2, 5), (3, 4), (5, 3), (6, 2)])
def test_max_pair_scores_equal_brute_force_mean(shape, kind, algorithm):
    blocks = make_blocks(kind, 6, *shape, seed=sum(shape))
    images, captions = blocks_as_sets(blocks)
    expected = torch.tensor([brute_force_best_sum(b) / min(shape) for b in blocks], dtype=torch.float64)
    trained = similarity.pairwise_similarity(images, captions).diagonal()
    evaluated = similarity.score_matrix(images, captions, chunk_size=4).diagonal()  # value-only path
    torch.testing.assert_close(trained, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(evaluated, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", range(8, 17))
def test_subset_dp_equals_scipy_up_to_the_torch_only_limit(k, monkeypatch):
    scipy_optimize = pytest.importorskip("scipy.optimize")
    monkeypatch.setattr(similarity, "SUBSET_DP_MAX_K", 16)  # the DP even where scipy is faster
    monkeypatch.setattr(similarity, "SCRATCH_BYTES", 2**18)  # K >= 10: several DP slices
    blocks = make_blocks("random", 20 if k > 12 else 40, k, k, seed=k)
    columns = similarity.max_pair_assignment(blocks)
    for block, cols in zip(blocks, columns):
        rows, ref_cols = scipy_optimize.linear_sum_assignment(block.numpy(), maximize=True)
        assert sorted(cols.tolist()) == list(range(k))
        # random float64 blocks: the optimum is unique, so the assignment itself must match
        assert cols.tolist() == ref_cols.tolist()
    images, captions = blocks_as_sets(blocks[:4])
    expected = torch.tensor([b[torch.arange(k), c].mean().item() for b, c in zip(blocks[:4], columns)],
                            dtype=torch.float64)
    evaluated = similarity.score_matrix(images, captions).diagonal()
    torch.testing.assert_close(evaluated, expected, rtol=0, atol=1e-12)


def reference_best_sum(block):
    """Optimal matched sum by scipy's sparse LAPJVsp solver (min_weight_full_bipartite_matching),
    an implementation independent of the linear_sum_assignment that similarity.py calls."""
    csgraph = pytest.importorskip("scipy.sparse.csgraph")
    sparse = pytest.importorskip("scipy.sparse")
    if block.shape[0] > block.shape[1]:
        block = block.T
    weights = (block.max() + 1 - block).numpy()  # positive costs: every entry stays an edge
    rows, cols = csgraph.min_weight_full_bipartite_matching(sparse.csr_matrix(weights))
    return block[rows, cols].sum().item()


@pytest.mark.parametrize("shape", [(17, 17), (24, 24), (32, 32), (64, 64), (20, 36), (36, 20)])
def test_max_pair_above_the_dp_range_equals_an_independent_solver(shape):
    pytest.importorskip("scipy.optimize")
    count = 3 if shape == (64, 64) else 6
    for kind in ("random", "tied"):
        blocks = make_blocks(kind, count, *shape, seed=sum(shape))
        expected = torch.tensor([reference_best_sum(b) / min(shape) for b in blocks], dtype=torch.float64)
        images, captions = blocks_as_sets(blocks)
        torch.testing.assert_close(similarity.score_matrix(images, captions).diagonal(), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(similarity.pairwise_similarity(images, captions).diagonal(), expected,
                                   rtol=0, atol=1e-12)
        wide = blocks if shape[0] <= shape[1] else blocks.transpose(1, 2)
        columns = similarity.max_pair_assignment(wide)
        for block, cols in zip(wide, columns):
            assert len(set(cols.tolist())) == min(shape)
        sums = torch.stack([b[torch.arange(min(shape)), c].sum() for b, c in zip(wide, columns)])
        torch.testing.assert_close(sums / min(shape), expected, rtol=0, atol=1e-12)


def test_max_pair_recovers_a_planted_matching_at_k_64():
    k = 64
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(1))
    blocks = make_blocks("random", 2, k, k, seed=3) * 0.1 + torch.eye(k, dtype=torch.float64)[perm]
    assert torch.equal(similarity.max_pair_assignment(blocks), perm.expand(2, k))


def test_without_scipy_the_dp_serves_up_to_16_and_larger_blocks_name_the_package(monkeypatch):
    blocks = make_blocks("random", 3, 12, 12, seed=12)
    expected = torch.tensor([reference_best_sum(b) / 12 for b in blocks], dtype=torch.float64)
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # `from scipy.optimize import ...` fails
    images, captions = blocks_as_sets(blocks)
    torch.testing.assert_close(similarity.score_matrix(images, captions).diagonal(), expected, rtol=0, atol=1e-12)
    large = make_blocks("random", 2, 17, 17)
    with pytest.raises(ImportError, match=r"17 x 17.*pip install scipy"):
        similarity.max_pair_assignment(large)
    thin = make_blocks("random", 2, 3, 40)  # a small DP table although K_t = 40
    images, captions = blocks_as_sets(thin)
    torch.testing.assert_close(similarity.pairwise_similarity(images, captions).diagonal(),
                               torch.tensor([brute_force_best_sum(b) / 3 for b in thin], dtype=torch.float64))
    images, captions = blocks_as_sets(make_blocks("random", 2, 10, 40))
    with pytest.raises(ImportError, match=r"10 x 40.*pip install scipy"):
        similarity.pairwise_similarity(images, captions)


def test_max_pair_float32_value_matches_float64_optimum(algorithm):
    blocks = make_blocks("random", 200, 6, 6, seed=3)
    columns = similarity.max_pair_assignment(blocks.float())
    for block, cols in zip(blocks, columns):
        assert matched_sum(block, cols) == pytest.approx(brute_force_best_sum(block), abs=1e-5)


def test_max_pair_assignment_keeps_batch_shape_and_rejects_tall_blocks():
    blocks = make_blocks("random", 6, 3, 4).view(2, 3, 3, 4)
    assert similarity.max_pair_assignment(blocks).shape == (2, 3, 3)
    with pytest.raises(ValueError, match="K_v <= K_t"):
        similarity.max_pair_assignment(blocks.transpose(-1, -2))


@pytest.mark.parametrize("method", ["max_pair", "greedy"])
@pytest.mark.parametrize("score", ["mean", "exp"])
def test_gradient_reaches_exactly_the_matched_entries(method, score):
    k = 5
    blocks = make_blocks("random", 8, k, k, seed=11)
    images, captions = blocks_as_sets(blocks)
    captions.requires_grad_(True)  # d score / d captions[i, b, a] = d score / d C_ab
    similarity.pairwise_similarity(images, captions, method, score=score).diagonal().sum().backward()
    block_grad = captions.grad.transpose(1, 2)  # (N, K, K) gradient of each cosine block
    assign = similarity.max_pair_assignment if method == "max_pair" else similarity.greedy_assignment
    for block, grad, cols in zip(blocks, block_grad, assign(blocks)):
        expected = torch.zeros(k, k, dtype=torch.float64)
        matched = block[torch.arange(k), cols]
        expected[torch.arange(k), cols] = 1 / k if score == "mean" else matched.exp() / k
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)


def test_exp_score_is_mean_of_expm1_over_max_sum_assignment():
    blocks = make_blocks("random", 10, 4, 4, seed=5)
    images, captions = blocks_as_sets(blocks)
    got = similarity.pairwise_similarity(images, captions, score="exp").diagonal()
    evaluated = similarity.score_matrix(images, captions, score="exp").diagonal()
    cols = similarity.max_pair_assignment(blocks)
    expected = torch.stack([(b[torch.arange(4), c].exp() - 1).mean() for b, c in zip(blocks, cols)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(evaluated, expected, rtol=0, atol=1e-12)


def naive_greedy_sum(block):
    block = block.clone()
    total, count = 0.0, min(block.shape)
    for _ in range(count):
        flat = int(block.argmax())
        a, b = divmod(flat, block.shape[1])
        total += block[a, b].item()
        block[a, :] = -float("inf")
        block[:, b] = -float("inf")
    return total / count


@pytest.mark.parametrize("k", [2, 4, 6, 9, 24])
def test_greedy_never_beats_exact_and_matches_naive_greedy(k):
    blocks = make_blocks("random", 30 if k < 10 else 4, k, k, seed=k)
    images, captions = blocks_as_sets(blocks)
    greedy = similarity.pairwise_similarity(images, captions, "greedy").diagonal()
    exact = similarity.pairwise_similarity(images, captions, "max_pair").diagonal()
    assert (greedy <= exact + 1e-12).all()
    if k >= 4:
        assert (greedy < exact - 1e-9).any()  # random blocks: greedy is suboptimal somewhere
    torch.testing.assert_close(greedy, torch.tensor([naive_greedy_sum(b) for b in blocks], dtype=torch.float64))


def test_greedy_equals_exact_on_strongly_diagonal_blocks():
    k = 6
    noise = make_blocks("random", 20, k, k, seed=2) * 0.1
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(0))
    blocks = noise + torch.eye(k, dtype=torch.float64)[perm]  # one dominant entry per row and column
    assert torch.equal(similarity.greedy_assignment(blocks), similarity.max_pair_assignment(blocks))
    assert torch.equal(similarity.max_pair_assignment(blocks), perm.expand(20, k))


def naive_score(block, method, alpha=16.0, k=None):
    """One (K_v, K_t) block, element by element with Python loops."""
    k_v, k_t = block.shape
    rows = [[block[a, b].item() for b in range(k_t)] for a in range(k_v)]
    cols = [[rows[a][b] for a in range(k_v)] for b in range(k_t)]
    lse = lambda xs: torch.tensor([alpha * x for x in xs], dtype=torch.float64).logsumexp(0).item() / alpha
    if method == "smooth_chamfer":
        return 0.5 * sum(map(lse, rows)) / k_v + 0.5 * sum(map(lse, cols)) / k_t
    if method == "chamfer":
        return 0.5 * sum(map(max, rows)) / k_v + 0.5 * sum(map(max, cols)) / k_t
    if method == "mil":
        return max(max(r) for r in rows)
    if method == "topk":
        k = k or min(k_v, k_t)
        return sum(sorted((x for r in rows for x in r), reverse=True)[:k]) / k
    if method == "greedy":
        return naive_greedy_sum(block)
    raise ValueError(method)


@pytest.mark.parametrize("method, options", [
    ("smooth_chamfer", {}), ("smooth_chamfer", {"alpha": 3.0}), ("chamfer", {}), ("mil", {}),
    ("topk", {}), ("topk", {"k": 2}), ("greedy", {}),
])
@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (5, 2)])
def test_method_equals_naive_loop(method, options, shape):
    g = torch.Generator().manual_seed(1)
    images = torch.nn.functional.normalize(torch.randn(5, shape[0], 8, generator=g, dtype=torch.float64), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(7, shape[1], 8, generator=g, dtype=torch.float64), dim=-1)
    got = similarity.pairwise_similarity(images, captions, method, **options)
    expected = torch.tensor([[naive_score(v @ t.T, method, **options) for t in captions] for v in images],
                            dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", similarity.METHODS)
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_score_matrix_equals_pairwise_similarity(method, chunk_size, monkeypatch):
    g = torch.Generator().manual_seed(4)
    images = torch.nn.functional.normalize(torch.randn(13, 4, 16, generator=g), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(29, 3, 16, generator=g), dim=-1)
    expected = similarity.pairwise_similarity(images, captions, method)
    got_default = similarity.score_matrix(images, captions, method, chunk_size=chunk_size)
    # small chunks: captions in chunks of 11 (does not divide 29), reductions in many slices
    monkeypatch.setattr(similarity, "CHUNK_BYTES", 4 * 4 * 3 * min(chunk_size, 13) * 11)
    monkeypatch.setattr(similarity, "SCRATCH_BYTES", 2048)
    got_small = similarity.score_matrix(images, captions, method, chunk_size=chunk_size)
    assert not got_default.requires_grad
    torch.testing.assert_close(got_default, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_small, expected, rtol=0, atol=1e-6)


def test_unequal_set_sizes_match_min_pairs_in_either_orientation():
    blocks = make_blocks("random", 5, 3, 6, seed=9)
    images, captions = blocks_as_sets(blocks)  # K_v = 3, K_t = 6
    wide = similarity.pairwise_similarity(images, captions).diagonal()
    tall = similarity.pairwise_similarity(captions, images).diagonal()  # K_v = 6, K_t = 3
    expected = torch.tensor([brute_force_best_sum(b) / 3 for b in blocks], dtype=torch.float64)
    torch.testing.assert_close(wide, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(tall, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [4, 7])
@pytest.mark.parametrize("method", similarity.METHODS)
def test_training_similarity_reads_no_value_on_the_host_without_finiteness_checks(method, k):
    """Meta tensors raise on any host read (.item(), bool(), boolean index): with check_finite=False
    every method, with its gradient, runs without making a GPU wait."""
    images = torch.randn(3, k, 8, device="meta", requires_grad=True)
    captions = torch.randn(6, k, 8, device="meta")
    scores = similarity.pairwise_similarity(images, captions, method=method, check_finite=False)
    scores.sum().backward()
    assert scores.shape == (3, 6) and images.grad.shape == images.shape


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_raise(bad):
    images = torch.nn.functional.normalize(torch.randn(3, 4, 8), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(5, 4, 8), dim=-1)
    broken = captions.clone()
    broken[2, 1, 3] = bad
    for method in similarity.METHODS:
        with pytest.raises(ValueError, match="non-finite"):
            similarity.pairwise_similarity(images, broken, method)
        with pytest.raises(ValueError, match="non-finite"):
            similarity.score_matrix(broken, images, method)
    blocks = torch.rand(4, 3, 3)
    blocks[1, 0, 2] = bad
    with pytest.raises(ValueError, match="non-finite"):
        similarity.max_pair_assignment(blocks)
    with pytest.raises(ValueError, match="non-finite"):
        similarity.greedy_assignment(blocks)


def test_score_matrix_without_finiteness_checks_gives_the_same_scores_and_lets_nan_through():
    images = torch.nn.functional.normalize(torch.randn(7, 4, 8, dtype=torch.float64), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(5, 4, 8, dtype=torch.float64), dim=-1)
    for method in similarity.METHODS:
        checked = similarity.score_matrix(images, captions, method)
        assert torch.equal(similarity.score_matrix(images, captions, method, check_finite=False), checked)
    captions[2, 1, 3] = float("nan")
    unchecked = similarity.score_matrix(images, captions, check_finite=False)
    assert unchecked[:, 2].isnan().all() and unchecked[:, [0, 1, 3, 4]].isfinite().all()


def test_overflowing_cosines_raise():
    images = torch.full((2, 2, 4), 1e30)  # finite inputs whose dot products overflow to inf
    with pytest.raises(ValueError, match="non-finite"):
        similarity.score_matrix(images, images)


def test_unknown_method_or_option_raises_naming_valid_choices():
    sets = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1)
    with pytest.raises(ValueError, match="max_pair, greedy, smooth_chamfer, chamfer, mil, topk"):
        similarity.pairwise_similarity(sets, sets, "hungarian")
    with pytest.raises(ValueError, match="alpha"):
        similarity.score_matrix(sets, sets, "max_pair", alpha=3)
    with pytest.raises(ValueError, match="score"):
        similarity.pairwise_similarity(sets, sets, "max_pair", score="sum")
