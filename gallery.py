"""A gallery of sets on disk, and the centroid index that finds an approximate top k in it fast.

Storage (`Gallery`): a folder holding gallery.json (kind, the checkpoint's fingerprint, K, D,
dtype), sets.bin (raw float32 rows of shape (K, D): `np.memmap(path, np.float32, "r").reshape(-1,
K, D)`), log.jsonl (one line per stored row: its key, row and file fingerprint; removals) and
snapshot.json (keys and rows as of the last completed `index`, read by queries). Rows are appended
and made durable before their log line, so an interrupted `index` keeps every finished batch; an
item's position in the gallery is where it first entered.

Index (`SetIndex`, `search.py query --approximate`): candidates for the exact search of search.py,
found by centroid interaction (PLAID's first stage, Santhanam et al. 2022). Every gallery element
is assigned to the nearest of C centroids (spherical k-means); an item is scored by the Chamfer
sum of its elements' centroids,

    approx(q, item) = sum_i max_j cos(q_i, centroid(item_j)),

which stands in for the Chamfer sum sum_i max_j cos(q_i, item_j), itself an upper bound of the
score of every matching (METHOD.md §5). Only the items owning an element in the `probe` nearest
centroids of some query element are scored; the best `candidates` of them are searched exactly.
So every returned score is exact, and the index misses only what its candidates miss: it is not
exact, the exact path (search.top_k) is. docs/search.md has the measured recall.

Imports torch and numpy only.
"""
import contextlib
import json
import math
import os
import pickle
import sys

import numpy as np
import torch

GALLERY_FORMAT, GALLERY_VERSION = "maxmatch-gallery", 1
INDEX_FILE, INDEX_FORMAT = "set_index.pt", "maxmatch-set-index-1"
INDEX_CANDIDATES, INDEX_PROBE = 2000, 8      # query defaults: the smallest on docs/search.md's 1M curve above 95%
INDEX_TUNED_FOR = "tuned for >= 95% recall@10 at 1M benchmark sets, 98.5% measured (docs/search.md)"
KMEANS_ITERATIONS, KMEANS_SAMPLE = 10, 40    # k-means rounds, and elements sampled per centroid
ASSIGN_ELEMENTS = 65536                      # gallery elements assigned to centroids per step


class SearchError(Exception):
    """A search request the user has to fix (missing gallery, another checkpoint, empty query...)."""


class Gallery:
    """A gallery folder (see the module docstring). Gallery.open(path) reads it; `len`, `keys` (in
    gallery order), `chunks` and `take` serve top_k; Gallery.create and `append` / `remove` write it."""

    def __init__(self, path, header, for_index=False):
        self.path, self.header = str(path), header
        self.kind, self.dtype = header["kind"], np.dtype(header["dtype"])
        self.num_embeds, self.embed_dim = header["num_embeds"], header["embed_dim"]
        self.row_bytes = self.num_embeds * self.embed_dim * self.dtype.itemsize
        self.items = {}            # key -> (row, fingerprint, source), in gallery order
        self.num_rows, self.log_bytes = 0, 0    # rows of sets.bin in use (live or not); valid log length
        if for_index or not self._read_snapshot():
            self._replay_log()
        self._sets, self._rows = None, None

    @classmethod
    def open(cls, path, for_index=False):
        """The gallery at `path`; a query reads its snapshot when that is current, `index` the full log."""
        header_path = os.path.join(str(path), "gallery.json")
        if not os.path.isfile(header_path):
            what = "is not a gallery (no gallery.json)" if os.path.isdir(str(path)) else "does not exist"
            raise SearchError(f"gallery {str(path)!r} {what}: make one with `python search.py index --ckpt CKPT "
                              f"--images DIR --out {path}`")
        try:
            with open(header_path, encoding="utf-8") as handle:
                header = json.load(handle)
            if header.get("format") != GALLERY_FORMAT or header.get("version") != GALLERY_VERSION:
                raise ValueError(f"format {header.get('format')!r} version {header.get('version')!r}")
            return cls(path, header, for_index)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise SearchError(f"gallery {str(path)!r} cannot be read ({error}); index it again into a new "
                              "folder") from None

    @classmethod
    def create(cls, path, kind, trained, dtype="float32"):
        """An empty gallery of `kind` (images or captions) for the sets of `trained`."""
        os.makedirs(str(path), exist_ok=True)
        header = {"format": GALLERY_FORMAT, "version": GALLERY_VERSION, "kind": kind, "dtype": dtype,
                  "num_embeds": trained.cfg["model"]["num_embeds"], "embed_dim": trained.cfg["model"]["embed_dim"],
                  "checkpoint": {"path": trained.path, "fingerprint": trained.fingerprint, "epoch": trained.epoch},
                  "similarity": {"method": trained.method, "options": trained.options}}
        for name in ("sets.bin", "log.jsonl"):
            open(os.path.join(str(path), name), "wb").close()
        write_atomic(os.path.join(str(path), "gallery.json"), json.dumps(header, indent=2) + "\n")
        return cls(path, header)

    def __len__(self):
        return len(self.items)

    @property
    def keys(self):
        return list(self.items)

    @property
    def rows(self):
        """(N,) int64: the row of sets.bin holding each item's set, in gallery order."""
        if self._rows is None:
            self._rows = np.fromiter((row for row, _, _ in self.items.values()), dtype=np.int64, count=len(self.items))
        return self._rows

    def sets_array(self):
        """Every stored row as a read-only-by-use memory map (num_rows, K, D) (copy-on-write)."""
        if self._sets is None or self._sets.shape[0] != self.num_rows:
            self._sets = np.memmap(os.path.join(self.path, "sets.bin"), dtype=self.dtype, mode="c",
                                   shape=(self.num_rows, self.num_embeds, self.embed_dim)) if self.num_rows else \
                np.zeros((0, self.num_embeds, self.embed_dim), self.dtype)
        return self._sets

    def chunks(self, size):
        """(start position, float32 tensor (n, K, D)) over the gallery; contiguous rows are read
        from the memory map without a copy."""
        sets, rows = self.sets_array(), self.rows
        for start in range(0, len(rows), size):
            part = rows[start:start + size]
            if part[-1] - part[0] == len(part) - 1 and (len(part) < 2 or (np.diff(part) == 1).all()):
                block = sets[part[0]:part[-1] + 1]
            else:
                block = sets[part]
            yield start, torch.from_numpy(np.asarray(block)).float()

    def take(self, positions):
        """float32 tensor (n, K, D) of the items at gallery positions (n,)."""
        return torch.from_numpy(np.asarray(self.sets_array()[self.rows[np.asarray(positions)]])).float()

    def append(self, keys, fingerprints, sets, source):
        """Store the sets (n, K, D) of `keys` durably: rows first (flushed and synced), then their log lines.
        A key already present keeps its gallery position and gets the new row."""
        data = np.ascontiguousarray(sets.detach().cpu().numpy().astype(self.dtype, copy=False))
        assert data.shape[1:] == (self.num_embeds, self.embed_dim), data.shape
        append_synced(os.path.join(self.path, "sets.bin"), data.tobytes())
        records = []
        for offset, (key, fingerprint) in enumerate(zip(keys, fingerprints)):
            row = self.num_rows + offset
            records.append({"key": key, "row": row, "fingerprint": fingerprint, "source": source})
        self.log_bytes += append_synced(os.path.join(self.path, "log.jsonl"),
                                        "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
        for record in records:
            self.items[record["key"]] = (record["row"], record["fingerprint"], record["source"])
        self.num_rows += len(records)
        self._rows = None

    def remove(self, keys):
        if keys:
            self.log_bytes += append_synced(os.path.join(self.path, "log.jsonl"),
                                            "".join(json.dumps({"remove": key}) + "\n" for key in keys).encode("utf-8"))
            for key in keys:
                self.items.pop(key, None)
            self._rows = None

    def repair(self):
        """Before writing: cut what an interrupted run left after its last complete batch (rows not yet
        logged, a half-written log line)."""
        for name, size in (("sets.bin", self.num_rows * self.row_bytes), ("log.jsonl", self.log_bytes)):
            with open(os.path.join(self.path, name), "r+b") as handle:
                handle.truncate(size)

    def write_snapshot(self):
        """snapshot.json: the keys and rows in gallery order and the log length they describe, so that a
        query loads a million items without parsing the log (fingerprints and sources stay in the log)."""
        write_atomic(os.path.join(self.path, "snapshot.json"), json.dumps(
            {"log_bytes": self.log_bytes, "num_rows": self.num_rows, "keys": self.keys,
             "rows": self.rows.tolist()}) + "\n")

    def _read_snapshot(self):
        """Load snapshot.json if the log still has the length it describes (the log only grows, and a
        repair cuts only what no snapshot saw); False otherwise."""
        try:
            with open(os.path.join(self.path, "snapshot.json"), "rb") as handle:
                snapshot = json.load(handle)
            current = snapshot["log_bytes"] == os.path.getsize(os.path.join(self.path, "log.jsonl")) and \
                snapshot["num_rows"] * self.row_bytes <= os.path.getsize(os.path.join(self.path, "sets.bin"))
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if current:
            self.items = dict(zip(snapshot["keys"], ((row, None, None) for row in snapshot["rows"])))
            self.log_bytes, self.num_rows = snapshot["log_bytes"], snapshot["num_rows"]
        return current

    def _replay_log(self):
        """Read log.jsonl up to its last complete line whose rows are all stored: in one parse when the
        log is intact (a million lines in seconds), else line by line (after an interruption)."""
        stored_rows = os.path.getsize(os.path.join(self.path, "sets.bin")) // self.row_bytes
        with open(os.path.join(self.path, "log.jsonl"), "rb") as handle:
            content = handle.read()
        end = content.rfind(b"\n") + 1
        try:       # json.dumps never writes a raw newline inside a record
            records = json.loads(b"[" + content[:max(end - 1, 0)].replace(b"\n", b",") + b"]")
            self.items, largest_row = replay(records, stored_rows)
        except (ValueError, KeyError, TypeError, IndexError):
            records, end = [], 0
            while content.find(b"\n", end) >= 0:
                line_end = content.find(b"\n", end)
                try:
                    record = json.loads(content[end:line_end])
                    replay([record], stored_rows)
                except (ValueError, KeyError, TypeError, IndexError):
                    break
                records.append(record)
                end = line_end + 1
            self.items, largest_row = replay(records, stored_rows)
        self.log_bytes, self.num_rows = end, largest_row + 1


def replay(records, stored_rows):
    """(items {key: (row, fingerprint, source)} in gallery order, the largest row) of log records;
    IndexError if one names a row that sets.bin does not hold."""
    items, largest_row = {}, -1
    for record in records:
        if "remove" in record:
            items.pop(record["remove"], None)
            continue
        row = int(record["row"])
        if row >= stored_rows:
            raise IndexError(row)
        items[record["key"]] = (row, record["fingerprint"], record["source"])
        largest_row = max(largest_row, row)
    return items, largest_row


def append_synced(path, payload):
    """Append bytes to a file and make them durable; returns their length."""
    with open(path, "ab") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    return len(payload)


def write_atomic(path, text):
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def gallery_chunks(gallery, size, device):
    """(start, float32 sets) over a tensor or a Gallery, on `device`."""
    if isinstance(gallery, Gallery):
        for start, sets in gallery.chunks(size):
            yield start, sets.to(device)
    else:
        for start in range(0, gallery.shape[0], size):
            yield start, gallery[start:start + size].to(device).float()


def take_sets(gallery, positions, device):
    if isinstance(gallery, Gallery):
        return gallery.take(positions.cpu().numpy()).to(device)
    return gallery[positions.to(gallery.device)].to(device).float()


def gallery_shape(gallery):
    if isinstance(gallery, Gallery):
        return len(gallery), gallery.num_embeds, gallery.embed_dim
    return tuple(gallery.shape)


@contextlib.contextmanager
def gallery_lock(path):
    """An exclusive lock on the gallery folder while `index` writes it: a second writer fails at once.
    Unlocked where the OS has no fcntl or the file system refuses flock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(os.path.join(str(path), ".lock"), "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SearchError(f"gallery {str(path)!r} is being indexed by another process") from None
        except OSError:
            pass
        yield


# ----------------------------------------------------------------------------- the centroid index

class SetIndex:
    """Centroids (C, D), each gallery element's nearest centroid `codes` (N, K) int32, and the
    inverted lists: `owners` (N * K,) int32, the item of every element grouped by centroid, with
    list c at owners[offsets[c]:offsets[c + 1]]. `state` is the gallery state it was built for."""

    def __init__(self, centroids, codes, state):
        self.centroids, self.codes, self.state = centroids, codes, state
        flat = codes.reshape(-1).long()
        self.owners = (flat.argsort(stable=True) // codes.shape[1]).int()          # (N * K,)
        self.offsets = torch.zeros(centroids.shape[0] + 1, dtype=torch.long)
        self.offsets[1:] = torch.bincount(flat, minlength=centroids.shape[0]).cumsum(0)

    def __len__(self):
        return self.codes.shape[0]

    def candidates(self, query, budget=INDEX_CANDIDATES, probe=INDEX_PROBE):
        """(c,) long gallery positions, increasing: of the items owning an element in one of the
        `probe` nearest centroids of a query element, the `budget` best by the centroid Chamfer sum.
        Every item when budget covers the gallery. query (K_q, D)."""
        count = len(self)
        if budget >= count:
            return torch.arange(count)
        table = query.detach().float().cpu() @ self.centroids.T                   # (K_q, C)
        lists = table.topk(min(int(probe), table.shape[1]), dim=1).indices.reshape(-1).unique().tolist()
        reached = torch.zeros(count, dtype=torch.bool)
        for centroid in lists:
            reached[self.owners[self.offsets[centroid]:self.offsets[centroid + 1]].long()] = True
        items = reached.nonzero()[:, 0]                                             # (n,) increasing
        if items.numel() > budget:
            approx = table[:, self.codes[items].long()].amax(2).sum(0)              # (K_q, n, K) -> (n,)
            items = items[approx.topk(budget).indices].sort().values
        return items


def build_set_index(gallery, lists=None, seed=0, state=None):
    """A SetIndex of a Gallery or an (N, K, D) tensor: `lists` centroids (default about the square
    root of the element count, a power of two), spherical k-means (KMEANS_ITERATIONS rounds) on a
    seeded sample of KMEANS_SAMPLE elements per centroid, then every element assigned."""
    count, embeds, dim = gallery_shape(gallery)
    if count == 0:
        raise SearchError("the gallery is empty: index some items first")
    elements = count * embeds
    lists = int(lists or 2 ** max(0, round(math.log2(math.sqrt(elements)))))
    lists = min(lists, elements)
    generator = torch.Generator().manual_seed(seed)
    sample_items = min(count, max(1, -(-KMEANS_SAMPLE * lists // embeds)))
    chosen = torch.randperm(count, generator=generator)[:sample_items].sort().values
    sample = unit(take_sets(gallery, chosen, torch.device("cpu")).reshape(-1, dim))   # (S, D)
    centroids = sample[torch.randperm(sample.shape[0], generator=generator)[:lists]].clone()
    for _ in range(KMEANS_ITERATIONS):
        nearest = nearest_centroids(sample, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, sample)
        sizes = torch.bincount(nearest, minlength=lists)
        empty = sizes == 0                                    # re-seed an empty list with a sample element
        sums[empty] = sample[torch.randint(sample.shape[0], (int(empty.sum()),), generator=generator)]
        centroids = unit(sums)
    codes = torch.empty(count, embeds, dtype=torch.int32)
    step = max(1, ASSIGN_ELEMENTS // embeds)
    for start, sets in gallery_chunks(gallery, step, torch.device("cpu")):
        codes[start:start + sets.shape[0]] = nearest_centroids(sets.reshape(-1, dim), centroids).view(-1, embeds).int()
    return SetIndex(centroids, codes, state or {})


def load_set_index(gallery):
    """The gallery's saved SetIndex when it was built for the gallery as it is now; otherwise built,
    saved in the gallery folder, and announced in one line on stderr."""
    path = os.path.join(gallery.path, INDEX_FILE)
    state = index_state(gallery)
    with contextlib.suppress(OSError, RuntimeError, ValueError, KeyError, TypeError, EOFError,
                             pickle.UnpicklingError):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["format"] == INDEX_FORMAT and saved["state"] == state:
            return SetIndex(saved["centroids"], saved["codes"], state)
    print(f"building the set index of {gallery.path} ({len(gallery)} {gallery.kind}; once, saved there)",
          file=sys.stderr)
    return save_set_index(gallery)


def save_set_index(gallery):
    """Build the gallery's SetIndex and save it (atomically) with the gallery state it describes; a
    folder that cannot be written gets one warning line and the index is used unsaved."""
    index = build_set_index(gallery, state=index_state(gallery))
    path = os.path.join(gallery.path, INDEX_FILE)
    try:
        torch.save({"format": INDEX_FORMAT, "state": index.state, "centroids": index.centroids,
                    "codes": index.codes}, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
    except OSError as error:                     # a read-only gallery: use the index, rebuild it next time
        print(f"warning: the set index cannot be saved in {gallery.path} ({error.strerror or error}); "
              "it is built again by every query", file=sys.stderr)
    return index


def index_state(gallery):
    """What a saved index must match: the log is append-only, so its length names the content."""
    return {"log_bytes": gallery.log_bytes, "rows": gallery.num_rows, "items": len(gallery),
            "fingerprint": gallery.header["checkpoint"]["fingerprint"]}


def nearest_centroids(elements, centroids):
    """(n,) long: the centroid of largest cosine for each of the elements (n, D), in chunks."""
    return torch.cat([(elements[start:start + ASSIGN_ELEMENTS] @ centroids.T).argmax(1)
                      for start in range(0, elements.shape[0], ASSIGN_ELEMENTS)])


def unit(vectors):
    return torch.nn.functional.normalize(vectors.float(), dim=-1)
