"""Set-to-set similarity for set-based image-text retrieval (MaxMatch, ACL 2025; METHOD.md §2).

A set is K L2-normalised embeddings; two sets meet through their K_v x K_t cosine block
C_ab = <v_a, t_b>. Methods (METHOD.md §2):

- ``max_pair``  the paper's Maximal Pair Assignment Similarity: the EXACT maximum-weight
                assignment pi* = argmax_pi sum_a C_{a,pi(a)}; score = mean of the matched cosines
                (option ``score="exp"``: mean of exp(c) - 1 over the matched cosines).
- ``greedy``    repeatedly take the largest remaining entry, strike its row and column.
- ``smooth_chamfer`` (DivE) 1/2 mean_a LSE_b(alpha C)/alpha + 1/2 mean_b LSE_a(alpha C)/alpha.
- ``chamfer``   1/2 mean_a max_b C + 1/2 mean_b max_a C.   ``mil`` (PVSE) max_ab C.
- ``topk``      mean of the k largest entries of C (default k = min(K_v, K_t)).

For ``max_pair`` and ``greedy`` the assignment is found without gradient; the gradient reaches
exactly the matched entries. Unequal set sizes match min(K_v, K_t) pairs.

Exact assignment: for small K every injective map rows -> columns is enumerated as ONE matrix
product (cosine block flattened to K_v*K_t, times a 0/1 matrix with a column per permutation,
then a max); up to K = 9 a dynamic programme over subsets of columns (O(K 2^K) per problem) with
the argmax kept for backtracking, both in plain torch; above that scipy's linear_sum_assignment
(Hungarian / Jonker-Volgenant, O(K^3), one call per block), imported only then. Without scipy the
subset DP serves up to K = 16 and larger blocks raise ImportError saying what to install.
Internally every problem batch is the LAST, contiguous dimension ("batch-last" layout
(G, K_v, K_t, P)), so each step of the torch algorithms is a matrix product or a row copy +
vector add/max over P problems.

Exact RANKS for less: rank_preserving_scores stores, for a pair whose upper bound (mean of the
row maxima of its block, also of the column maxima when square) lies below both scores that
decide its ranks, that bound instead of its exact score; only the other pairs are matched
(METHOD.md §5).

Public: METHODS, pairwise_similarity, score_matrix, rank_preserving_scores, max_pair_assignment,
greedy_assignment, and the two pieces of the bound (upper_bound_sums, rounding_slack) that search.py
reuses. Imports only torch (and the standard library; scipy lazily, see above).
"""
import functools
import itertools
import math
import sys

import torch

METHODS = ("max_pair", "greedy", "smooth_chamfer", "chamfer", "mil", "topk")

# Options each method accepts, with their defaults (None = depends on K).
METHOD_OPTIONS = {
    "max_pair": {"score": "mean"},
    "greedy": {"score": "mean"},
    "smooth_chamfer": {"alpha": 16.0},
    "chamfer": {},
    "mil": {},
    "topk": {"k": None},
}

# Exact max_pair: enumerate permutations while max(K_v, K_t) <= this, subset DP above it.
# Chosen by measurement on 2 CPU cores (benchmarks/similarity_bench.py --algorithms): the
# permutation product wins the score (value only) up to K = 4 and the assignment up to K = 5.
PERMUTATION_MAX_K_SCORE = 4
PERMUTATION_MAX_K_ASSIGNMENT = 5

# Above the permutation range: the subset DP while its table (sum over r of C(K_t, r) * r entries)
# is no larger than at K_v = K_t = SUBSET_DP_MAX_K, scipy's linear_sum_assignment beyond. Measured
# on 2 shared CPU cores (benchmarks/similarity_bench.py, part 1): the DP is ahead up to K = 9
# (both about 3-6 us per block), scipy from K = 10 on (DP 16 us, 120 us at K = 12; scipy 5-8 us).
# Without scipy the DP serves up to TORCH_ONLY_MAX_K (slow but exact; its table is built once).
SUBSET_DP_MAX_K = 9
TORCH_ONLY_MAX_K = 16

# Memory bounds: score_matrix computes cosine chunks of at most CHUNK_BYTES; every reduction
# works on slices whose temporaries stay near SCRATCH_BYTES: bounded at any K and batch size.
# Measured on 2 shared cores: 1 MB slices are faster on an idle machine but up to 25x slower
# when another process competes for a core (too many short parallel ops); 4 MB is robust.
CHUNK_BYTES = 16 * 2**20
SCRATCH_BYTES = 4 * 2**20


def pairwise_similarity(images, captions, method="max_pair", check_finite=True, **options):
    """Differentiable set similarity of every image set with every caption set.

    images (N_img, K_v, D), captions (N_cap, K_t, D), elements L2-normalised.
    Returns (N_img, N_cap). Used in training on one batch (no chunking). check_finite=False
    skips the NaN/inf checks of inputs and scores, each a host-device sync on GPU; a training
    loop that checks its loss itself can skip them.
    """
    options = _resolve_options(method, options)
    _check_sets(images, captions, check_finite)
    cos = _cosine_blocks(images, captions)  # (N_img, K_v, K_t, N_cap)
    scores = _reduce_blocks(cos, method, options, value_only=False)  # (N_img, N_cap)
    if check_finite:
        _check_finite(scores, "similarity scores")
    return scores


def score_matrix(images, captions, method="max_pair", chunk_size=256, progress=False, check_finite=True,
                 **options):
    """The numbers of pairwise_similarity, without gradient, computed chunk by chunk.

    images (N_img, K_v, D), captions (N_cap, K_t, D) on any device. chunk_size image sets are
    scored at a time against caption chunks sized so that a cosine chunk stays under
    CHUNK_BYTES; peak memory is the output (N_img, N_cap) plus that bounded workspace.
    progress=True prints a progress line to stderr. check_finite=False skips the NaN/inf checks
    of inputs and scores, for a caller that checked its inputs already (they dominate the cost
    of scoring a few dozen sets).
    """
    options = _resolve_options(method, options)
    _check_sets(images, captions, check_finite)
    scores = images.new_empty(images.shape[0], captions.shape[0])  # (N_img, N_cap)
    with torch.no_grad():
        for i0, c0, cos in _cosine_chunks(images, captions, chunk_size, progress and f"score_matrix {method}"):
            scores[i0:i0 + cos.shape[0], c0:c0 + cos.shape[3]] = _reduce_blocks(
                cos, method, options, value_only=True)
    if check_finite:
        _check_finite(scores, "similarity scores")
    return scores


def rank_preserving_scores(images, captions, caption_to_image, method="max_pair", chunk_size=256,
                           progress=False, **options):
    """A score matrix that ranks exactly like score_matrix's, with most pairs never matched.

    Retrieval ranks (METHOD.md §5) compare each entry (i, j) with two thresholds only: its row's
    (image i's best ground-truth caption score) and its column's (caption j's own-image score).
    Every assignment's mean is at most the mean of the block's row maxima (and, for square
    blocks, of its column maxima). A non-ground-truth pair whose bound lies below BOTH thresholds
    by more than a rounding slack stores that bound: it stays strictly below both, as its exact
    score does, so it counts the same under either tie rule. Every other pair, ground truth
    included, gets the exact score that score_matrix computes from the same cosine chunk.

    images (N_img, K_v, D), captions (N_cap, K_t, D); caption_to_image (N_cap,) the image index
    of every caption; method max_pair or greedy (with their options; `score="exp"` is monotone in
    each matched cosine, so the bound carries over). Returns (scores (N_img, N_cap), the fraction
    of pairs scored exactly). Only ranks are exact: use score_matrix where the values matter.
    """
    if method not in ("max_pair", "greedy"):
        raise ValueError(f"rank_preserving_scores bounds max_pair and greedy only, got {method!r}")
    options = _resolve_options(method, options)
    _check_sets(images, captions)
    n_img, k_v, _ = images.shape
    n_cap, k_t, _ = captions.shape
    owners = torch.as_tensor(caption_to_image).to(images.device, torch.long)
    if owners.shape != (n_cap,) or (n_cap and not 0 <= int(owners.min()) <= int(owners.max()) < n_img):
        raise ValueError(f"caption_to_image must be ({n_cap},) image indices in [0, {n_img})")
    k_min = min(k_v, k_t)
    with torch.no_grad():
        # Thresholds from a separate pass over the ground-truth pairs: they may differ from the
        # chunks' values by rounding, which the slack absorbs. Cuts are in units of matched sums.
        column_threshold = _ground_truth_scores(images, captions, owners, method, options)  # (N_cap,)
        row_threshold = column_threshold.new_full((n_img,), -math.inf).scatter_reduce(
            0, owners, column_threshold, reduce="amax")  # (N_img,)
        slack = rounding_slack(_largest_cosine(images, captions), images.dtype, options["score"])
        row_cut, column_cut = (k_min * (t - slack) for t in (row_threshold, column_threshold))
        chunk_size = max(1, int(chunk_size))  # the image chunks of _cosine_chunks
        scores = images.new_empty(n_img, n_cap)  # (N_img, N_cap)
        pending = _PendingExactScores(scores, method, options)
        ground_truth_c0 = None
        for i0, c0, cos in _cosine_chunks(images, captions, chunk_size,
                                          progress and f"rank_preserving_scores {method}"):
            i1, c1 = i0 + cos.shape[0], c0 + cos.shape[3]
            if c0 != ground_truth_c0:  # a new caption chunk: its ground-truth pairs by image chunk
                ground_truth, ground_truth_c0 = _ground_truth_by_image_chunk(owners[c0:c1], chunk_size), c0
            bound = upper_bound_sums(cos, options["score"])  # (n, m)
            undecided = bound >= torch.minimum(row_cut[i0:i1, None], column_cut[None, c0:c1])  # (n, m)
            if i0 // chunk_size in ground_truth:  # ground-truth pairs: always exact
                gt_rows, gt_cols = ground_truth[i0 // chunk_size]
                undecided[gt_rows - i0, gt_cols] = True
            torch.div(bound, k_min, out=scores[i0:i1, c0:c1])
            rows, cols = undecided.nonzero().unbind(1)  # (u,), (u,)
            if rows.numel():
                pending.add(rows + i0, cols + c0, cos[rows, :, :, cols])  # (u, K_v, K_t)
        pending.flush()
    _check_finite(scores, "similarity scores")
    return scores, pending.count / max(1, n_img * n_cap)


def max_pair_assignment(cos):
    """Exact maximum-weight assignment of every cosine block.

    cos (..., K_v, K_t) with K_v <= K_t. Returns LongTensor (..., K_v): the column matched to
    each row; the columns of one block are distinct and maximise the sum of matched entries.
    """
    return _blocks_to_batch_last(cos, _max_pair_assignment_batch_last)


def greedy_assignment(cos):
    """Greedy assignment: repeatedly match the largest remaining entry (first in row-major order
    on ties) and strike its row and column. cos (..., K_v, K_t), K_v <= K_t -> (..., K_v)."""
    return _blocks_to_batch_last(cos, _greedy_assignment_batch_last)


def upper_bound_sums(cos, score="mean"):
    """Upper bound of every assignment's matched SUM of the batch-last cosine blocks (n, K_v, K_t, m)
    -> (n, m): the sum of the maxima of the smaller side's rows (each is matched once; both sides,
    and the smaller bound, when square), through expm1 for score="exp". Divided by min(K_v, K_t) it
    bounds the max_pair and greedy scores from above (METHOD.md §5); any strides work."""
    k_v, k_t = cos.shape[1:3]
    transform = torch.expm1 if score == "exp" else (lambda x: x)
    bounds = []
    if k_v <= k_t:
        bounds.append(transform(cos.amax(2)).sum(1))  # rows matched once each
    if k_t <= k_v:
        bounds.append(transform(cos.amax(1)).sum(1))  # columns matched once each
    return bounds[0] if len(bounds) == 1 else torch.minimum(*bounds)


def rounding_slack(largest_cosine, dtype=torch.float32, score="mean"):
    """How far apart two float computations of one score (in different summation orders, from
    different matrix products) can plausibly be: a relative 1e-5 (at least 64 units of the dtype's
    rounding) of the largest possible matched term, given an upper bound of every |cosine|."""
    term = math.expm1(min(largest_cosine, 80.0)) if score == "exp" else largest_cosine
    return max(1e-5, 64 * torch.finfo(dtype).eps) * max(1.0, term)


# ----------------------------------------------------------------------------------------------
# Helpers: checks and layout
# ----------------------------------------------------------------------------------------------


def _resolve_options(method, options):
    """Validate the method name and its options; return the options with defaults filled in."""
    if method not in METHOD_OPTIONS:
        raise ValueError(f"unknown similarity method {method!r}; valid methods: {', '.join(METHODS)}")
    allowed = METHOD_OPTIONS[method]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method {method!r}; valid options: {sorted(allowed) or 'none'}"
        )
    resolved = {**allowed, **options}
    if "score" in resolved and resolved["score"] not in ("mean", "exp"):
        raise ValueError(f"option score must be 'mean' or 'exp', got {resolved['score']!r}")
    if "alpha" in resolved and not resolved["alpha"] > 0:
        raise ValueError(f"option alpha must be > 0, got {resolved['alpha']!r}")
    return resolved


def _check_sets(images, captions, check_finite=True):
    if images.dim() != 3 or captions.dim() != 3 or images.shape[2] != captions.shape[2]:
        raise ValueError(
            f"expected images (N_img, K_v, D) and captions (N_cap, K_t, D), got "
            f"{tuple(images.shape)} and {tuple(captions.shape)}"
        )
    if check_finite:
        _check_finite(images, "image set embeddings")
        _check_finite(captions, "caption set embeddings")


def _check_finite(tensor, what):
    """Raise on NaN or +-inf. min and max propagate NaN: two fast reductions, no bool tensor."""
    if tensor.numel() and not torch.isfinite(torch.stack(torch.aminmax(tensor.detach()))).all():
        raise ValueError(f"non-finite values (NaN or inf) in {what}: cosines would be meaningless")


def _cosine_blocks(images, captions):
    """All cosine blocks, batch-last: (N_img, K_v, D) x (N_cap, K_t, D) -> (N_img, K_v, K_t, N_cap)."""
    n_img, k_v, dim = images.shape
    n_cap, k_t, _ = captions.shape
    caption_rows = captions.transpose(0, 1).reshape(k_t * n_cap, dim)  # (K_t*N_cap, D)
    return (images.reshape(n_img * k_v, dim) @ caption_rows.T).view(n_img, k_v, k_t, n_cap)


def _blocks_to_batch_last(cos, assign_batch_last):
    """Run a batch-last assignment on blocks (..., K_v, K_t); return (..., K_v)."""
    if cos.dim() < 2:
        raise ValueError(f"expected cosine blocks (..., K_v, K_t), got shape {tuple(cos.shape)}")
    k_v, k_t = cos.shape[-2:]
    if k_v > k_t:
        raise ValueError(f"need K_v <= K_t (got {k_v} x {k_t}); pass the transposed blocks")
    _check_finite(cos, "cosine blocks")
    blocks = cos.detach().reshape(-1, k_v, k_t)  # (P, K_v, K_t)
    columns = torch.empty(blocks.shape[0], k_v, dtype=torch.long, device=cos.device)  # (P, K_v)
    step = max(1, SCRATCH_BYTES // (4 * k_v * k_t * cos.element_size()))  # cache-sized pieces
    with torch.no_grad():
        for start in range(0, blocks.shape[0], step):
            piece = blocks[start:start + step].permute(1, 2, 0).unsqueeze(0)  # (1, K_v, K_t, p), a view
            assign_batch_last(_as_float(piece), out=columns[start:start + step].unsqueeze(0))
    return columns.view(*cos.shape[:-2], k_v)


def _as_float(tensor):
    """Half precision sums of K cosines can tie or misorder; match in float32 at least."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _problem_slices(num_groups, num_problems, bytes_per_problem, budget=None):
    """Split a (G, ..., P) batch into (group slice, problem slice) pieces of about budget bytes
    (default SCRATCH_BYTES)."""
    budget = budget or SCRATCH_BYTES
    per_group = max(1, num_problems) * bytes_per_problem
    if per_group <= budget:
        step = max(1, budget // per_group)
        for g0 in range(0, num_groups, step):
            yield slice(g0, min(num_groups, g0 + step)), slice(None)
    else:
        step = max(1, budget // bytes_per_problem)
        for g in range(num_groups):
            for p0 in range(0, num_problems, step):
                yield slice(g, g + 1), slice(p0, min(num_problems, p0 + step))


def _first_argmax(values, dim):
    """(index of the first maximum along dim as a LongTensor, the maximum) of values.

    Built from amax and a comparison, which run vectorised across the contiguous last dimension;
    torch's argmax / max(dim) over a middle dimension are several times slower on CPU.
    """
    size = values.shape[dim]
    dtype = torch.uint8 if size < 256 else torch.int32
    shape = [1] * values.dim()
    shape[dim] = size
    rank = torch.arange(size, 0, -1, dtype=dtype, device=values.device).view(shape)  # first = largest
    best = values.amax(dim, keepdim=True)
    is_best = values >= best  # the same as ==, and faster
    is_best = is_best.view(torch.uint8) if dtype == torch.uint8 else is_best.to(dtype)
    first = size - (is_best * rank).amax(dim).to(torch.long)
    return first, best.squeeze(dim)


# ----------------------------------------------------------------------------------------------
# Helpers: reduction of cosine blocks (G, K_v, K_t, P) -> scores (G, P)
# ----------------------------------------------------------------------------------------------


def _reduce_blocks(cos, method, options, value_only):
    """Score every batch-last cosine block (G, K_v, K_t, P) -> (G, P)."""
    if method in ("max_pair", "greedy"):
        if cos.shape[1] > cos.shape[2]:
            cos = cos.transpose(1, 2)  # match the smaller side: (G, K_min, K_max, P)
        if method == "max_pair" and value_only and options["score"] == "mean":
            return _max_pair_value_batch_last(_as_float(cos)).to(cos.dtype) / cos.shape[1]
        assign = _max_pair_assignment_batch_last if method == "max_pair" else _greedy_assignment_batch_last
        with torch.no_grad():
            columns = assign(_as_float(cos.detach()))  # (G, P, K_min)
        matched = cos.gather(2, columns.transpose(1, 2).unsqueeze(2)).squeeze(2)  # (G, K_min, P)
        return matched.mean(1) if options["score"] == "mean" else torch.expm1(matched).mean(1)
    if method == "smooth_chamfer":
        alpha = float(options["alpha"])
        scaled = alpha * cos
        return 0.5 * (torch.logsumexp(scaled, 2).mean(1) + torch.logsumexp(scaled, 1).mean(1)) / alpha
    if method == "chamfer":
        return 0.5 * (cos.amax(2).mean(1) + cos.amax(1).mean(1))
    if method == "mil":
        return cos.amax(dim=(1, 2))
    if method == "topk":
        k = min(cos.shape[1], cos.shape[2]) if options["k"] is None else options["k"]
        if not 1 <= k <= cos.shape[1] * cos.shape[2]:
            raise ValueError(f"option k must be in [1, K_v*K_t], got {k}")
        return cos.flatten(1, 2).topk(int(k), dim=1).values.mean(1)
    raise AssertionError(method)


def _uses_permutations(k_v, k_t, assignment):
    return max(k_v, k_t) <= (PERMUTATION_MAX_K_ASSIGNMENT if assignment else PERMUTATION_MAX_K_SCORE)


def _max_pair_value_batch_last(cos):
    """Maximum assignment SUM of every block: (G, K_v, K_t, P), K_v <= K_t -> (G, P)."""
    groups, k_v, k_t, problems = cos.shape
    if not _uses_permutations(k_v, k_t, assignment=False) and not _uses_subset_dp(k_v, k_t):
        columns = _scipy_assignment_batch_last(cos)  # (G, P, K_v)
        return cos.gather(2, columns.permute(0, 2, 1).unsqueeze(2)).squeeze(2).sum(1)
    out = cos.new_empty(groups, problems)
    if _uses_permutations(k_v, k_t, assignment=False):
        maps = _injective_map_matrix(k_v, k_t, cos.device, cos.dtype)  # (M, K_v*K_t)
        for g, p in _problem_slices(groups, problems, maps.shape[0] * cos.element_size()):
            out[g, p] = _map_sums(maps, cos[g, :, :, p]).amax(1)
        return out
    tables = _subset_tables(k_v, k_t, cos.device)
    per_problem = _dp_bytes_per_problem(tables, cos)
    for g, p in _problem_slices(groups, problems, per_problem, max(SCRATCH_BYTES, 16 * per_problem)):
        best = _subset_dp(_problems_last(cos[g, :, :, p]), tables)[-1]  # (L, n)
        out[g, p] = best.amax(0).view(out[g, p].shape)
    return out


def _max_pair_assignment_batch_last(cos, out=None):
    """Exact assignment of every block: (G, K_v, K_t, P), K_v <= K_t -> columns (G, P, K_v)
    (written into out if given)."""
    groups, k_v, k_t, problems = cos.shape
    if not _uses_permutations(k_v, k_t, assignment=True) and not _uses_subset_dp(k_v, k_t):
        return _scipy_assignment_batch_last(cos, out)
    columns = out if out is not None else cos.new_empty(groups, problems, k_v, dtype=torch.long)
    if _uses_permutations(k_v, k_t, assignment=True):
        maps = _injective_map_matrix(k_v, k_t, cos.device, cos.dtype)  # (M, K_v*K_t)
        map_columns = _injective_map_columns(k_v, k_t, cos.device)  # (M, K_v)
        for g, p in _problem_slices(groups, problems, maps.shape[0] * cos.element_size()):
            best_map = _first_argmax(_map_sums(maps, cos[g, :, :, p]), 1)[0]  # (g, p)
            torch.index_select(map_columns, 0, best_map.flatten(), out=columns[g, p].view(-1, k_v))
        return columns
    tables = _subset_tables(k_v, k_t, cos.device)
    per_problem = _dp_bytes_per_problem(tables, cos)
    for g, p in _problem_slices(groups, problems, per_problem, max(SCRATCH_BYTES, 16 * per_problem)):
        block = _problems_last(cos[g, :, :, p])  # (K_v, K_t, n)
        layers = _subset_dp(block, tables)
        position = _first_argmax(layers[-1], 0)[0]  # (n,): the best final column subset
        slice_columns = torch.empty(position.shape[0], k_v, dtype=torch.long, device=cos.device)  # (n, K_v)
        for row in range(k_v - 1, -1, -1):
            # Backtrack: recompute the r candidates of the chosen subset (bit-identical to the
            # forward pass) and follow the first that reaches its best value.
            prev, col = tables[row]  # (L_r, r): predecessor subset and column of each choice
            prev_positions, choice_columns = prev.index_select(0, position), col.index_select(0, position)  # (n, r)
            before = layers[row - 1] if row else block.new_zeros(1, position.shape[0])  # (L_{r-1}, n)
            candidates = before.gather(0, prev_positions.T) + block[row].gather(0, choice_columns.T)  # (r, n)
            choice = _first_argmax(candidates, 0)[0].unsqueeze(1)  # (n, 1)
            slice_columns[:, row] = choice_columns.gather(1, choice).squeeze(1)
            position = prev_positions.gather(1, choice).squeeze(1)
        columns[g, p] = slice_columns.view(columns[g, p].shape)
    return columns


def _map_sums(maps, blocks):
    """maps (M, K_v*K_t) x blocks (g, K_v, K_t, p) -> (g, M, p): the sum of every injective map.
    One group goes through a plain matrix product, which reads a transposed view without a copy."""
    flat = blocks.flatten(1, 2)  # (g, K_v*K_t, p)
    return (maps @ flat[0]).unsqueeze(0) if flat.shape[0] == 1 else maps @ flat


def _problems_last(blocks):
    """(g, K_v, K_t, p) -> contiguous (K_v, K_t, n = g*p): every DP step is then a row operation."""
    return blocks.permute(1, 2, 0, 3).reshape(blocks.shape[1], blocks.shape[2], -1).contiguous()


def _dp_bytes_per_problem(tables, cos):
    """Scratch of the subset DP per problem: the widest candidate layer twice, plus every layer."""
    widest = max(prev.numel() for prev, _ in tables)
    return (2 * widest + sum(prev.shape[0] for prev, _ in tables)) * cos.element_size()


def _subset_dp(cos, tables):
    """DP over column subsets: best[S] = best sum matching rows 0..|S|-1 to the columns of S.

    cos (K_v, K_t, n). Layer r holds every r-subset S of columns:
    best_r[S] = max_{j in S} best_{r-1}[S - j] + C[r-1, j]. Returns [best_1, ..., best_{K_v}],
    best_r (C(K_t, r), n).
    """
    best = cos.new_zeros(1, cos.shape[2])  # (1, n): the empty subset
    layers = []
    for row, (prev, col) in enumerate(tables):
        candidates = best.index_select(0, prev.flatten())  # (L_r * r, n)
        candidates += cos[row].index_select(0, col.flatten())
        best = candidates.view(*prev.shape, -1).amax(1)  # (L_r, n)
        layers.append(best)
    return layers


@functools.lru_cache(maxsize=None)
def _injective_maps(k_v, k_t):
    """Every injective map rows -> columns, as LongTensor (M, K_v), M = K_t! / (K_t - K_v)!."""
    return torch.tensor(list(itertools.permutations(range(k_t), k_v)), dtype=torch.long).view(-1, k_v)


@functools.lru_cache(maxsize=None)
def _injective_map_columns(k_v, k_t, device):
    """_injective_maps on `device`, uploaded once per device (not at every training step)."""
    return _injective_maps(k_v, k_t).to(device)


@functools.lru_cache(maxsize=None)
def _injective_map_matrix(k_v, k_t, device, dtype):
    """0/1 matrix (M, K_v*K_t): row m picks the entries (a, map_m(a)) of a flattened block."""
    maps = _injective_maps(k_v, k_t)
    matrix = torch.zeros(maps.shape[0], k_v, k_t, dtype=dtype)
    matrix.scatter_(2, maps.unsqueeze(2), 1.0)
    return matrix.flatten(1).to(device)


@functools.lru_cache(maxsize=None)
def _subset_tables(k_v, k_t, device):
    """For layer r = 1..K_v: (prev, col), each LongTensor (L_r, r) over the r-subsets of columns
    (L_r = C(K_t, r)): for each subset S and each column j in S, the position of S - j in layer
    r-1 and j itself."""
    layers = [[()]]
    tables = []
    for r in range(1, k_v + 1):
        subsets = list(itertools.combinations(range(k_t), r))
        position = {s: i for i, s in enumerate(layers[-1])}
        prev = [[position[tuple(c for c in s if c != j)] for j in s] for s in subsets]
        tables.append((torch.tensor(prev).view(len(subsets), r).to(device),
                       torch.tensor(subsets).view(len(subsets), r).to(device)))
        layers.append(subsets)
    return tuple(tables)


def _greedy_assignment_batch_last(cos, out=None):
    """Greedy assignment of every block: (G, K_v, K_t, P), K_v <= K_t -> columns (G, P, K_v)
    (written into out if given)."""
    groups, k_v, k_t, problems = cos.shape
    columns = out if out is not None else cos.new_empty(groups, problems, k_v, dtype=torch.long)
    entry_row = torch.arange(k_v * k_t, device=cos.device) // k_t  # (K_v*K_t,) row of a flat entry
    entry_col = torch.arange(k_v * k_t, device=cos.device) % k_t
    for g, p in _problem_slices(groups, problems, 4 * k_v * k_t * cos.element_size()):
        block = _problems_last(cos[g, :, :, p])  # (K_v, K_t, n)
        n = block.shape[2]
        row_penalty = block.new_zeros(k_v, 1, n)  # -inf on struck rows
        col_penalty = block.new_zeros(1, k_t, n)  # -inf on struck columns
        slice_columns = torch.empty(n, k_v, dtype=torch.long, device=cos.device)
        for _ in range(k_v):
            entry = _first_argmax((block + row_penalty + col_penalty).view(k_v * k_t, n), 0)[0]  # (n,)
            row, col = entry_row.index_select(0, entry), entry_col.index_select(0, entry)
            slice_columns.scatter_(1, row.unsqueeze(1), col.unsqueeze(1))
            row_penalty.view(k_v, n).scatter_(0, row.unsqueeze(0), -math.inf)
            col_penalty.view(k_t, n).scatter_(0, col.unsqueeze(0), -math.inf)
        columns[g, p] = slice_columns.view(columns[g, p].shape)
    return columns


# ----------------------------------------------------------------------------------------------
# Helpers: exact assignment above the subset-DP range (scipy, imported lazily)
# ----------------------------------------------------------------------------------------------


def _uses_subset_dp(k_v, k_t):
    """Whether blocks K_v x K_t (K_v <= K_t) are matched by the subset DP rather than scipy:
    by the DP's table size (rectangular blocks included), and beyond the measured crossover only
    when scipy is missing. Raises ImportError when neither can serve."""
    size = _subset_dp_size(k_v, k_t)
    if size <= _subset_dp_size(SUBSET_DP_MAX_K, SUBSET_DP_MAX_K):
        return True
    if _scipy_linear_sum_assignment() is not None:
        return False
    if size <= _subset_dp_size(TORCH_ONLY_MAX_K, TORCH_ONLY_MAX_K):
        return True
    raise ImportError(
        f"exact max_pair matching of {k_v} x {k_t} cosine blocks needs scipy (pip install scipy); "
        f"without it similarity.py matches exactly only up to {TORCH_ONLY_MAX_K} x {TORCH_ONLY_MAX_K}"
    )


def _subset_dp_size(k_v, k_t):
    """Entries of the subset DP's tables for K_v x K_t blocks: sum over r <= K_v of C(K_t, r) * r."""
    return sum(math.comb(k_t, r) * r for r in range(1, k_v + 1))


def _scipy_linear_sum_assignment():
    """scipy.optimize.linear_sum_assignment, or None when scipy is not installed."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        return None
    return linear_sum_assignment


def _scipy_assignment_batch_last(cos, out=None):
    """Exact assignment of every block with scipy (one call per block, in float64 on the CPU):
    (G, K_v, K_t, P), K_v <= K_t -> columns (G, P, K_v) (written into out if given)."""
    linear_sum_assignment = _scipy_linear_sum_assignment()
    groups, k_v, k_t, problems = cos.shape
    blocks = cos.permute(0, 3, 1, 2).to("cpu", torch.float64).numpy()  # (G, P, K_v, K_t)
    found = torch.empty(groups, problems, k_v, dtype=torch.long)
    found_view = found.numpy()  # shares memory: scipy's answers land in the tensor
    for g in range(groups):
        for p in range(problems):
            found_view[g, p] = linear_sum_assignment(blocks[g, p], maximize=True)[1]  # rows come sorted
    columns = found.to(cos.device)
    if out is None:
        return columns
    out.copy_(columns)
    return out


# ----------------------------------------------------------------------------------------------
# Helpers: rank_preserving_scores
# ----------------------------------------------------------------------------------------------


def _cosine_chunks(images, captions, chunk_size, progress_label=None):
    """Yield (i0, c0, cos) over the whole gallery, caption chunks outside, image chunks inside.

    cos (n, K_v, K_t, m) is the cosine block of images[i0:i0+n] with captions[c0:c0+m], batch-last,
    in one buffer that the next chunk overwrites (no page faults): use it before the next step.
    n <= chunk_size; m is sized so that a chunk stays under CHUNK_BYTES. A progress_label prints a
    progress line to stderr.
    """
    n_img, k_v, dim = images.shape
    n_cap, k_t, _ = captions.shape
    chunk_size = max(1, int(chunk_size))
    caption_chunk = _caption_chunk(images, chunk_size, k_t, n_cap)
    cos_buffer = images.new_empty(min(chunk_size, n_img) * k_v * k_t * caption_chunk)
    total, done = math.ceil(n_cap / caption_chunk) * math.ceil(n_img / chunk_size), 0
    for c0 in range(0, n_cap, caption_chunk):
        c1 = min(n_cap, c0 + caption_chunk)
        # Caption elements ordered (K_t, m): a cosine chunk comes out batch-last.
        caption_rows = captions[c0:c1].transpose(0, 1).reshape(k_t * (c1 - c0), dim)  # (K_t*m, D)
        for i0 in range(0, n_img, chunk_size):
            i1 = min(n_img, i0 + chunk_size)
            image_rows = images[i0:i1].reshape((i1 - i0) * k_v, dim)  # (n*K_v, D)
            cos = cos_buffer[: (i1 - i0) * k_v * k_t * (c1 - c0)].view((i1 - i0) * k_v, k_t * (c1 - c0))
            torch.matmul(image_rows, caption_rows.T, out=cos)
            yield i0, c0, cos.view(i1 - i0, k_v, k_t, c1 - c0)  # (n, K_v, K_t, m)
            done += 1
            if progress_label:
                print(f"\r{progress_label}: chunk {done}/{total}", end="", file=sys.stderr)
    if progress_label:
        print(file=sys.stderr)


def _caption_chunk(images, chunk_size, k_t, n_cap):
    """Caption sets per cosine chunk: a (chunk_size, K_v, K_t, m) chunk stays under CHUNK_BYTES."""
    n_img, k_v, _ = images.shape
    caption_chunk = max(1, CHUNK_BYTES // (images.element_size() * min(chunk_size, n_img) * k_v * k_t))
    return min(caption_chunk, n_cap)


def _ground_truth_by_image_chunk(owners, chunk_size):
    """{image chunk index: (image indices, caption positions in this caption chunk)} of the
    ground-truth pairs of one caption chunk, owners (m,)."""
    chunk_of = owners // chunk_size  # (m,)
    order = chunk_of.argsort()
    counts = torch.bincount(chunk_of).tolist()
    groups, start = {}, 0
    for index, count in enumerate(counts):
        if count:
            positions = order[start:start + count]
            groups[index] = (owners[positions], positions)
        start += count
    return groups


class _PendingExactScores:
    """Blocks still to be matched exactly, batched across chunks (fewer, larger reductions) and
    written into scores when about SCRATCH_BYTES * 16 of them are waiting, or at flush()."""

    def __init__(self, scores, method, options):
        self.scores, self.method, self.options = scores, method, options
        self.rows, self.cols, self.blocks, self.bytes, self.count = [], [], [], 0, 0

    def add(self, rows, cols, blocks):
        self.rows.append(rows)
        self.cols.append(cols)
        self.blocks.append(blocks)
        self.bytes += blocks.numel() * blocks.element_size()
        self.count += rows.numel()
        if self.bytes >= 16 * SCRATCH_BYTES:
            self.flush()

    def flush(self):
        if not self.rows:
            return
        blocks = torch.cat(self.blocks).permute(1, 2, 0).unsqueeze(0)  # (1, K_v, K_t, u)
        values = _reduce_blocks(blocks, self.method, self.options, value_only=True)[0]  # (u,)
        self.scores[torch.cat(self.rows), torch.cat(self.cols)] = values
        self.rows, self.cols, self.blocks, self.bytes = [], [], [], 0


def _ground_truth_scores(images, captions, owners, method, options):
    """The exact score of every caption with its own image: (N_cap,), in pieces of bounded memory."""
    n_cap, k_t, dim = captions.shape
    k_v = images.shape[1]
    piece = max(1, CHUNK_BYTES // (images.element_size() * (k_v + k_t) * dim))
    scores = captions.new_empty(n_cap)
    for j0 in range(0, n_cap, piece):
        j1 = min(n_cap, j0 + piece)
        cos = torch.bmm(images[owners[j0:j1]], captions[j0:j1].transpose(1, 2))  # (p, K_v, K_t)
        scores[j0:j1] = _reduce_blocks(cos.permute(1, 2, 0).unsqueeze(0), method, options, value_only=True)[0]
    return scores


def _largest_cosine(images, captions):
    """An upper bound of every |cosine| between the elements: the product of the largest norms."""
    return (images.norm(dim=-1).max() * captions.norm(dim=-1).max()).item() if images.numel() else 1.0
