"""gallery.SetIndex, the candidates of `search.py query --approximate`: they equal a naive reference
(each element's nearest centroid, the items reached through the probed centroids, the best by the
centroid Chamfer sum), the approximate top k has exact scores for what it returns and is the exact
top k when the budget covers the gallery, an index made for another gallery state is rebuilt with
one line, the command line saves and reuses it, and none of it needs faiss. Also the fixed-
dimensional encodings that benchmarks/search_bench.py evaluates (not shipped): their inner product
against the Chamfer score they approximate."""
import os
import sys

import pytest
import torch

import gallery as gallery_module
import search
from test_search import QUERY, brute_force_top_k, make_gallery, run_search, split_encodings, trained_run  # noqa: F401

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import search_bench  # noqa: E402


@pytest.fixture(scope="module")
def structured():
    """3,000 trained-like sets (K = 4, D = 16, concepts of a bank of 10 plus noise), 6 queries, an index of 32 lists."""
    sets, queries = make_gallery("trained_like", 3000, 4, 4, dim=16, seed=2)
    return sets, queries, gallery_module.build_set_index(sets, lists=32, seed=0)


def test_every_element_is_coded_by_its_nearest_centroid_and_the_lists_hold_each_element_once(structured):
    sets, _, index = structured
    assert index.centroids.shape == (32, 16)
    assert torch.allclose(index.centroids.norm(dim=1), torch.ones(32), atol=1e-5)
    cosines = torch.einsum("nkd,cd->nkc", sets, index.centroids)                       # (N, K, C)
    chosen = cosines.gather(2, index.codes.long().unsqueeze(2)).squeeze(2)
    assert torch.allclose(chosen, cosines.amax(2), atol=1e-6)                           # ties aside, the argmax
    for centroid in range(32):
        owners = index.owners[index.offsets[centroid]:index.offsets[centroid + 1]].long()
        expected = (index.codes == centroid).nonzero()[:, 0]                            # one row per element
        assert torch.equal(owners.sort().values, expected.sort().values)
    assert index.offsets[-1] == 3000 * 4


@pytest.mark.parametrize("budget, probe", [(50, 1), (200, 4), (3000, 2), (10_000, 1)])
def test_candidates_equal_the_naive_centroid_chamfer_ranking_of_the_reached_items(structured, budget, probe):
    sets, queries, index = structured
    for query in queries:
        table = query @ index.centroids.T                                              # (K_q, C)
        probed = set(table.topk(probe, dim=1).indices.reshape(-1).tolist())
        reached = [n for n in range(3000) if probed & set(index.codes[n].tolist())]
        approx = {n: sum(max(table[i, c].item() for c in index.codes[n].tolist()) for i in range(4)) for n in reached}
        found = index.candidates(query, budget, probe)
        assert found.tolist() == sorted(found.tolist())                                # increasing positions
        if budget >= 3000:
            assert found.tolist() == list(range(3000))                                 # the whole gallery
            continue
        assert len(found) == min(budget, len(reached))
        kept = sorted(approx.values(), reverse=True)
        cut = kept[len(found) - 1]
        assert all(n in approx and approx[n] >= cut - 1e-5 for n in found.tolist())  # none worse than the cut
        assert all(approx[n] <= cut + 1e-5 for n in set(reached) - set(found.tolist()))


def test_approximate_results_have_exact_scores_and_find_most_of_the_exact_top_ten(structured):
    sets, queries, index = structured
    overlap = []
    for query in queries:
        found = search.approximate_top_k(query, sets, index, 10, candidates=300, probe=4)
        expected = dict(zip(*brute_force_top_k(query, sets, 3000, "max_pair", {}, "images")))
        assert [score == expected[position].item() for position, score in
                zip(found.positions.tolist(), found.scores.tolist())] == [True] * 10
        assert found.scores.tolist() == sorted(found.scores.tolist(), reverse=True)
        assert found.matched == 300
        overlap.append(len(set(found.positions.tolist()) & set(search.top_k(query, sets, 10).positions.tolist())))
    assert sum(overlap) >= 0.8 * 10 * len(queries)          # 10% of the gallery searched: most of the top 10


@pytest.mark.parametrize("kind", ["trained_like", "tied"])
@pytest.mark.parametrize("gallery_kind", ["images", "captions"])
def test_a_budget_covering_the_gallery_gives_the_exact_top_k_with_ties_in_gallery_order(kind, gallery_kind):
    sets, queries = make_gallery(kind, 400, 4, 4, dim=16, seed=5)
    index = gallery_module.build_set_index(sets, lists=8)
    for query in queries:
        exact = search.top_k(query, sets, 10, gallery_kind=gallery_kind)
        found = search.approximate_top_k(query, sets, index, 10, gallery_kind=gallery_kind, candidates=400)
        assert torch.equal(found.positions, exact.positions) and torch.equal(found.scores, exact.scores)


def test_the_index_is_seeded_and_its_default_lists_are_about_the_square_root_of_the_elements():
    sets, _ = make_gallery("random", 1000, 4, 4, dim=8, seed=1)
    first, second = gallery_module.build_set_index(sets), gallery_module.build_set_index(sets)
    assert first.centroids.shape[0] == 64                                             # sqrt(4000) ~ 63 -> 2^6
    assert torch.equal(first.centroids, second.centroids) and torch.equal(first.codes, second.codes)


def fake_owner(embeds, dim):
    """What Gallery.create reads of a loaded checkpoint, for galleries of synthetic sets."""
    return search.TrainedModel(model=None, cfg={"model": {"num_embeds": embeds, "embed_dim": dim}}, tokenizer=None,
                               device=torch.device("cpu"), method="max_pair", options={}, path="synthetic",
                               fingerprint="synthetic")


def test_an_index_saved_for_another_gallery_state_is_rebuilt_with_one_line(tmp_path, capsys):
    sets, queries = make_gallery("trained_like", 600, 4, 4, dim=16, seed=3)
    stored = gallery_module.Gallery.create(tmp_path / "g", "images", fake_owner(4, 16))
    stored.append([f"item{i}" for i in range(500)], [None] * 500, sets[:500], "synthetic")
    built = gallery_module.load_set_index(stored)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "building the set index" in err
    again = gallery_module.load_set_index(gallery_module.Gallery.open(tmp_path / "g"))
    assert capsys.readouterr().err == "" and torch.equal(again.codes, built.codes)      # the saved one
    stored.append([f"item{i}" for i in range(500, 600)], [None] * 100, sets[500:], "synthetic")
    grown = gallery_module.load_set_index(stored)                                      # 100 items more
    assert "building the set index" in capsys.readouterr().err and len(grown) == 600
    (tmp_path / "g" / gallery_module.INDEX_FILE).write_bytes(b"not an index")          # damaged: rebuilt too
    assert len(gallery_module.load_set_index(stored)) == 600
    assert "building the set index" in capsys.readouterr().err
    found = search.approximate_top_k(queries[0], stored, grown, 5, candidates=600)
    assert torch.equal(found.positions, search.top_k(queries[0], sets, 5).positions)   # rows read from sets.bin


def test_a_gallery_that_cannot_be_written_gets_the_index_unsaved_with_one_warning(tmp_path, capsys, monkeypatch):
    sets, queries = make_gallery("trained_like", 200, 4, 4, dim=16, seed=4)
    stored = gallery_module.Gallery.create(tmp_path / "g", "images", fake_owner(4, 16))
    stored.append([f"item{i}" for i in range(200)], [None] * 200, sets, "synthetic")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(gallery_module.torch, "save", refuse)
    index = gallery_module.load_set_index(stored)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[1].startswith("warning: the set index cannot be saved")
    assert "Permission denied" in err[1]
    assert len(index) == 200 and not (tmp_path / "g" / gallery_module.INDEX_FILE).exists()


def test_the_command_line_builds_reuses_and_labels_the_index_without_faiss(trained_run, split_encodings, tmp_path,
                                                                           capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)                                   # `import faiss` now fails
    code, _, err = run_search(capsys, "index", "--ckpt", trained_run, "--split", "test", "--out", tmp_path / "g",
                              "--approximate")
    assert code == 0, err
    assert (tmp_path / "g" / gallery_module.INDEX_FILE).is_file()
    code, out, err = run_search(capsys, "query", "--index", tmp_path / "g", QUERY, "--approximate", "--top", "3")
    assert code == 0 and "building" not in err, err
    assert "approximate" in out and gallery_module.INDEX_TUNED_FOR in out
    _, exact_out, _ = run_search(capsys, "query", "--index", tmp_path / "g", QUERY, "--top", "16")
    exact_lines = {line.split()[2]: line.split()[1] for line in exact_out.splitlines()[2:]}
    for line in out.splitlines()[2:]:                                                  # rank, score, path
        assert exact_lines[line.split()[2]] == line.split()[1]                        # the exact score
    code, _, err = run_search(capsys, "query", "--index", tmp_path / "g", QUERY, "--approximate", "--candidates", "0")
    assert code == 2 and err.strip() == "error: --candidates must be 1 or more, got 0"


# ----------------------------------------------------------------------------- the FDE design (benchmark only)

def graded_pairs(count=40, embeds=4, dim=32, seed=0):
    """(queries, items) of `count` sets; item n holds noisy copies of query n's elements (in another
    order), the noise growing with n from close partners (cosine about 0.99) to unrelated ones."""
    g = torch.Generator().manual_seed(seed)
    queries = torch.nn.functional.normalize(torch.randn(count, embeds, dim, generator=g), dim=-1)
    scale = torch.linspace(0.1, 3.0, count).view(count, 1, 1) / dim ** 0.5
    noise = scale * torch.randn(count, embeds, dim, generator=g)
    items = torch.nn.functional.normalize(queries + noise, dim=-1)[:, torch.randperm(embeds, generator=g)]
    return queries, items


def test_fde_inner_product_never_exceeds_the_chamfer_sum_and_is_the_mean_product_with_one_partition():
    queries, items = graded_pairs()
    chamfer = torch.einsum("nid,njd->nij", queries, items).amax(2).sum(1)             # (N,)
    planes, projection = search_bench.fde_parameters(32, repetitions=50, bits=3, projection_dim=None, seed=1)
    per_repetition = (search_bench.fixed_dimensional_encodings(queries, planes, projection, "query").view(40, 50, -1)
                      * search_bench.fixed_dimensional_encodings(items, planes, projection, "item").view(40, 50, -1)
                      ).sum(2)                                                        # (N, R)
    assert (per_repetition <= chamfer[:, None] + 1e-5).all()     # a mean or a filled element is never above the max
    planes, projection = search_bench.fde_parameters(32, repetitions=1, bits=0, projection_dim=None, seed=1)
    single = (search_bench.fixed_dimensional_encodings(queries, planes, projection, "query")
              * search_bench.fixed_dimensional_encodings(items, planes, projection, "item")).sum(1)
    assert torch.allclose(single, (queries.sum(1) * items.mean(1)).sum(1), atol=1e-5)


def test_fde_expectation_ranks_items_as_the_chamfer_sum_and_keeps_most_of_it_for_close_partners():
    """Mean over 400 repetitions at 3 SimHash bits (8 partitions): it ranks the 40 items as their
    Chamfer sums do (Spearman >= 0.95; 0.986 measured) and, for items whose elements are close copies
    of the query's (cosine >= 0.95), keeps at least 70% of the Chamfer sum (73-79% measured): a
    query element whose partner falls in another partition meets a mean of others or a filler."""
    queries, items = graded_pairs()
    cosines = torch.einsum("nid,njd->nij", queries, items)
    chamfer = cosines.amax(2).sum(1)
    planes, projection = search_bench.fde_parameters(32, repetitions=400, bits=3, projection_dim=None, seed=1)
    estimate = (search_bench.fixed_dimensional_encodings(queries, planes, projection, "query")
                * search_bench.fixed_dimensional_encodings(items, planes, projection, "item")).sum(1) / 400

    def ranks(values):
        return values.argsort().argsort().float()
    assert torch.corrcoef(torch.stack([ranks(estimate), ranks(chamfer)]))[0, 1] >= 0.95
    close = cosines.amax(2).amin(1) >= 0.95
    assert close.sum() >= 3 and (estimate[close] >= 0.7 * chamfer[close]).all()


def test_fde_count_sketch_projection_keeps_inner_products_unbiased():
    g = torch.Generator().manual_seed(2)
    x, y = torch.nn.functional.normalize(torch.randn(2, 1, 1, 64, generator=g), dim=-1)
    planes, projection = search_bench.fde_parameters(64, repetitions=2000, bits=0, projection_dim=8, seed=3)
    estimate = (search_bench.fixed_dimensional_encodings(x, planes, projection, "query")
                * search_bench.fixed_dimensional_encodings(y, planes, projection, "item")).sum() / 2000
    assert abs(estimate.item() - (x * y).sum().item()) < 0.03
