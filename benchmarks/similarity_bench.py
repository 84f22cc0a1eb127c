"""Speed of the set similarities in similarity.py (issue 2). Prints one table; every row is
measured in the same run with the same thread count.

1. Exact max_pair assignment problems/s for K = 4..8 on random K x K blocks, beside greedy and a
   scipy linear_sum_assignment loop (one call per block); ratio to scipy. Then K = 16, 24, 32
   (--large-problems blocks), where max_pair itself calls scipy, and the subset DP at K = 16
   (what runs without scipy).
2. COCO-5K-scale scoring (5,000 image sets x 25,000 caption sets, D = 1024; --scale shrinks both)
   with score_matrix for max_pair, greedy and smooth_chamfer at K = 4 and max_pair at K = 8,
   against the floor: the same chunked pipeline computing only the cosine blocks and their max
   (that is method `mil`). Ratio to the floor of the same K.
3. One training step, B = 128 images x 5 captions, K = 4, D = 1024: forward + backward through
   pairwise_similarity + triplet loss, per method; ratio to smooth_chamfer.
4. Evaluation ranking at COCO-5K scale (5,000 images x 25,000 captions, 5 per image, D = 1024,
   K = 4 and 8): rank_preserving_scores (exact ranks, exact matching only where the bounds cannot
   decide) and score_matrix (every pair exact), against the bare product: the same chunks, one
   matrix multiply each, no reduction. On "trained-like" sets (captions are noisy copies of their
   image's elements, drawn from a shared bank of concepts, so images share elements) and on random
   sets; the rate column gives the fraction of pairs that needed the exact matching.

    python benchmarks/similarity_bench.py                  # full run (several minutes on 2 cores)
    python benchmarks/similarity_bench.py --scale 0.1      # quick look
    python benchmarks/similarity_bench.py --device cuda
    python benchmarks/similarity_bench.py --parts 4        # evaluation ranking only
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import losses  # noqa: E402
import similarity  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--scale", type=float, default=1.0, help="shrinks the COCO-5K-scale part (N_img, N_cap)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--problems", type=int, default=10**6, help="blocks per K in part 1")
    parser.add_argument("--scipy-problems", type=int, default=20000, help="blocks timed in the scipy loop")
    parser.add_argument("--repeats", type=int, default=3, help="part 1: best of this many runs")
    parser.add_argument("--train-repeats", type=int, default=15, help="timed training steps per method")
    parser.add_argument("--algorithms", action="store_true",
                        help="part 1: also time both exact algorithms (permutations, subset DP) at every K")
    parser.add_argument("--parts", default="1234", help="which parts to run, e.g. 13")
    parser.add_argument("--rank-repeats", type=int, default=2, help="part 4: best of this many interleaved runs")
    parser.add_argument("--skip-random", action="store_true", help="part 4: trained-like sets only")
    parser.add_argument("--skip-full", action="store_true", help="part 4: skip score_matrix (every pair exact)")
    parser.add_argument("--large-problems", type=int, default=20000, help="blocks per K in part 1 at K = 16, 24, 32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"# similarity benchmark: torch {torch.__version__}, {name}, scale {args.scale}, "
          f"load average before {os.getloadavg()[0]:.2f}", flush=True)
    print_row(HEADER)
    print("|" + "|".join("-" * (w + 2) for w in WIDTHS) + "|", flush=True)
    if "1" in args.parts:
        bench_assignment(args, device)
    if "2" in args.parts:
        bench_scoring(args, device)
    if "3" in args.parts:
        bench_training(args, device)
    if "4" in args.parts:
        bench_ranking(args, device)
    print(f"# load average after {os.getloadavg()[0]:.2f} (other processes share these cores: compare ratios)")


def timed(fn, device, repeats=1):
    """Best wall time of fn() over repeats runs (after the caller's warm-up)."""
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def progress(message):
    print(f"  ... {message}", file=sys.stderr, flush=True)


def bench_assignment(args, device):
    from scipy.optimize import linear_sum_assignment

    for k in range(4, 9):
        progress(f"part 1, K={k}")
        g = torch.Generator().manual_seed(k)
        blocks = (torch.rand(args.problems, k, k, generator=g) * 2 - 1).to(device)  # (P, K, K)
        similarity.max_pair_assignment(blocks[:1000])  # warm-up
        similarity.greedy_assignment(blocks[:1000])
        on_cpu = blocks[: args.scipy_problems].cpu().numpy()
        t_scipy = timed(lambda: [linear_sum_assignment(b, maximize=True) for b in on_cpu], device, args.repeats)
        scipy_rate = len(on_cpu) / t_scipy
        chosen = "permutations" if similarity._uses_permutations(k, k, assignment=True) else "subset DP"
        cases = [(f"max_pair exact ({chosen})", lambda: similarity.max_pair_assignment(blocks))]
        if args.algorithms:
            for label, limit in (("permutations", 99), ("subset DP", 0)):
                if label == "permutations" and k > 6:  # K = 7: 5,040 maps, ~0.04 M/s
                    continue
                cases.append((f"  via {label}",
                              lambda limit=limit: assign_with(blocks, "PERMUTATION_MAX_K_ASSIGNMENT", limit)))
        cases.append(("greedy", lambda: similarity.greedy_assignment(blocks)))
        for label, fn in cases:
            seconds = timed(fn, device, repeats=args.repeats)
            rate = args.problems / seconds
            target = ">= 20x scipy" if k == 4 and label.startswith("max_pair") else ""
            print_row(row(1, label, k, seconds, f"{rate / 1e6:.2f} M/s", rate / scipy_rate, "scipy", target, 20))
        print_row(row(1, "scipy linear_sum_assignment loop", k, t_scipy * args.problems / len(on_cpu),
                      f"{scipy_rate / 1e6:.2f} M/s", 1.0, "scipy"))
        del blocks
    for k in (16, 24, 32):  # above the subset-DP range: max_pair calls scipy per block
        progress(f"part 1, K={k}")
        g = torch.Generator().manual_seed(k)
        blocks = (torch.rand(args.large_problems, k, k, generator=g) * 2 - 1).to(device)  # (P, K, K)
        similarity.max_pair_assignment(blocks[:100])  # warm-up
        on_cpu = blocks[: args.scipy_problems].cpu().numpy()
        t_scipy = timed(lambda: [linear_sum_assignment(b, maximize=True) for b in on_cpu], device, args.repeats)
        scipy_rate = len(on_cpu) / t_scipy
        cases = [("max_pair exact (scipy, per block)", blocks, lambda b: similarity.max_pair_assignment(b)),
                 ("greedy", blocks, lambda b: similarity.greedy_assignment(b))]
        if k == 16:  # the torch-only fallback without scipy, on fewer blocks
            assign_with(blocks[:10], "SUBSET_DP_MAX_K", 16)  # warm-up: builds its tables once (seconds)
            cases.insert(1, ("  via subset DP (without scipy)", blocks[:500], lambda b: assign_with(b, "SUBSET_DP_MAX_K", 16)))
        for label, some, fn in cases:
            seconds = timed(lambda: fn(some), device, repeats=args.repeats)
            rate = len(some) / seconds
            print_row(row(1, label, k, seconds * len(blocks) / len(some), f"{rate / 1e3:.1f} k/s", rate / scipy_rate,
                          "scipy"))
        print_row(row(1, "scipy linear_sum_assignment loop", k, t_scipy * len(blocks) / len(on_cpu),
                      f"{scipy_rate / 1e3:.1f} k/s", 1.0, "scipy"))
        del blocks


def bench_ranking(args, device):
    import evaluate

    n_img, per_image, dim = max(1, round(5000 * args.scale)), 5, 1024
    owners = torch.arange(n_img).repeat_interleave(per_image).to(device)  # caption -> image
    for k in (4, 8):
        sets = {kind: tuple(t.to(device) for t in make(n_img, per_image, k, dim, seed=k))
                for kind, make in (("trained-like", trained_like_sets), ("random", random_sets))
                if kind == "trained-like" or not args.skip_random}
        images, captions = sets["trained-like"]
        cases = {"bare": lambda: bare_product(images, captions)}
        found = {}
        for kind, (kind_images, kind_captions) in sets.items():
            def rank(kind=kind, kind_images=kind_images, kind_captions=kind_captions):
                found[kind] = similarity.rank_preserving_scores(kind_images, kind_captions, owners)
            cases[kind] = rank
        if not args.skip_full:
            cases["full"] = lambda: similarity.score_matrix(images, captions, "max_pair")
        for name, fn in cases.items():  # warm-up on a corner
            progress(f"part 4, K={k}, warm-up {name}")
            similarity.rank_preserving_scores(images[:64], captions[:320], owners[:320])
            bare_product(images[:64], captions[:2048])
        best = {name: float("inf") for name in cases}
        for repeat in range(args.rank_repeats):  # interleaved: background load hits every case alike
            for name, fn in cases.items():
                progress(f"part 4, K={k}, {name}, {n_img} x {n_img * per_image}, round {repeat + 1}")
                best[name] = min(best[name], timed(fn, device))
        floor = best["bare"]
        print_row(row(4, f"bare product {n_img}x{n_img * per_image}", k, floor, "", 1.0, "product"))
        target = {4: ("<= 1.15x product", 1.15), 8: ("<= 1.5x product", 1.5)}[k]
        for kind in sets:
            scores, fraction = found[kind]
            metrics = evaluate.retrieval_metrics(scores, owners)
            rate = f"{100 * fraction:.2f}% exact, R@1 {metrics['i2t_r1']:.0f}/{metrics['t2i_r1']:.0f}"
            print_row(row(4, f"max_pair ranks, {kind} sets", k, best[kind], rate, best[kind] / floor, "product",
                          *(target if kind == "trained-like" else ("", None))))
        if "full" in best:
            print_row(row(4, "max_pair score_matrix (every pair exact)", k, best["full"], "100% exact",
                          best["full"] / floor, "product"))
        del sets, images, captions, found


def bare_product(images, captions, chunk_size=256):
    """score_matrix's chunk loop with only its matrix multiply: the price of the cosines."""
    n_img, k_v, dim = images.shape
    n_cap, k_t, _ = captions.shape
    caption_chunk = similarity._caption_chunk(images, chunk_size, k_t, n_cap)
    cos_buffer = images.new_empty(min(chunk_size, n_img) * k_v * k_t * caption_chunk)
    for c0 in range(0, n_cap, caption_chunk):
        c1 = min(n_cap, c0 + caption_chunk)
        caption_rows = captions[c0:c1].transpose(0, 1).reshape(k_t * (c1 - c0), dim)
        for i0 in range(0, n_img, chunk_size):
            i1 = min(n_img, i0 + chunk_size)
            cos = cos_buffer[: (i1 - i0) * k_v * k_t * (c1 - c0)].view((i1 - i0) * k_v, k_t * (c1 - c0))
            torch.matmul(images[i0:i1].reshape((i1 - i0) * k_v, dim), caption_rows.T, out=cos)


def trained_like_sets(n_img, per_image, k, dim, seed, concepts=200, noise=1.5, described=0.5):
    """Set embeddings with a trained model's structure: every image element is a concept from a
    shared bank plus its own noise; every caption element is, with probability `described`, one
    of its image's concepts (shuffled) with fresh noise, else an unrelated concept. Images that
    share concepts are the hard negatives. Part 4 prints their R@1 (i2t/t2i) beside the timing."""
    g = torch.Generator().manual_seed(seed)
    bank, image_concepts, caption_concepts = trained_like_concepts(n_img, per_image, k, dim, g, concepts, described)
    return embed_concepts(bank, image_concepts, noise, g), embed_concepts(bank, caption_concepts, noise, g)


def trained_like_concepts(n_img, per_image, k, dim, g, concepts=200, described=0.5):
    """The concepts of trained_like_sets: the bank (concepts, dim) of unit vectors, every image's K
    concept ids (N_img, K) and every caption's (N_img * per_image, K), drawn from generator g."""
    bank = F.normalize(torch.randn(concepts, dim, generator=g), dim=-1)
    image_concepts = torch.randint(concepts, (n_img, k), generator=g)  # (N_img, K)
    order = torch.rand(n_img * per_image, k, generator=g).argsort(1)  # (N_cap, K) shuffled elements
    caption_concepts = image_concepts.repeat_interleave(per_image, 0).gather(1, order)
    unrelated = torch.rand(n_img * per_image, k, generator=g) > described
    caption_concepts[unrelated] = torch.randint(concepts, (int(unrelated.sum()),), generator=g)
    return bank, image_concepts, caption_concepts


def embed_concepts(bank, ids, noise, g):
    """(N, K) concept ids -> (N, K, D) unit elements: each concept plus `noise` times a random unit vector."""
    return F.normalize(bank[ids] + noise * F.normalize(torch.randn(*ids.shape, bank.shape[1], generator=g), dim=-1),
                       dim=-1)


def random_sets(n_img, per_image, k, dim, seed):
    g = torch.Generator().manual_seed(seed + 100)
    return (F.normalize(torch.randn(n_img, k, dim, generator=g), dim=-1),
            F.normalize(torch.randn(n_img * per_image, k, dim, generator=g), dim=-1))


def assign_with(blocks, constant, value):
    """max_pair_assignment with similarity.<constant> set to value for this call (e.g. the subset DP
    up to K = 16, as without scipy, or the permutation product forced up to some K)."""
    saved = getattr(similarity, constant)
    setattr(similarity, constant, value)
    try:
        return similarity.max_pair_assignment(blocks)
    finally:
        setattr(similarity, constant, saved)


def bench_scoring(args, device):
    n_img, n_cap, dim = max(1, round(5000 * args.scale)), max(1, round(25000 * args.scale)), 1024
    for k, methods in ((4, ("mil", "max_pair", "greedy", "smooth_chamfer")), (8, ("mil", "max_pair"))):
        g = torch.Generator().manual_seed(k)
        images = F.normalize(torch.randn(n_img, k, dim, generator=g), dim=-1).to(device)
        captions = F.normalize(torch.randn(n_cap, k, dim, generator=g), dim=-1).to(device)
        floor = None
        for method in methods:
            progress(f"part 2, K={k}, {method}, {n_img} x {n_cap}")
            similarity.score_matrix(images[:64], captions[:2048], method)  # warm-up
            seconds = timed(lambda: similarity.score_matrix(images, captions, method), device)
            floor = floor or seconds
            label = "floor: cosine blocks + max (= mil)" if method == "mil" else method
            target = {(4, "max_pair"): ("<= 1.3x floor", 1.3), (8, "max_pair"): ("<= 3x floor", 3.0)}.get((k, method))
            print_row(row(2, f"{label} {n_img}x{n_cap}", k, seconds, f"{n_img * n_cap / seconds / 1e6:.1f} M pairs/s",
                          seconds / floor, "floor", *(target or ("", None))))
        del images, captions


def bench_training(args, device):
    batch, per_image, k, dim = 128, 5, 4, 1024
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(batch, k, dim, generator=g), dim=-1).to(device).requires_grad_(True)
    captions = F.normalize(torch.randn(batch * per_image, k, dim, generator=g), dim=-1).to(device).requires_grad_(True)
    positive_mask = (torch.arange(batch)[:, None] == torch.arange(batch * per_image)[None, :] // per_image).to(device)

    def step(method):
        images.grad = captions.grad = None
        scores = similarity.pairwise_similarity(images, captions, method, check_finite=False)   # as train.py
        losses.triplet_loss(scores, positive_mask).backward()

    methods = ("smooth_chamfer", "max_pair", "greedy", "chamfer", "topk", "mil")
    progress("part 3")
    best = {m: float("inf") for m in methods}
    for m in methods:  # warm-up
        step(m)
        step(m)
    for _ in range(args.train_repeats):  # interleaved, so background load hits every method alike
        for m in methods:
            best[m] = min(best[m], timed(lambda: step(m), device))
    for m in methods:
        target = ("<= 1.15x smooth_chamfer", 1.15) if m == "max_pair" else ("", None)
        print_row(row(3, f"train step B={batch}x{per_image} {m}", k, best[m], f"{best[m] * 1e3:.1f} ms/step",
                      best[m] / best["smooth_chamfer"], "smooth_chamfer", *target))


def row(part, case, k, seconds, rate, ratio, ratio_to, target="", limit=None):
    met = ""
    if target:
        met = "yes" if (ratio >= limit if target.startswith(">=") else ratio <= limit) else "NO"
    return [str(part), case, str(k), f"{seconds:.3f}", rate, f"{ratio:.2f}x {ratio_to}", target, met]


HEADER = ["part", "case", "K", "seconds", "rate", "ratio", "target", "met"]
WIDTHS = [4, 45, 1, 8, 24, 20, 23, 3]


def print_row(cells):
    """One table row, printed as soon as it is measured (a long run shows its progress)."""
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cells, WIDTHS)) + " |", flush=True)


if __name__ == "__main__":
    main()
