"""Speed and memory of search.py's exact top-k search on synthetic galleries, and `index` throughput.
Prints one table; the rows of one gallery size are measured in the same run, interleaved per query.

Galleries of 10k, 100k and 1M "trained-like" image sets (K = 4, D = 256): the concept-bank sets
of benchmarks/similarity_bench.py (every element is a concept of a shared bank of 200 plus noise;
a text query is the caption set of a random gallery image: half of its elements are that image's
concepts, the rest unrelated ones). Per size, the median wall time and CPU time (of this thread;
one thread by default, so it is what the query costs without waiting for a core) of one text query
(top 10), over --queries queries after one warm-up query, of:

    bare    the cosine product of the query's K elements with every gallery element: the floor
    (a)     every item matched exactly: similarity.score_matrix over the gallery, then the top 10
    (b)     search.top_k: the row-maxima bounds, then exact matching only where a bound reaches
            the running 10th exact score (the same top 10 as (a); checked on every query)
    (c)     the previous `query --faiss` (element_neighbour_top_k, kept here to compare): the items
            owning the --faiss-neighbours nearest gallery elements of each query element in a FAISS
            index of every element (IVF with 8-bit scalar quantisation from 200,000 elements on),
            matched exactly; needs faiss-cpu, skipped with the install line without it
    (d)     search.approximate_top_k, `query --approximate`: the --index-candidates best items by
            gallery.SetIndex's centroid Chamfer sum among those reached through --index-probes
            centroids per query element, matched exactly
    (e)     fixed-dimensional encodings (MUVERA; --fde): the --fde-candidates items of largest FDE
            inner product, by a flat scan (the best recall an index of the encodings could give),
            matched exactly

Recall@10 is against (b), the exact top 10; "(b) / this" is how many times less CPU than (b).
"peak MB" is the largest resident-memory growth while one query runs (sampled every 2 ms, after
freed memory is returned to the OS); the gallery itself (N x 4 KB) and the indexes are listed
on their own rows. With --model-gallery CKPT the same cases run on real model sets: the
checkpoint's image sets of --model-images generated shapes images, queried with caption sets of
random images of them. "x bare" and "growth" (against the previous, 10x smaller gallery) are CPU times. Then:
`python search.py index --split test` on the built-in dataset (1,000 test images), images/s; and
with --float16-check CKPT, whether storing the sets in float16 would change any rank on that
checkpoint's test split (metrics, and every query's top 10 both ways, against float32).
With --open, instead of the queries: the time to open a gallery folder of each size, as a query
does (its snapshot.json) and as `index` does (its whole log.jsonl); item keys like
/data/photos/folder_0000/image_0000000.jpg, sets of K = D = 1 (opening does not read the sets).

    python benchmarks/search_bench.py                            # 10k, 100k, 1M (about 20 minutes here)
    python benchmarks/search_bench.py --sizes --skip-index --model-gallery runs/shapes_maxmatch/best.pt   # ~15 min
    python benchmarks/search_bench.py --sizes 10000 100000 --queries 10
    python benchmarks/search_bench.py --ckpt runs/shapes_maxmatch/best.pt   # index with that checkpoint
    python benchmarks/search_bench.py --sizes --skip-index --float16-check runs/shapes_maxmatch/best.pt
    python benchmarks/search_bench.py --open --skip-index              # opening gallery folders
"""
import argparse
import contextlib
import ctypes
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import search  # noqa: E402
from gallery import build_set_index  # noqa: E402
from similarity import score_matrix  # noqa: E402
from similarity_bench import embed_concepts, trained_like_concepts  # noqa: E402

TOP = 10
FAISS_FLAT_BELOW = 200_000       # the previous --faiss: fewer gallery elements get an exact flat FAISS index
FAISS_HINT = "the FAISS rows need faiss: pip install faiss-cpu"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000], help="gallery sizes")
    parser.add_argument("--queries", type=int, default=20, help="timed queries per size (median reported)")
    parser.add_argument("--embeds", type=int, default=4, help="K")
    parser.add_argument("--dim", type=int, default=256, help="D")
    parser.add_argument("--threads", type=int, default=1, help="torch (and FAISS) CPU threads (default 1: one "
                        "query's latency, stable on a shared machine)")
    parser.add_argument("--index-candidates", type=int, nargs="*", default=[250, 500, 1000, 2000, 3000, 5000],
                        help="(d) rows: set index candidates searched exactly (none: skip the set index)")
    parser.add_argument("--index-probes", type=int, nargs="+", default=[8, 16],
                        help="(d) rows: centroids probed per query element")
    parser.add_argument("--faiss-neighbours", type=int, nargs="*", default=[256, 2048],
                        help="(c) rows, the previous --faiss: nearest gallery elements per query element (none: skip)")
    parser.add_argument("--fde", type=fde_setting, default=(8, 2, 32), metavar="R,BITS,D",
                        help="(e) rows: FDE repetitions, SimHash bits and count-sketch dimension (D 0: identity; "
                        "default 8,2,32: 1,024 dimensions, the size of the gallery's own rows)")
    parser.add_argument("--fde-candidates", type=int, nargs="*", default=[1000, 3000, 10000, 30000],
                        help="(e) rows: FDE candidates searched exactly (none: skip FDE)")
    parser.add_argument("--model-gallery", metavar="CKPT", default=None,
                        help="also: a gallery of this checkpoint's sets of --model-images generated shapes images")
    parser.add_argument("--model-images", type=int, default=100_000, help="images of the --model-gallery split")
    parser.add_argument("--ckpt", default=None, help="checkpoint for the index row (default: a random-init "
                        "model of config.yaml; the encoding cost is the same)")
    parser.add_argument("--skip-index", action="store_true", help="no index throughput row")
    parser.add_argument("--data-root", default="data/shapes", help="built-in dataset folder for the index row")
    parser.add_argument("--open", action="store_true", help="time opening gallery folders instead of queries")
    parser.add_argument("--float16-check", metavar="CKPT", default=None,
                        help="also: would float16-stored sets change a rank on this checkpoint's test split?")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss = None
    if args.faiss_neighbours:
        try:
            import faiss
            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            print(f"# (c) rows skipped: {FAISS_HINT}")
    print(f"# search benchmark: torch {torch.__version__}, cpu, {torch.get_num_threads()} threads, K = {args.embeds}, "
          f"D = {args.dim}, top {TOP}, {args.queries} queries per size, load average before "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    print_row(HEADER)
    print("|" + "|".join("-" * (w + 2) for w in WIDTHS) + "|", flush=True)
    previous = {}
    for size in args.sizes:
        previous = bench_open(size) if args.open else bench_size(size, args, faiss, previous)
    if args.model_gallery:
        bench_model_gallery(args, faiss)
    if not args.skip_index:
        bench_index(args)
    if args.float16_check:
        float16_check(args.float16_check)
    print(f"# load average after {os.getloadavg()[0]:.2f} (other processes share these cores: compare ratios "
          "within one size)")


def bench_size(size, args, faiss, previous):
    progress(f"{size}: generating the gallery")
    gallery, queries = trained_like_gallery(size, args.embeds, args.dim, args.queries + 1, seed=size)
    medians = bench_gallery(f"{size:,}", gallery, queries, args, faiss, previous)
    del gallery
    return medians


def bench_gallery(label, gallery, queries, args, faiss, previous):
    """Every case on one gallery (N, K, D), the queries interleaved; prints the rows, returns the CPU medians."""
    size, embeds, dim = gallery.shape
    cases = {"bare": lambda q: bare_product(q, gallery),
             "(a)": lambda q: exhaustive_top_k(q, gallery),
             "(b)": lambda q: search.top_k(q, gallery, TOP)}
    builds = []                                        # (case name, seconds, MB)
    if args.index_candidates:
        progress(f"{label}: building the set index")
        started = time.perf_counter()
        index = build_set_index(gallery)
        builds.append((f"set index ({index.centroids.shape[0]:,} centroids)", time.perf_counter() - started,
                       sum(t.numel() * t.element_size() for t in (index.centroids, index.codes, index.owners,
                                                                  index.offsets)) / 2**20))
        for probe in args.index_probes:
            for budget in args.index_candidates:
                cases[f"(d) {probe} {budget}"] = lambda q, p=probe, n=budget: search.approximate_top_k(
                    q, gallery, index, TOP, candidates=n, probe=p)
    if faiss is not None and args.faiss_neighbours:
        progress(f"{label}: building the FAISS element index")
        started = time.perf_counter()
        element_index = build_element_index(gallery, faiss)
        builds.append((f"FAISS element index ({'flat' if size * embeds < FAISS_FLAT_BELOW else 'IVF, SQ8'})",
                       time.perf_counter() - started, len(faiss.serialize_index(element_index)) / 2**20))
        for neighbours in args.faiss_neighbours:
            cases[f"(c) {neighbours}"] = lambda q, n=neighbours: element_neighbour_top_k(q, gallery, element_index, n)
    if args.fde and args.fde_candidates:
        repetitions, bits, projection_dim = args.fde
        progress(f"{label}: encoding the gallery's FDEs")
        planes, projection = fde_parameters(dim, repetitions, bits, projection_dim, seed=0)
        started = time.perf_counter()
        encodings = torch.cat([fixed_dimensional_encodings(gallery[start:start + 8192], planes, projection, "item")
                               for start in range(0, size, 8192)])                      # (N, R * 2^bits * d)
        builds.append((f"FDE encodings ({encodings.shape[1]:,} dims, flat)", time.perf_counter() - started,
                       encodings.numel() * 4 / 2**20))
        for budget in args.fde_candidates:
            cases[f"(e) {budget}"] = lambda q, n=budget: fde_top_k(q, gallery, encodings, planes, projection, n)
    seconds = {name: [] for name in cases}             # wall
    cpu_seconds = {name: [] for name in cases}         # this thread's CPU time: the query's cost without
    answers = {name: [] for name in cases}             # the waits for a core that other processes cause
    for number, query in enumerate(queries):
        progress(f"{label}: query {number + 1}/{len(queries)}")
        for name, run in cases.items():                 # interleaved: background load hits every case alike
            started, started_cpu = time.perf_counter(), time.thread_time()
            answer = run(query)
            if number:                                  # query 0 is the warm-up
                cpu_seconds[name].append(time.thread_time() - started_cpu)
                seconds[name].append(time.perf_counter() - started)
                answers[name].append(answer)
    peaks = {name: peak_memory_mb(lambda run=run: run(queries[1])) for name, run in cases.items()}
    exact = [answer.positions.tolist() for answer in answers["(b)"]]
    same = sum(a == b.positions.tolist() for a, b in zip(exact, answers["(a)"]))
    matched = statistics.median(answer.matched for answer in answers["(b)"])
    print_row([label, "gallery in memory (float32)", "", "", "", "", f"{gallery.numel() * 4 / 2**20:.0f}", "", "", ""])
    for name, build_seconds, megabytes in builds:
        print_row([label, name, f"build {build_seconds:.0f} s", "", "", "", f"{megabytes:.0f}", "", "", ""])
    medians = {name: statistics.median(values) for name, values in cpu_seconds.items()}
    walls = {name: statistics.median(values) for name, values in seconds.items()}
    notes = {"bare": "cosine product only", "(a)": f"{size:,} matched",
             "(b)": f"{matched:,.0f} matched (median); top 10 = (a) in {same}/{len(exact)}"}
    recalls = {}
    for name in cases:
        if name[:3] in ("(c)", "(d)", "(e)"):
            found = [answer.positions.tolist() for answer in answers[name]]
            hits = [len(set(f) & set(e)) / TOP for f, e in zip(found, exact)]
            recalls[name] = statistics.mean(hits)
            notes[name] = (f"{statistics.median(answer.matched for answer in answers[name]):,.0f} candidates "
                           f"(median); worst query {100 * min(hits):.0f}%")
    for name in cases:
        growth = f"{medians[name] / previous[name]:.1f}x" if name in previous else ""
        recall = f"{100 * recalls[name]:.1f}%" if name in recalls else ""
        print_row([label, case_name(name), f"{1e3 * walls[name]:.1f}", f"{1e3 * medians[name]:.1f}",
                   f"{medians[name] / medians['bare']:.2f}x", f"{medians['(b)'] / medians[name]:.1f}x",
                   f"{peaks[name]:.0f}", recall, growth, notes[name]])
    return medians


def case_name(name):
    if name[:3] == "(c)":
        return f"(c) FAISS element neighbours, {name[4:]}"
    if name[:3] == "(d)":
        probe, budget = name[4:].split()
        return f"(d) set index, probe {probe}, {int(budget):,} cand."
    if name[:3] == "(e)":
        return f"(e) FDE (flat), {int(name[4:]):,} cand."
    return CASE_NAMES[name]


CASE_NAMES = {"bare": "bare cosine product", "(a)": "(a) every item matched exactly", "(b)": "(b) bound-pruned exact"}


def trained_like_gallery(count, embeds, dim, num_queries, seed, chunk=65536):
    """(gallery (count, K, D), queries (Q, K, D)): similarity_bench's trained-like image sets, drawn in
    chunks into one tensor, and the caption sets of Q random gallery images as text queries."""
    g = torch.Generator().manual_seed(seed)
    bank, image_concepts, caption_concepts = trained_like_concepts(count, 1, embeds, dim, g)
    gallery = torch.empty(count, embeds, dim)
    for start in range(0, count, chunk):
        gallery[start:start + chunk] = embed_concepts(bank, image_concepts[start:start + chunk], 1.5, g)
    sources = torch.randint(count, (num_queries,), generator=g)
    return gallery, embed_concepts(bank, caption_concepts[sources], 1.5, g)


def bench_model_gallery(args, faiss):
    """Every case on real model sets: the checkpoint's image sets of a generated shapes split of
    --model-images images (seed 7, not its training data), queried with the caption sets of random
    images of it (the first caption of each)."""
    from shapes import generate_shapes
    folder = tempfile.mkdtemp(prefix="search_bench_model_")
    try:
        progress(f"model gallery: generating {args.model_images:,} shapes images")
        json_path = generate_shapes(folder, seed=7, num_train=0, num_val=0, num_test=args.model_images)
        records = json.load(open(json_path, encoding="utf-8"))["images"]
        trained = search.load_trained(args.model_gallery, device="cpu")
        progress(f"model gallery: encoding {len(records):,} images")
        started = time.perf_counter()
        gallery = trained.encode_images([os.path.join(folder, "images", r["filename"]) for r in records])
        encode_seconds = time.perf_counter() - started
        sources = torch.randint(len(records), (args.queries + 1,), generator=torch.Generator().manual_seed(7))
        queries = trained.encode_captions([records[i]["sentences"][0]["raw"] for i in sources.tolist()])
        label = f"model sets {len(records) // 1000}k" if len(records) >= 1000 else f"model sets {len(records)}"
        print_row([label, f"encoded {len(records):,} images (K = {gallery.shape[1]}, D = {gallery.shape[2]})",
                   f"{encode_seconds:.0f} s", "", "", "", "", "", "", f"{trained.method}, {args.model_gallery}"])
        bench_gallery(label, gallery, queries, args, faiss, {})
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def fde_setting(text):
    repetitions, bits, dim = (int(part) for part in text.split(","))
    return repetitions, bits, dim or None


def bench_open(size):
    """Open a gallery folder of `size` items from its log (as `index` does) and from its snapshot (as a
    query does), after writing it with Gallery.append in batches."""
    folder = tempfile.mkdtemp(prefix="search_bench_open_")
    try:
        progress(f"{size}: writing a gallery folder")
        owner = search.TrainedModel(model=None, cfg={"model": {"num_embeds": 1, "embed_dim": 1}}, tokenizer=None,
                                    device=torch.device("cpu"), method="max_pair", options={}, path="synthetic",
                                    fingerprint="synthetic")
        gallery = search.Gallery.create(folder, "images", owner)
        for start in range(0, size, 65536):
            keys = [f"/data/photos/folder_{i // 1000:04d}/image_{i:07d}.jpg"
                    for i in range(start, min(size, start + 65536))]
            gallery.append(keys, [[123456, 1700000000000000000 + i] for i in range(len(keys))],
                           torch.zeros(len(keys), 1, 1), "/data/photos")
        gallery.write_snapshot()
        label = f"{size:,}"
        for case, for_index in (("open the folder: its log (as index)", True),
                                ("open the folder: its snapshot (as query)", False)):
            started, started_cpu = time.perf_counter(), time.thread_time()
            opened = search.Gallery.open(folder, for_index=for_index)
            wall, cpu = time.perf_counter() - started, time.thread_time() - started_cpu
            assert opened.keys == gallery.keys
            print_row([label, case, f"{1e3 * wall:.0f}", f"{1e3 * cpu:.0f}", "", "", "", "", "",
                       f"log {os.path.getsize(os.path.join(folder, 'log.jsonl')) / 2**20:.0f} MB"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {}


def bare_product(query, gallery):
    """search.top_k's pass over the gallery with only its matrix product."""
    dim = gallery.shape[2]
    size = max(1, search.CHUNK_BYTES // (4 * gallery.shape[1] * dim))
    for start in range(0, gallery.shape[0], size):
        gallery[start:start + size].reshape(-1, dim) @ query.T


def exhaustive_top_k(query, gallery):
    """Every item matched exactly (float32, score_matrix), sorted by score then gallery position."""
    size = max(1, search.CHUNK_BYTES // (4 * gallery.shape[1] * gallery.shape[2]))
    scores = score_matrix(gallery, query[None], "max_pair", chunk_size=size)[:, 0]
    order = scores.sort(descending=True, stable=True).indices[:TOP]
    return search.SearchResult(order, scores[order], gallery.shape[0])


def element_neighbour_top_k(query, gallery, index, neighbours):
    """The previous `search.py query --faiss` (replaced by --approximate, kept here to compare): the
    items owning the `neighbours` nearest gallery elements of each query element (by inner product,
    in a FAISS index of every element), searched exactly by top_k."""
    embeds = gallery.shape[1]
    _, element_ids = index.search(np.ascontiguousarray(query.float().numpy()), int(neighbours))
    candidates = torch.from_numpy(np.unique(element_ids[element_ids >= 0] // embeds)).long()   # increasing
    found = search.top_k(query, gallery[candidates], TOP)
    return search.SearchResult(candidates[found.positions], found.scores, int(candidates.numel()))


def build_element_index(gallery, faiss, nprobe=32, seed=0):
    """A FAISS inner-product index of every gallery element (id = position * K + element), as the
    previous --faiss built it: exact (flat) below FAISS_FLAT_BELOW elements, else IVF with 8-bit
    scalar quantisation, about sqrt(elements) lists, 10 k-means rounds on 40 elements per list."""
    count, embeds, dim = gallery.shape
    if count * embeds < FAISS_FLAT_BELOW:
        index = faiss.IndexFlatIP(dim)
    else:
        lists = 2 ** round(math.log2(math.sqrt(count * embeds)))
        index = faiss.index_factory(dim, f"IVF{lists},SQ8", faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = 10
        sample = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:max(1, 40 * lists // embeds)]
        index.train(gallery[sample.sort().values].reshape(-1, dim).numpy())
        index.nprobe = nprobe
    for start in range(0, count, 65536):
        index.add(np.ascontiguousarray(gallery[start:start + 65536].reshape(-1, dim).numpy()))
    return index


def fde_parameters(dim, repetitions, bits, projection_dim, seed):
    """The random draws of fixed-dimensional encodings (MUVERA, Dhulipala et al. 2024): SimHash
    hyperplanes (R, D, bits) and a count-sketch projection (R, D, d), one +-1 per input coordinate
    (unbiased for inner products), or None for the identity (d = D)."""
    g = torch.Generator().manual_seed(seed)
    planes = torch.randn(repetitions, dim, bits, generator=g)
    if projection_dim is None:
        return planes, None
    projection = torch.zeros(repetitions, dim, projection_dim)
    columns = torch.randint(projection_dim, (repetitions, dim, 1), generator=g)
    signs = torch.randint(2, (repetitions, dim, 1), generator=g).float() * 2 - 1
    return planes, projection.scatter_(2, columns, signs)


def fixed_dimensional_encodings(sets, planes, projection, side):
    """(N, K, D) sets -> (N, R * 2^bits * d) encodings whose inner product approximates the Chamfer
    sum sum_i max_j <q_i, p_j>. Per repetition the SimHash signs split space into 2^bits partitions;
    a query ("query") puts the sum of its projected elements in each partition, an item ("item")
    the mean of its elements there, and an empty partition gets the item element whose sign pattern
    is nearest in Hamming distance (MUVERA's fill_empty_partitions)."""
    count, embeds, dim = sets.shape
    repetitions, _, bits = planes.shape
    partitions = 2 ** bits
    signs = torch.einsum("nkd,rdb->nrkb", sets, planes) > 0                           # (N, R, K, bits)
    partition = (signs.long() << torch.arange(bits)).sum(-1)                          # (N, R, K)
    if projection is None:
        points = sets.unsqueeze(1).expand(count, repetitions, embeds, dim)
    else:
        points = torch.einsum("nkd,rdp->nrkp", sets, projection)                      # (N, R, K, d)
    members = torch.nn.functional.one_hot(partition, partitions).float()              # (N, R, K, P)
    encoding = torch.einsum("nrkp,nrkd->nrpd", members, points)                       # sums (N, R, P, d)
    if side == "item":
        sizes = members.sum(2)                                                        # (N, R, P)
        encoding = encoding / sizes.clamp(min=1).unsqueeze(-1)
        differing = partition.unsqueeze(-1) ^ torch.arange(partitions)                # (N, R, K, P)
        hamming = sum((differing >> bit) & 1 for bit in range(bits)) if bits else torch.zeros_like(differing)
        nearest = hamming.argmin(2)                                                   # (N, R, P)
        fill = points.gather(2, nearest.unsqueeze(-1).expand(*nearest.shape, points.shape[-1]))
        encoding = torch.where((sizes == 0).unsqueeze(-1), fill, encoding)
    return encoding.reshape(count, -1)


def fde_top_k(query, gallery, encodings, planes, projection, candidates):
    """The `candidates` items of largest FDE inner product (a flat scan: the best recall any index of
    the encodings could give), searched exactly by top_k."""
    approx = encodings @ fixed_dimensional_encodings(query[None], planes, projection, "query")[0]    # (N,)
    chosen = approx.topk(min(candidates, len(approx))).indices.sort().values
    found = search.top_k(query, gallery[chosen], TOP)
    return search.SearchResult(chosen[found.positions], found.scores, int(chosen.numel()))


def peak_memory_mb(run):
    """Largest growth of the resident set while run() runs, in MB (sampled every 2 ms)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)        # give freed memory back first
    start = resident_bytes()
    peak, done = [start], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.002)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        run()
    finally:
        done.set()
        thread.join()
    return max(0, max(peak[0], resident_bytes()) - start) / 2**20


def resident_bytes():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_index(args):
    """`search.py index --split test` on the built-in dataset: the encoding rate it reports."""
    import config
    import train
    from data import prepare_data
    from model import build_model
    folder = tempfile.mkdtemp(prefix="search_bench_")
    try:
        checkpoint = args.ckpt
        overrides = [] if args.ckpt else [f"data.root={args.data_root}", f"run.num_threads={args.threads}"]
        if checkpoint is None:
            cfg = config.load_config(None, overrides)
            prepare_data(cfg["data"])
            vocab = train.make_vocabulary(cfg)
            torch.manual_seed(0)
            checkpoint = os.path.join(folder, "random.pt")
            torch.save({"model": build_model(cfg, vocab).state_dict(), "config": cfg, "vocab": vocab}, checkpoint)
        progress("index throughput")
        started = time.perf_counter()
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            code = search.main(["index", "--ckpt", checkpoint, "--split", "test", "--out", os.path.join(folder, "g")])
        seconds = time.perf_counter() - started
        if code != 0:
            raise SystemExit(f"index failed with exit code {code}")
        images = len(search.Gallery.open(os.path.join(folder, "g")))
        source = "--ckpt" if args.ckpt else "random init"
        print_row(["built-in test split", f"`search.py index --split test` ({source})", f"{seconds:.1f} s", "",
                   "", "", "", "", "", f"{images / seconds:.0f} images/s (loading the model included)"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def float16_check(path):
    """Ranks on the checkpoint's test split from float32 sets and from float16-rounded ones (the gallery
    alone, and both sides), all scored exactly in float64: metrics and every query's top 10."""
    import evaluate
    from model import load_checkpoint
    progress("float16 check")
    checkpoint = load_checkpoint(path)
    cfg, method, options = evaluate.checkpoint_settings(checkpoint, path, [], None)
    model, loader, device = evaluate.build_eval_context(cfg, checkpoint, cfg["data"]["test_split"], "cpu")
    images, _, captions, _, owners = evaluate.encode_split(model, loader, device)

    def scores(image_sets, caption_sets):
        return score_matrix(image_sets.double(), caption_sets.double(), method, **options).float()

    reference = scores(images, captions)
    split = f"{cfg['data']['test_split']} split ({images.shape[0]} x {captions.shape[0]})"
    for label, rounded in (("images float16, captions float32", scores(images.half().float(), captions)),
                           ("images and captions float16", scores(images.half().float(), captions.half().float()))):
        before, after = evaluate.retrieval_metrics(reference, owners), evaluate.retrieval_metrics(rounded, owners)
        changed = ", ".join(f"{key} {before[key]:.6g} -> {after[key]:.6g}" for key in before
                            if before[key] != after[key]) or "none"
        text = int((top_ten(reference, 0) != top_ten(rounded, 0)).any(1).sum())
        image = int((top_ten(reference, 1) != top_ten(rounded, 1)).any(1).sum())
        print_row([split, f"float16 check: {label}", "", "", "", "", "", "", "",
                   f"metrics changed: {changed}; top 10 differs for {text} of {captions.shape[0]} text and "
                   f"{image} of {images.shape[0]} image queries"])


def top_ten(scores, dim):
    """Every query's 10 best items (ties in gallery order): text queries rank images (dim 0)."""
    order = scores.sort(dim=dim, descending=True, stable=True).indices
    return order[:TOP].T if dim == 0 else order[:, :TOP]


def progress(message):
    print(f"  ... {message}", file=sys.stderr, flush=True)


HEADER = ["gallery", "case", "wall ms", "CPU ms", "x bare", "(b) / this", "peak MB", "recall@10", "growth", "notes"]
WIDTHS = [19, 38, 8, 8, 6, 10, 7, 9, 6, 44]


def print_row(cells):
    print("| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, WIDTHS)) + " |", flush=True)


if __name__ == "__main__":
    main()
