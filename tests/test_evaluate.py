"""evaluate.py: retrieval metrics against a brute-force loop, COCO 5-fold 1K, collapse diagnostics."""
import pytest
import torch

import evaluate
from evaluate import collapse_diagnostics, five_fold_metrics, join_flag_values, retrieval_metrics


def brute_force_metrics(scores, caption_to_image):
    """Sort every row / column and look up ranks one by one (the textbook VSE++ procedure)."""
    scores = scores.tolist()
    owners = caption_to_image.tolist()
    i2t, t2i = [], []
    for i, row in enumerate(scores):
        order = sorted(range(len(row)), key=lambda j: -row[j])
        i2t.append(min(order.index(j) for j, owner in enumerate(owners) if owner == i))
    for j, owner in enumerate(owners):
        column = [scores[i][j] for i in range(len(scores))]
        order = sorted(range(len(column)), key=lambda i: -column[i])
        t2i.append(order.index(owner))
    metrics = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            metrics[f"{name}_r{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
        ranks_sorted = sorted(ranks)
        middle = len(ranks_sorted) // 2
        median = ranks_sorted[middle] if len(ranks) % 2 else (ranks_sorted[middle - 1] + ranks_sorted[middle]) / 2
        metrics[f"{name}_medr"] = int(median) + 1
        metrics[f"{name}_meanr"] = sum(ranks) / len(ranks) + 1
    metrics["rsum"] = sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return metrics


def noisy_scores(num_images, captions_per_image, signal, seed):
    generator = torch.Generator().manual_seed(seed)
    owners = torch.arange(num_images).repeat_interleave(captions_per_image)
    scores = torch.randn(num_images, num_images * captions_per_image, generator=generator)
    scores[owners, torch.arange(len(owners))] += signal
    return scores, owners


@pytest.mark.parametrize("signal", [0.0, 1.5, 4.0])
def test_retrieval_metrics_match_brute_force_ranking(signal):
    scores, owners = noisy_scores(40, 5, signal, seed=int(signal * 10))
    fast = retrieval_metrics(scores, owners)
    slow = brute_force_metrics(scores, owners)
    assert fast.keys() >= slow.keys()
    for key, value in slow.items():
        assert fast[key] == pytest.approx(value, abs=1e-9), key


def test_retrieval_metrics_handle_unordered_captions_and_uneven_counts():
    generator = torch.Generator().manual_seed(3)
    owners = torch.tensor([2, 0, 1, 1, 2, 0, 0, 3, 1])
    scores = torch.randn(4, len(owners), generator=generator)
    fast = retrieval_metrics(scores, owners)
    for key, value in brute_force_metrics(scores, owners).items():
        assert fast[key] == pytest.approx(value, abs=1e-9), key


def test_perfect_scores_give_full_recall_and_rank_one():
    scores, owners = noisy_scores(30, 5, signal=100.0, seed=0)
    metrics = retrieval_metrics(scores, owners)
    assert metrics["rsum"] == pytest.approx(600.0)
    assert metrics["i2t_medr"] == metrics["t2i_medr"] == 1


def test_five_fold_metrics_average_each_fold_and_sum_the_averaged_recalls():
    scores, owners = noisy_scores(50, 5, signal=2.0, seed=7)
    folds = []
    for fold in range(5):
        images = range(fold * 10, fold * 10 + 10)
        captions = [j for j, owner in enumerate(owners.tolist()) if owner in images]
        folds.append(brute_force_metrics(scores[fold * 10:fold * 10 + 10][:, captions],
                                         owners[captions] - fold * 10))
    expected = {key: sum(f[key] for f in folds) / 5 for key in folds[0]}
    result = five_fold_metrics(scores, owners, fold_size=10)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key
    recalls = sum(expected[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert result["rsum"] == pytest.approx(recalls, abs=1e-9)
    # the full-gallery number is a different (harder) protocol
    assert retrieval_metrics(scores, owners)["rsum"] < result["rsum"]


def test_collapse_diagnostics_separate_collapsed_from_spread_sets():
    collapsed = torch.nn.functional.normalize(torch.ones(6, 4, 8), dim=-1)
    spread = torch.eye(8)[:4].expand(6, 4, 8)
    global_ = torch.nn.functional.normalize(torch.ones(6, 8), dim=-1)
    c = collapse_diagnostics(collapsed, global_)
    s = collapse_diagnostics(spread, global_)
    assert c["intra_set_cos"] == pytest.approx(1.0) and s["intra_set_cos"] == pytest.approx(0.0, abs=1e-7)
    assert c["global_cos"] == pytest.approx(1.0)
    assert s["global_cos"] == pytest.approx(1 / 8 ** 0.5)
    # per-dimension variance over 4 one-hot elements: dims 0..3 have var 3/16, dims 4..7 zero
    assert s["log_set_variance"] == pytest.approx(torch.tensor(3 / 16 * 4 / 8).log().item())
    assert c["log_set_variance"] < -20


def test_flag_style_overrides_become_dotted_overrides():
    assert join_flag_values(["data.root", "/x", "eval.chunk_size=64"]) == ["data.root=/x", "eval.chunk_size=64"]


@pytest.mark.parametrize("dataset, protocols", [("coco", {"all", "1k"}), ("f30k", {"all"})])
def test_a_coco_sized_split_adds_the_five_fold_protocol_and_keeps_all(monkeypatch, dataset, protocols):
    """Training validates on results['all'] whatever the split, COCO's 5,000-image val split included."""
    monkeypatch.setattr(evaluate, "COCO_TEST_IMAGES", 10)     # 10 images in 5 folds of 2 stand in for 5K / 1K
    monkeypatch.setattr(evaluate, "COCO_FOLD_IMAGES", 2)
    generator = torch.Generator().manual_seed(0)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1)  # noqa: E731
    encoded = (unit(10, 2, 8), unit(10, 8), unit(50, 2, 8), unit(50, 8), torch.arange(10).repeat_interleave(5))
    monkeypatch.setattr(evaluate, "encode_split", lambda *args: encoded)
    cfg = {"eval": {"method": None, "similarity_options": None, "chunk_size": 4, "rank_bounds": True},
           "loss": {"similarity": "max_pair", "similarity_options": {}},
           "train": {"amp": "off"}, "data": {"dataset": dataset}}
    results = evaluate.evaluate_model(None, cfg, None, "cpu")
    assert set(results) == protocols | {"collapse", "method"}
    scores = evaluate.score_matrix(encoded[0], encoded[2], method="max_pair")
    assert results["all"] == retrieval_metrics(scores, encoded[4])
    if "1k" in protocols:
        assert results["1k"] == five_fold_metrics(scores, encoded[4], fold_size=2)
