"""The tables of the pre-registered experiment (docs/experiment.md), from the CSV that benchmarks/ablation.py writes.

    python benchmarks/ablation_tables.py                                   # benchmarks/results/matching.csv
    python benchmarks/ablation_tables.py runs/ablation_quick/results.csv   # any results CSV

Per dataset: one row per configuration (mean ± sample std over seeds of test RSUM, R@1 both ways and
the collapse measures), then every pre-registered comparison of docs/experiment.md's hypotheses H1-H3 as
paired differences over the seeds both configurations finished (same seed = same initial weights and
batches): the mean, its 95% t-interval, and the number of seeds in which the claimed winner won. A
comparison is "supported" when the interval lies above 0 (the claim's direction), "contradicted"
when it lies below 0, "undecided" otherwise; a hypothesis is supported when all its comparisons
are, contradicted when any is, undecided otherwise. Rows marked "descriptive" are reported and
not part of a verdict.

When one (configuration, dataset) has rows with several config hashes (the config changed between
sessions), only the rows of the hash that finished last are used, and the others are counted in a
note; of two rows for one seed and hash the later one is used.
"""
import argparse
import csv
import math
import os
import sys

from scipy import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RESULTS = os.path.join(REPO, "benchmarks", "results", "matching.csv")
CONFIDENCE = 0.95

# Per-run measures: name -> (how it is computed from a CSV row, +1 when higher is better).
# The collapse measures average the image and caption sets of a run.
MEASURES = {
    "rsum": (lambda row: number(row, "rsum"), +1),
    "log_circular_variance": (lambda row: (number(row, "image_log_circular_variance")
                                           + number(row, "caption_log_circular_variance")) / 2, +1),
    "intra_set_cos": (lambda row: (number(row, "image_intra_set_cos") + number(row, "caption_intra_set_cos")) / 2, -1),
}

# (name, claim, measure, [(claimed better, claimed worse), ...], decides the verdict).
HYPOTHESES = [
    ("H1", "with every loss, max_pair > smooth_chamfer > mil in test RSUM", "rsum",
     [("max_pair all", "smooth_chamfer all"), ("smooth_chamfer all", "mil all")], True),
    ("H1", "the same order in the paper's own setting, Div + MMD only", "rsum",
     [("max_pair div+mmd", "smooth_chamfer div+mmd"), ("smooth_chamfer div+mmd", "mil div+mmd")], False),
    ("H2", "with Div + MMD only, max_pair's sets less collapsed than smooth_chamfer's, those than mil's",
     "log_circular_variance",
     [("max_pair div+mmd", "smooth_chamfer div+mmd"), ("smooth_chamfer div+mmd", "mil div+mmd")], True),
    ("H2", "the same, by intra-set cosine (lower = less collapsed)", "intra_set_cos",
     [("max_pair div+mmd", "smooth_chamfer div+mmd"), ("smooth_chamfer div+mmd", "mil div+mmd")], False),
    ("H3", "GD + ISD raise test RSUM for every matching", "rsum",
     [("max_pair all", "max_pair div+mmd"), ("smooth_chamfer all", "smooth_chamfer div+mmd"),
      ("mil all", "mil div+mmd")], True),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="?", default=DEFAULT_RESULTS, help="a CSV written by ablation.py")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.results):
        print(f"error: {args.results} does not exist; run benchmarks/ablation.py first", file=sys.stderr)
        return 2
    with open(args.results, newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows, dropped = current_rows(rows)
    if dropped:
        print(f"note: {dropped} row(s) of an older config hash left out\n")
    for dataset in sorted({row["dataset"] for row in rows}, key=lambda d: (d != "default", d)):
        chosen = [row for row in rows if row["dataset"] == dataset]
        print(f"## Dataset `{dataset}`\n\n{configuration_table(chosen)}\n\n{hypothesis_table(chosen)}\n")
    return 0


def current_rows(rows):
    """The rows to analyse: per (configuration, dataset) the hash that finished last, per seed its last
    row. Returns (rows, number of rows left out for an older hash)."""
    latest_hash = {}
    for row in sorted(rows, key=lambda r: r["finished_utc"]):
        latest_hash[(row["configuration"], row["dataset"])] = row["config_hash"]
    kept = {}
    for row in sorted(rows, key=lambda r: r["finished_utc"]):
        if row["config_hash"] == latest_hash[(row["configuration"], row["dataset"])]:
            kept[(row["configuration"], row["dataset"], row["seed"])] = row
    dropped = sum(1 for row in rows if row["config_hash"] != latest_hash[(row["configuration"], row["dataset"])])
    return list(kept.values()), dropped


def paired_difference(rows, better, worse, measure):
    """Claimed-better minus claimed-worse configuration, per seed both finished, signed so that a
    positive difference agrees with the claim. Returns n, mean, sd, the 95% t-interval (low, high),
    wins (seeds with a positive difference) and the verdict."""
    value, direction = MEASURES[measure]
    by_seed = {name: {row["seed"]: value(row) for row in rows if row["configuration"] == name}
               for name in (better, worse)}
    seeds = sorted(set(by_seed[better]) & set(by_seed[worse]), key=int)
    differences = [direction * (by_seed[better][seed] - by_seed[worse][seed]) for seed in seeds]
    n = len(differences)
    mean = sum(differences) / n if n else math.nan
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1)) if n > 1 else math.nan
    half_width = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    low, high = mean - half_width, mean + half_width
    return {"n": n, "mean": mean, "sd": sd, "low": low, "high": high, "wins": sum(d > 0 for d in differences),
            "verdict": verdict(low, high)}


def verdict(low, high):
    """supported: the interval lies above 0; contradicted: below 0; undecided: it holds 0 (or n < 2)."""
    if low > 0:
        return "supported"
    if high < 0:
        return "contradicted"
    return "undecided"


def combined_verdict(verdicts):
    """A hypothesis of several comparisons: supported if all are, contradicted if any is."""
    if any(v == "contradicted" for v in verdicts):
        return "contradicted"
    return "supported" if verdicts and all(v == "supported" for v in verdicts) else "undecided"


def configuration_table(rows):
    """Markdown: per configuration, mean ± sample std over seeds (collapse measures: image / caption)."""
    lines = ["| configuration | seeds | test RSUM | i2t R@1 | t2i R@1 | log circular variance | intra-set cos "
             "| cos to global | log set variance | min / run |", "|---|---|---|---|---|---|---|---|---|---|"]
    names = []
    for row in rows:
        if row["configuration"] not in names:
            names.append(row["configuration"])
    for name in names:
        runs = [row for row in rows if row["configuration"] == name]
        column = lambda key, digits=1: mean_std([number(r, key) for r in runs], digits)   # noqa: E731
        sides = lambda key: f"{column('image_' + key, 2)} / {column('caption_' + key, 2)}"  # noqa: E731
        lines.append(f"| {name} | {len(runs)} | {column('rsum')} | {column('i2t_r1')} | {column('t2i_r1')} "
                     f"| {sides('log_circular_variance')} | {sides('intra_set_cos')} | {sides('global_cos')} "
                     f"| {sides('log_set_variance')} | {column('minutes')} |")
    return "\n".join(lines)


def hypothesis_table(rows):
    """Markdown: every comparison of HYPOTHESES as a paired difference, and each hypothesis' verdict."""
    lines = [f"| hypothesis | claimed better - worse | measure | pairs | mean difference (+ = as claimed) "
             f"| {CONFIDENCE:.0%} CI "
             "| wins | verdict |", "|---|---|---|---|---|---|---|---|"]
    for name, claim, measure, comparisons, decisive in HYPOTHESES:
        results = [paired_difference(rows, better, worse, measure) for better, worse in comparisons]
        for (better, worse), result in zip(comparisons, results):
            lines.append(f"| {name} | {better} - {worse} | {measure} | {result['n']} | {signed(result['mean'])} "
                         f"| [{signed(result['low'])}, {signed(result['high'])}] | {result['wins']} / {result['n']} "
                         f"| {result['verdict'] if decisive else 'descriptive'} |")
        if decisive:
            lines.append(f"| **{name}** | {claim} | | | | | | **{combined_verdict([r['verdict'] for r in results])}** |")
    return "\n".join(lines)


def signed(value):
    return "n/a" if math.isnan(value) else f"{value:+.2f}"


def number(row, key):
    """A CSV cell as a float; blank (a measure the run predates) as nan."""
    return float(row[key]) if row[key] != "" else math.nan


def mean_std(values, digits):
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
