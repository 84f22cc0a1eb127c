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
    (c)     search.faiss_top_k: candidates from a FAISS index of the gallery's elements (IVF with
            8-bit scalar quantisation from 200,000 elements on; --faiss-neighbours per query
            element), exact matching of the candidates; recall@10 against (b)

"peak MB" is the largest resident-memory growth while one query runs (sampled every 2 ms, after
freed memory is returned to the OS); the gallery itself (N x 4 KB) and the FAISS index are listed
on their own rows. "x bare" and "growth" (against the previous, 10x smaller gallery) are CPU times. Then:
`python search.py index --split test` on the built-in dataset (1,000 test images), images/s; and
with --float16-check CKPT, whether storing the sets in float16 would change any rank on that
checkpoint's test split (metrics, and every query's top 10 both ways, against float32).
With --open, instead of the queries: the time to open a gallery folder of each size, as a query
does (its snapshot.json) and as `index` does (its whole log.jsonl); item keys like
/data/photos/folder_0000/image_0000000.jpg, sets of K = D = 1 (opening does not read the sets).

    python benchmarks/search_bench.py                            # 10k, 100k, 1M (about 15 minutes here)
    python benchmarks/search_bench.py --sizes 10000 100000 --queries 10
    python benchmarks/search_bench.py --ckpt runs/shapes_maxmatch/best.pt   # index with that checkpoint
    python benchmarks/search_bench.py --sizes --skip-index --float16-check runs/shapes_maxmatch/best.pt
    python benchmarks/search_bench.py --open --skip-index              # opening gallery folders
"""
import argparse
import contextlib
import ctypes
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import search  # noqa: E402
from similarity import score_matrix  # noqa: E402
from similarity_bench import embed_concepts, trained_like_concepts  # noqa: E402

TOP = 10


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000], help="gallery sizes")
    parser.add_argument("--queries", type=int, default=20, help="timed queries per size (median reported)")
    parser.add_argument("--embeds", type=int, default=4, help="K")
    parser.add_argument("--dim", type=int, default=256, help="D")
    parser.add_argument("--threads", type=int, default=1, help="torch (and FAISS) CPU threads (default 1: one "
                        "query's latency, stable on a shared machine)")
    parser.add_argument("--faiss-neighbours", type=int, nargs="*", default=[search.FAISS_NEIGHBOURS, 2048],
                        help="FAISS rows: nearest gallery elements per query element (none: skip FAISS)")
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
            print(f"# FAISS rows skipped: {search.FAISS_HINT}")
    print(f"# search benchmark: torch {torch.__version__}, cpu, {torch.get_num_threads()} threads, K = {args.embeds}, "
          f"D = {args.dim}, top {TOP}, {args.queries} queries per size, load average before "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    print_row(HEADER)
    print("|" + "|".join("-" * (w + 2) for w in WIDTHS) + "|", flush=True)
    previous = {}
    for size in args.sizes:
        previous = bench_open(size) if args.open else bench_size(size, args, faiss, previous)
    if not args.skip_index:
        bench_index(args)
    if args.float16_check:
        float16_check(args.float16_check)
    print(f"# load average after {os.getloadavg()[0]:.2f} (other processes share these cores: compare ratios "
          "within one size)")


def bench_size(size, args, faiss, previous):
    progress(f"{size}: generating the gallery")
    gallery, queries = trained_like_gallery(size, args.embeds, args.dim, args.queries + 1, seed=size)
    cases = {"bare": lambda q: bare_product(q, gallery),
             "(a)": lambda q: exhaustive_top_k(q, gallery),
             "(b)": lambda q: search.top_k(q, gallery, TOP)}
    faiss_rows = []
    if faiss is not None:
        progress(f"{size}: building the FAISS index")
        started = time.perf_counter()
        index = search.build_faiss_index(gallery)
        build_seconds = time.perf_counter() - started
        index_mb = len(faiss.serialize_index(index)) / 2**20
        for neighbours in args.faiss_neighbours:
            name = f"(c) {neighbours}"
            cases[name] = lambda q, n=neighbours: search.faiss_top_k(q, gallery, index, TOP, neighbours=n)
            faiss_rows.append(name)
    seconds = {name: [] for name in cases}             # wall
    cpu_seconds = {name: [] for name in cases}         # this thread's CPU time: the query's cost without
    answers = {name: [] for name in cases}             # the waits for a core that other processes cause
    for number, query in enumerate(queries):
        progress(f"{size}: query {number + 1}/{len(queries)}")
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
    label = f"{size:,}"
    print_row([label, "gallery in memory (float32)", "", "", "", f"{gallery.numel() * 4 / 2**20:.0f}", "", "", ""])
    medians = {name: statistics.median(values) for name, values in cpu_seconds.items()}
    walls = {name: statistics.median(values) for name, values in seconds.items()}
    bare = medians["bare"]
    notes = {"bare": "cosine product only", "(a)": f"{size:,} matched",
             "(b)": f"{matched:,.0f} matched (median); top 10 = (a) in {same}/{len(exact)}"}
    recalls = {}
    for name in faiss_rows:
        found = [answer.positions.tolist() for answer in answers[name]]
        recalls[name] = statistics.mean(len(set(f) & set(e)) / TOP for f, e in zip(found, exact))
        candidates = statistics.median(answer.matched for answer in answers[name])
        notes[name] = f"{candidates:,.0f} candidates (median)"
    if faiss_rows:
        print_row([label, f"FAISS index ({'flat' if size * args.embeds < search.FAISS_FLAT_BELOW else 'IVF, SQ8'})",
                   f"build {build_seconds:.0f} s", "", "", f"{index_mb:.0f}", "", "", ""])
    for name in cases:
        growth = f"{medians[name] / previous[name]:.1f}x" if name in previous else ""
        recall = f"{100 * recalls[name]:.1f}%" if name in recalls else ""
        print_row([label, CASE_NAMES.get(name, f"(c) FAISS + exact, {name[4:]} neighbours"),
                   f"{1e3 * walls[name]:.1f}", f"{1e3 * medians[name]:.1f}", f"{medians[name] / bare:.2f}x",
                   f"{peaks[name]:.0f}", recall, growth, notes[name]])
    del gallery
    return medians


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
            print_row([label, case, f"{1e3 * wall:.0f}", f"{1e3 * cpu:.0f}", "", "", "", "",
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
                   "", "", "", "", f"{images / seconds:.0f} images/s (loading the model included)"])
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
        print_row([split, f"float16 check: {label}", "", "", "", "", "", "",
                   f"metrics changed: {changed}; top 10 differs for {text} of {captions.shape[0]} text and "
                   f"{image} of {images.shape[0]} image queries"])


def top_ten(scores, dim):
    """Every query's 10 best items (ties in gallery order): text queries rank images (dim 0)."""
    order = scores.sort(dim=dim, descending=True, stable=True).indices
    return order[:TOP].T if dim == 0 else order[:, :TOP]


def progress(message):
    print(f"  ... {message}", file=sys.stderr, flush=True)


HEADER = ["gallery", "case", "wall ms", "CPU ms", "x bare", "peak MB", "recall@10", "growth", "notes"]
WIDTHS = [19, 38, 8, 8, 6, 7, 9, 6, 44]


def print_row(cells):
    print("| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, WIDTHS)) + " |", flush=True)


if __name__ == "__main__":
    main()
