"""Tests of losses.py: each term on a hand-computed example, its zero/positive cases, the
direction of one gradient step, and the config-driven total."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import losses

SCORES = torch.tensor([[0.9, 0.5, 0.6, 0.55],
                       [0.2, 0.4, 0.7, 0.8]], dtype=torch.float64)  # (B=2, N_cap=4)
POSITIVES = torch.tensor([[True, True, False, False],
                          [False, False, True, True]])  # image 0: captions 0, 1; image 1: captions 2, 3


def test_triplet_hardest_negative_hand_computed():
    # i2t: image 0 hardest negative 0.6 -> hinges 0, 0.3; image 1 hardest 0.4 -> 0, 0. Mean 0.3 / 4.
    # t2i: captions' hardest other image 0.2, 0.4, 0.6, 0.55 -> 0, 0.1, 0.1, 0. Mean 0.2 / 4.
    got = losses.triplet_loss(SCORES, POSITIVES, margin=0.2, hardest=True)
    assert got.item() == pytest.approx(0.3 / 4 + 0.2 / 4, abs=1e-12)


def test_triplet_sum_over_negatives_hand_computed():
    # i2t: image 0, positive 0.5: negatives 0.6, 0.55 -> 0.3 + 0.25; every other hinge is 0.
    got = losses.triplet_loss(SCORES, POSITIVES, margin=0.2, hardest=False)
    assert got.item() == pytest.approx(0.55 / 4 + 0.2 / 4, abs=1e-12)


def test_triplet_is_zero_once_every_positive_beats_every_negative_by_the_margin():
    scores = torch.tensor([[0.9, 0.85, 0.6, 0.1], [0.2, 0.3, 0.8, 0.9]], dtype=torch.float64)
    assert losses.triplet_loss(scores, POSITIVES, margin=0.2).item() == 0.0
    assert losses.triplet_loss(scores, POSITIVES, margin=0.2, hardest=False).item() == 0.0
    assert losses.triplet_loss(scores, POSITIVES, margin=0.3).item() > 0  # 0.85 - 0.6 < 0.3


def test_triplet_gradient_step_raises_positives_and_lowers_hardest_negatives():
    scores = SCORES.clone().requires_grad_(True)
    losses.triplet_loss(scores, POSITIVES).backward()
    stepped = SCORES - 0.1 * scores.grad
    assert stepped[0, 1] > SCORES[0, 1]  # violated positive pair pulled up
    assert stepped[0, 2] < SCORES[0, 2]  # hardest negative pushed down
    assert stepped[1, 3] == SCORES[1, 3]  # satisfied positive untouched
    assert losses.triplet_loss(stepped, POSITIVES) < losses.triplet_loss(SCORES, POSITIVES)


def test_contrastive_hand_computed_multi_positive():
    scores = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)  # one image, captions 0, 1 positive
    positives = torch.tensor([[True, True, False]])
    logits = [2.0, 0.0, -2.0]  # tau = 0.5
    log_z = math.log(sum(math.exp(x) for x in logits))
    i2t = -((logits[0] - log_z) + (logits[1] - log_z)) / 2
    t2i = 0.0  # each positive caption has a single candidate image; caption 2 has no positive
    got = losses.contrastive_loss(scores, positives, temperature=0.5)
    assert got.item() == pytest.approx(0.5 * (i2t + t2i), abs=1e-12)


def test_contrastive_symmetric_diagonal_hand_computed_and_gradient_separates_pairs():
    scores = torch.eye(2, dtype=torch.float64).requires_grad_(True)
    got = losses.contrastive_loss(scores, torch.eye(2, dtype=torch.bool), temperature=1.0)
    assert got.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-12)
    got.backward()
    assert (scores.grad.diagonal() < 0).all() and (scores.grad[~torch.eye(2, dtype=torch.bool)] > 0).all()


@pytest.mark.parametrize("kernel", ["laplacian", "gaussian"])
def test_mmd_hand_computed_1d(kernel):
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    y = torch.tensor([[3.0]], dtype=torch.float64)
    k = (lambda d: math.exp(-0.5 * d)) if kernel == "laplacian" else (lambda d: math.exp(-0.5 * d * d))
    expected = (2 + 2 * k(1)) / 4 - 2 * (k(3) + k(2)) / 2 + 1
    assert losses.mmd_loss(x, y, kernel, gamma=0.5).item() == pytest.approx(expected, abs=1e-12)


def test_mmd_is_zero_for_identical_samples_with_finite_gradient():
    x = F.normalize(torch.randn(6, 5, dtype=torch.float64), dim=-1).requires_grad_(True)
    value = losses.mmd_loss(x, x.detach().clone())
    assert abs(value.item()) < 1e-7
    value.backward()
    assert torch.isfinite(x.grad).all()


def test_mmd_gradient_step_pulls_captions_towards_images():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = (torch.randn(8, 4, generator=g, dtype=torch.float64) + 3.0).requires_grad_(True)
    before = losses.mmd_loss(x, y)
    before.backward()
    after = losses.mmd_loss(x, y.detach() - 0.5 * y.grad)
    assert before.item() > 0 and after < before


RESIDUALS = torch.tensor([[[3.0, 0.0], [0.0, 2.0], [5.0, 0.0]]], dtype=torch.float64)  # (1, K=3, D=2)


def test_uniformity_hand_computed_on_unnormalised_residuals():
    # normalised: e0, e1, e0 -> pairs (0,1): exp(-2*2), (0,2): exp(0), (1,2): exp(-2*2)
    expected = (1 + 2 * math.exp(-4)) / 3
    assert losses.uniformity_loss(RESIDUALS).item() == pytest.approx(expected, abs=1e-12)
    assert losses.uniformity_loss(RESIDUALS[:, :1]).item() == 0.0  # K = 1: no pair


def test_pvse_diversity_hand_computed_and_zero_for_orthogonal():
    # normalised: e0, e1, e0 -> R R^T - I has two off-diagonal ones: plain Frobenius norm sqrt(2), / K^2 = 9
    assert losses.pvse_diversity_loss(RESIDUALS).item() == pytest.approx(math.sqrt(2) / 9, abs=1e-12)
    # a collapsed sample has six off-diagonal ones (norm sqrt(6)); two samples: the mean of their norms
    two = torch.cat([RESIDUALS, torch.tensor([[[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]], dtype=torch.float64)])
    assert losses.pvse_diversity_loss(two).item() == pytest.approx((math.sqrt(2) + math.sqrt(6)) / 2 / 9, abs=1e-12)
    assert losses.pvse_diversity_loss(RESIDUALS[:, :2]).item() == pytest.approx(0.0, abs=1e-12)


def test_pvse_diversity_gradient_is_zero_not_nan_at_an_orthogonal_set():
    residuals = torch.eye(3, dtype=torch.float64).unsqueeze(0).requires_grad_(True)
    losses.pvse_diversity_loss(residuals).backward()
    assert torch.equal(residuals.grad, torch.zeros_like(residuals))


@pytest.mark.parametrize("diversity", [losses.uniformity_loss, losses.pvse_diversity_loss])
def test_diversity_gradient_step_spreads_residuals(diversity):
    residuals = torch.tensor([[[1.0, 0.2, 0.0], [1.0, 0.0, 0.3], [0.0, 1.0, 0.0]]], dtype=torch.float64)
    residuals.requires_grad_(True)
    diversity(residuals).backward()
    stepped = residuals.detach() - 0.05 * residuals.grad
    cos = lambda r: F.cosine_similarity(r[0, 0], r[0, 1], dim=0)
    assert cos(stepped) < cos(residuals.detach())


def test_global_discriminative_hand_computed():
    sets = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)  # cos to g: 1 and 0
    global_features = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    expected = (math.exp(10 * (1 - 0.5)) + math.exp(10 * (0 - 0.5))) / 2
    got = losses.global_discriminative_loss(sets, global_features, scale=10.0, delta=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_global_discriminative_gradient_step_lowers_cosine_to_global():
    sets = F.normalize(torch.tensor([[[1.0, 0.5, 0.1], [0.2, 1.0, 0.3]]], dtype=torch.float64), dim=-1)
    global_features = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    sets.requires_grad_(True)
    losses.global_discriminative_loss(sets, global_features).backward()
    stepped = sets.detach() - 0.01 * sets.grad
    cos = lambda s: F.cosine_similarity(s[0], global_features, dim=-1)  # (K,)
    assert (cos(stepped) < cos(sets.detach())).all()


def test_intra_set_divergence_hand_computed():
    sets = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]], dtype=torch.float64)  # cos 0.6, 0, 0.8
    expected = 2 * (math.exp(10 * 0.3) + math.exp(-10 * 0.3) + math.exp(10 * 0.5)) / 6
    got = losses.intra_set_divergence_loss(sets, scale=10.0, delta=0.3)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert losses.intra_set_divergence_loss(sets[:, :1]).item() == 0.0  # K = 1: no pair


def test_intra_set_divergence_gradient_step_lowers_intra_set_cosine():
    sets = F.normalize(torch.tensor([[[1.0, 0.3, 0.0], [0.8, 0.5, 0.2]]], dtype=torch.float64), dim=-1)
    sets.requires_grad_(True)
    losses.intra_set_divergence_loss(sets).backward()
    stepped = sets.detach() - 0.001 * sets.grad
    cos = lambda s: F.cosine_similarity(s[0, 0], s[0, 1], dim=0)
    assert cos(stepped) < cos(sets.detach())


def random_batch(b=3, c=2, k=4, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)
    image_sets, caption_sets = unit(b, k, d), unit(b * c, k, d)
    scores = torch.rand(b, b * c, generator=g, dtype=torch.float64).requires_grad_(True)
    positive_mask = torch.arange(b)[:, None] == torch.arange(b * c)[None, :] // c
    return dict(scores=scores, positive_mask=positive_mask, image_sets=image_sets, caption_sets=caption_sets,
                image_residuals=torch.randn(b, k, d, generator=g, dtype=torch.float64),
                caption_residuals=torch.randn(b * c, k, d, generator=g, dtype=torch.float64),
                image_global=unit(b, d), caption_global=unit(b * c, d))


def shipped_loss_config():
    yaml = pytest.importorskip("yaml")
    with open(os.path.join(os.path.dirname(__file__), "..", "config.yaml")) as f:
        return yaml.safe_load(f)["loss"]


def test_maxmatch_loss_is_the_weighted_sum_of_the_terms():
    config = {"similarity": "max_pair", "similarity_options": {},
              "triplet": {"weight": 1.0, "margin": 0.2, "hardest": True}, "con": {"weight": 0.5, "temperature": 0.1},
              "mmd": {"weight": 0.01, "kernel": "gaussian", "gamma": 0.5}, "div": {"weight": 0.02, "type": "pvse"},
              "gd": {"weight": 0.03, "scale": 5.0, "delta": 0.4}, "isd": {"weight": 0.04, "scale": 8.0, "delta": 0.2}}
    batch = random_batch()
    total, terms = losses.maxmatch_loss(config, **batch)
    expected = {
        "triplet": losses.triplet_loss(batch["scores"], batch["positive_mask"], 0.2),
        "con": losses.contrastive_loss(batch["scores"], batch["positive_mask"], 0.1),
        "mmd": losses.mmd_loss(batch["image_sets"].flatten(0, 1), batch["caption_sets"].flatten(0, 1), "gaussian", 0.5),
        "div": losses.pvse_diversity_loss(batch["image_residuals"]) + losses.pvse_diversity_loss(batch["caption_residuals"]),
        "gd": losses.global_discriminative_loss(batch["image_sets"], batch["image_global"], 5.0, 0.4)
        + losses.global_discriminative_loss(batch["caption_sets"], batch["caption_global"], 5.0, 0.4),
        "isd": losses.intra_set_divergence_loss(batch["image_sets"], 8.0, 0.2)
        + losses.intra_set_divergence_loss(batch["caption_sets"], 8.0, 0.2),
    }
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert not terms[name].requires_grad
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-12)
    weighted = sum(config[name]["weight"] * value for name, value in expected.items())
    assert total.item() == pytest.approx(weighted.item(), rel=1e-12)
    total.backward()
    assert batch["scores"].grad.abs().sum() > 0


def test_maxmatch_loss_skips_zero_weight_terms(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a zero-weight term was computed")

    for name in ("contrastive_loss", "mmd_loss", "uniformity_loss", "pvse_diversity_loss", "intra_set_divergence_loss"):
        monkeypatch.setattr(losses, name, must_not_run)
    config = {"triplet": {"weight": 1.0}, "con": {"weight": 0.0}, "mmd": {"weight": 0},
              "div": {"weight": 0.0}, "gd": {"weight": 0.01}}  # isd missing: weight 0
    total, terms = losses.maxmatch_loss(config, **random_batch())
    assert set(terms) == {"triplet", "gd"}
    assert total.item() == pytest.approx(terms["triplet"].item() + 0.01 * terms["gd"].item(), rel=1e-12)


def test_maxmatch_loss_accepts_the_shipped_config():
    config = shipped_loss_config()
    total, terms = losses.maxmatch_loss(config, **random_batch())
    expected = {name for name, term in config.items() if isinstance(term, dict) and term.get("weight", 0) > 0}
    assert set(terms) == expected and torch.isfinite(total)


@pytest.mark.parametrize("config, message", [
    ({"triplet": {"weight": 1.0, "margni": 0.2}}, "margni"),
    ({"triplet": {"weight": 1.0}, "isdd": {"weight": 0.1}}, "isdd"),
    ({"div": {"weight": 0.1, "type": "entropy"}}, "entropy"),
    ({"mmd": {"weight": 0.1, "kernel": "cosine"}}, "cosine"),
])
def test_maxmatch_loss_rejects_unknown_keys_and_values(config, message):
    with pytest.raises(ValueError, match=message):
        losses.maxmatch_loss(config, **random_batch())


@pytest.mark.parametrize("div_type, kernel", [("uniformity", "laplacian"), ("pvse", "gaussian")])
def test_training_loss_reads_no_value_on_the_host(div_type, kernel):
    """On the meta device any .item(), bool() or boolean index raises: passing here means the loss
    never makes a GPU wait for the host (the hardest-negative triplet is the training default)."""
    config = {"triplet": {"weight": 1.0, "hardest": True}, "con": {"weight": 1.0},
              "mmd": {"weight": 1.0, "kernel": kernel}, "div": {"weight": 1.0, "type": div_type},
              "gd": {"weight": 1.0}, "isd": {"weight": 1.0}}
    batch = {key: value.detach().to("meta") for key, value in random_batch().items()}
    batch["image_sets"].requires_grad_(True)
    total, terms = losses.maxmatch_loss(config, **batch)
    total.backward()
    assert set(terms) == {"triplet", "con", "mmd", "div", "gd", "isd"}
    assert batch["image_sets"].grad.shape == batch["image_sets"].shape
