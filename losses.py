"""Training losses of MaxMatch (ACL 2025; METHOD.md §3), one small pure function per term.

L = L_tri + l_con L_con + l_mmd L_mmd + l_div L_div + l_gd L_gd + l_isd L_isd   (METHOD.md §3)

- triplet_loss               VSE++ hardest-negative triplet, both directions, multiple positives.
- contrastive_loss           symmetric multi-positive InfoNCE on S / tau.
- mmd_loss                   MMD between image and caption set elements (Laplacian or Gaussian).
- uniformity_loss            DivE diversity on normalised residuals: mean_{a<b} exp(-2 |r_a - r_b|^2).
- pvse_diversity_loss        PVSE diversity: |R R^T - I|_F / K^2 (PVSE's code: plain norm).
- global_discriminative_loss (paper) mean_k exp(s (cos(S_k, g) - delta)).
- intra_set_divergence_loss  (paper) mean_{j != k} exp(s (cos(S_j, S_k) - delta)).
- maxmatch_loss              the weighted total from the `loss` section of config.yaml.

Imports only torch. Shapes: B images, N_cap captions, K set elements, D embedding width.
"""
import torch
import torch.nn.functional as F

# Every term of maxmatch_loss, its options and their defaults (METHOD.md §3): config.yaml's `loss`
# section, repeated for callers who copy this file alone (tests/test_config.py checks they agree).
LOSS_TERMS = {
    "triplet": {"weight": 1.0, "margin": 0.2, "hardest": True},
    "con": {"weight": 1.0, "temperature": 0.05},
    "mmd": {"weight": 0.01, "kernel": "laplacian", "gamma": 0.5},
    "div": {"weight": 0.01, "type": "uniformity"},
    "gd": {"weight": 0.1, "scale": 10.0, "delta": 0.5},
    "isd": {"weight": 0.1, "scale": 10.0, "delta": 0.3},
}
# Keys of the config's loss section that belong to the similarity, not to a loss term.
NON_LOSS_KEYS = ("similarity", "similarity_options")


def triplet_loss(scores, positive_mask, margin=0.2, hardest=True):
    """Hinge triplet loss on a score matrix, both directions, summed (METHOD.md §3).

    scores (B, N_cap); positive_mask (B, N_cap) bool, True where caption t describes image i.
    i2t: for each positive pair (i, p): [margin + max_{t not pos(i)} S(i,t) - S(i,p)]_+ ;
    t2i: for each positive pair (i, t): [margin + max_{j not pos(t)} S(j,t) - S(i,t)]_+ .
    Each direction is the mean over positive pairs; hardest=False replaces the max over
    negatives by the sum over all negatives (it indexes the positive pairs: a host sync on GPU).
    Returns a scalar (hardest: 0 for a batch without positive pairs).
    """
    positive_mask = positive_mask.bool()
    if hardest:   # masks instead of boolean indexing: no data-dependent shapes, no host-device sync
        positive = positive_mask.to(scores.dtype)  # (B, N_cap)
        num_positives = positive.sum().clamp(min=1)
        negatives = scores.masked_fill(positive_mask, float("-inf"))  # (B, N_cap)
        hardest_caption = negatives.amax(1, keepdim=True)  # (B, 1)
        hardest_image = negatives.amax(0, keepdim=True)  # (1, N_cap)
        i2t = ((margin + hardest_caption - scores).clamp(min=0) * positive).sum() / num_positives
        t2i = ((margin + hardest_image - scores).clamp(min=0) * positive).sum() / num_positives
        return i2t + t2i
    positive_scores = scores[positive_mask]  # (num_pos,)
    pair_rows, pair_cols = positive_mask.nonzero(as_tuple=True)  # (num_pos,)
    negative = (~positive_mask).to(scores.dtype)  # (B, N_cap)
    i2t_hinges = (margin + scores[pair_rows] - positive_scores[:, None]).clamp(min=0)  # (num_pos, N_cap)
    t2i_hinges = (margin + scores[:, pair_cols].T - positive_scores[:, None]).clamp(min=0)  # (num_pos, B)
    i2t = (i2t_hinges * negative[pair_rows]).sum(1)
    t2i = (t2i_hinges * negative[:, pair_cols].T).sum(1)
    return (i2t.sum() + t2i.sum()) / max(len(pair_rows), 1)    # 0 without positive pairs, as hardest


def contrastive_loss(scores, positive_mask, temperature=0.05):
    """Symmetric multi-positive InfoNCE on scores / temperature (METHOD.md §3).

    scores (B, N_cap); positive_mask (B, N_cap) bool. i2t: per image, the mean of
    -log softmax_captions(S/tau) over its positives; t2i: per caption, the mean of
    -log softmax_images(S/tau) over its positive images. Returns 1/2 (mean_i i2t + mean_t t2i)
    over images / captions that have a positive.
    """
    positive = positive_mask.to(scores.dtype)  # (B, N_cap)
    logits = scores / temperature
    i2t = -(logits.log_softmax(1) * positive).sum(1) / positive.sum(1).clamp(min=1)  # (B,)
    t2i = -(logits.log_softmax(0) * positive).sum(0) / positive.sum(0).clamp(min=1)  # (N_cap,)
    has_i, has_t = (positive.sum(1) > 0).to(scores.dtype), (positive.sum(0) > 0).to(scores.dtype)
    return 0.5 * ((i2t * has_i).sum() / has_i.sum().clamp(min=1) + (t2i * has_t).sum() / has_t.sum().clamp(min=1))


def mmd_loss(image_elements, caption_elements, kernel="laplacian", gamma=0.5):
    """Biased MMD^2 between two samples of embeddings (DivE; METHOD.md §3).

    image_elements (N, D), caption_elements (M, D): mean k(x,x') - 2 mean k(x,y) + mean k(y,y'),
    all pairs including x = x'. kernel "laplacian": exp(-gamma |x-y|); "gaussian":
    exp(-gamma |x-y|^2). Returns a scalar.
    """
    def mean_kernel(a, b):
        squared = (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.T).clamp(min=0)  # (N, M)
        if a is b:  # exact zeros on the diagonal, not rounding noise
            squared = squared.masked_fill(torch.eye(len(a), dtype=torch.bool, device=a.device), 0)
        if kernel == "laplacian":  # sqrt has an infinite slope at 0: keep its gradient finite there
            distance = torch.where(squared > 0, squared.clamp(min=1e-20).sqrt(), 0.0)
            return torch.exp(-gamma * distance).mean()
        if kernel == "gaussian":
            return torch.exp(-gamma * squared).mean()
        raise ValueError(f"unknown MMD kernel {kernel!r}; valid: 'laplacian', 'gaussian'")

    x, y = image_elements, caption_elements
    return mean_kernel(x, x) - 2 * mean_kernel(x, y) + mean_kernel(y, y)


def uniformity_loss(residuals):
    """DivE diversity on residuals: mean over samples and pairs a < b of exp(-2 |r_a - r_b|^2),
    r the L2-normalised residuals. residuals (N, K, D) -> scalar (0 when K = 1)."""
    k = residuals.shape[1]
    if k < 2:
        return residuals.sum() * 0
    unit = F.normalize(residuals, dim=-1)  # (N, K, D)
    squared = (2 - 2 * unit @ unit.transpose(1, 2)).clamp(min=0)  # (N, K, K)
    a, b = torch.triu_indices(k, k, offset=1, device=residuals.device)
    return torch.exp(-2 * squared[:, a, b]).mean()


def pvse_diversity_loss(residuals):
    """PVSE diversity: |R R^T - I|_F / K^2 with R the normalised residuals, mean over samples.

    The plain (not squared) Frobenius norm divided by K^2, as in PVSE's and DivE's released code
    (`torch.norm(gram) / num_embeds**2`), so `loss.div.weight` means what it means there. Its
    gradient at an orthogonal set (norm 0) is 0, not NaN. residuals (N, K, D) -> scalar."""
    k = residuals.shape[1]
    unit = F.normalize(residuals, dim=-1)  # (N, K, D)
    gram = unit @ unit.transpose(1, 2) - torch.eye(k, dtype=unit.dtype, device=unit.device)  # (N, K, K)
    return torch.linalg.matrix_norm(gram).mean() / k**2      # Frobenius norm per sample: (N,)


def global_discriminative_loss(sets, global_features, scale=10.0, delta=0.5):
    """Global Discriminative loss (paper; METHOD.md §3): mean over samples and k of
    exp(scale (cos(S_k, g) - delta)). Pushes every set element away from its own global feature.
    sets (N, K, D), global_features (N, D) -> scalar."""
    cos = torch.einsum("nkd,nd->nk", F.normalize(sets, dim=-1), F.normalize(global_features, dim=-1))  # (N, K)
    return torch.exp(scale * (cos - delta)).mean()


def intra_set_divergence_loss(sets, scale=10.0, delta=0.3):
    """Intra-Set Divergence loss (paper; METHOD.md §3): mean over samples and ordered pairs j != k of
    exp(scale (cos(S_j, S_k) - delta)). Pushes the elements of a set apart.
    sets (N, K, D) -> scalar (0 when K = 1)."""
    k = sets.shape[1]
    if k < 2:
        return sets.sum() * 0
    unit = F.normalize(sets, dim=-1)
    cos = unit @ unit.transpose(1, 2)  # (N, K, K)
    diagonal = torch.eye(k, dtype=torch.bool, device=sets.device)
    # masked_fill, not cos[:, ~diagonal]: boolean indexing would make the GPU wait for the host
    return torch.exp(scale * (cos - delta)).masked_fill(diagonal, 0).sum() / (len(sets) * k * (k - 1))


def maxmatch_loss(config, scores, positive_mask, image_sets, caption_sets, image_residuals,
                  caption_residuals, image_global, caption_global):
    """Weighted total of every term whose weight is > 0 (METHOD.md §3).

    config: the `loss` section of config.yaml ({term: {weight, ...}}; `similarity` and
    `similarity_options` are ignored; a missing term has weight 0, a missing option its
    default). scores (B, B*C) from pairwise_similarity; positive_mask (B, B*C) bool;
    image_sets (B, K, D), caption_sets (B*C, K, D) unit-norm; residuals the same shapes, raw;
    image_global (B, D), caption_global (B*C, D). Div, GD and ISD are applied to both
    modalities and summed; MMD compares all image set elements with all caption set elements.
    Returns (total, {term: unweighted detached value}) for the computed terms.
    """
    options = _resolve_config(config)
    terms = {}
    if options["triplet"]["weight"] > 0:
        o = options["triplet"]
        terms["triplet"] = triplet_loss(scores, positive_mask, o["margin"], bool(o["hardest"]))
    if options["con"]["weight"] > 0:
        terms["con"] = contrastive_loss(scores, positive_mask, options["con"]["temperature"])
    if options["mmd"]["weight"] > 0:
        o = options["mmd"]
        terms["mmd"] = mmd_loss(image_sets.flatten(0, 1), caption_sets.flatten(0, 1), o["kernel"], o["gamma"])
    if options["div"]["weight"] > 0:
        diversity = uniformity_loss if options["div"]["type"] == "uniformity" else pvse_diversity_loss
        terms["div"] = diversity(image_residuals) + diversity(caption_residuals)
    if options["gd"]["weight"] > 0:
        o = options["gd"]
        terms["gd"] = (global_discriminative_loss(image_sets, image_global, o["scale"], o["delta"])
                       + global_discriminative_loss(caption_sets, caption_global, o["scale"], o["delta"]))
    if options["isd"]["weight"] > 0:
        o = options["isd"]
        terms["isd"] = (intra_set_divergence_loss(image_sets, o["scale"], o["delta"])
                        + intra_set_divergence_loss(caption_sets, o["scale"], o["delta"]))
    total = scores.new_zeros(())
    for name, value in terms.items():
        total = total + options[name]["weight"] * value
    return total, {name: value.detach() for name, value in terms.items()}


def _resolve_config(config):
    """Check the loss config and fill defaults: {term: {option: value}}; missing term -> weight 0."""
    unknown_terms = sorted(set(config) - set(LOSS_TERMS) - set(NON_LOSS_KEYS))
    if unknown_terms:
        raise ValueError(f"unknown loss term(s) {unknown_terms}; valid: {sorted(LOSS_TERMS)}")
    resolved = {}
    for name, defaults in LOSS_TERMS.items():
        given = dict(config.get(name) or {"weight": 0.0})
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in loss.{name}; valid: {sorted(defaults)}")
        resolved[name] = {**defaults, **given}
        if resolved[name]["weight"] < 0:
            raise ValueError(f"loss.{name}.weight must be >= 0, got {resolved[name]['weight']}")
    if resolved["div"]["type"] not in ("uniformity", "pvse"):
        raise ValueError(f"loss.div.type must be 'uniformity' or 'pvse', got {resolved['div']['type']!r}")
    if resolved["mmd"]["kernel"] not in ("laplacian", "gaussian"):
        raise ValueError(f"loss.mmd.kernel must be 'laplacian' or 'gaussian', got {resolved['mmd']['kernel']!r}")
    return resolved
