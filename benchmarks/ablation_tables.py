"""The tables of the pre-registered experiments (docs/experiment.md, docs/experiment_sets.md), from the
CSV that benchmarks/ablation.py writes.

    python benchmarks/ablation_tables.py                                   # benchmarks/results/matching.csv
    python benchmarks/ablation_tables.py benchmarks/results/sets.csv       # the second experiment (H4, H5)
    python benchmarks/ablation_tables.py runs/ablation_quick/results.csv   # any results CSV

The experiment is told by the CSV's columns: one with the metrics against every fitting item
(`complete_*`, the sets grid) is analysed by SETS_HYPOTHESES, any other by HYPOTHESES.

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
    # Against every fitting item (the sets experiment): the mean of the two directions, in percent.
    "map_at_r": (lambda row: both_directions(row, "map_at_r"), +1),
    "r_precision": (lambda row: both_directions(row, "r_precision"), +1),
    "complete_r1": (lambda row: both_directions(row, "r1"), +1),
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

# The second experiment (docs/experiment_sets.md): the primary measure of H4 and H5 is map_at_r; RSUM,
# R-Precision and R@1 against every positive are reported beside it and decide nothing.
SETS_HYPOTHESES = [
    ("H4", "with every loss, max_pair sets beat one vector in mAP@R against every fitting item", "map_at_r",
     [("max_pair all", "single vector")], True),
    ("H5", "with every loss, max_pair beats smooth_chamfer in mAP@R against every fitting item", "map_at_r",
     [("max_pair all", "smooth_chamfer all")], True),
    *[(name, "the same comparison", measure, [pair], False)
      for name, pair in (("H4", ("max_pair all", "single vector")), ("H5", ("max_pair all", "smooth_chamfer all")))
      for measure in ("r_precision", "complete_r1", "rsum")],
    ("-", "smooth_chamfer sets against one vector", "map_at_r", [("smooth_chamfer all", "single vector")], False),
    ("-", "the same comparison", "rsum", [("smooth_chamfer all", "single vector")], False),
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
    sets_experiment = bool(rows) and "complete_i2t_map_at_r" in rows[0]
    rows, dropped = current_rows(rows)
    if dropped:
        print(f"note: {dropped} row(s) of an older config hash left out\n")
    for dataset in sorted({row["dataset"] for row in rows}, key=lambda d: (d != "default", d)):
        chosen = [row for row in rows if row["dataset"] == dataset]
        if sets_experiment:
            print(f"## Dataset `{dataset}`\n\n{complete_configuration_table(chosen)}\n\n"
                  f"{hypothesis_table(chosen, SETS_HYPOTHESES)}\n\n{ordering_table(chosen)}\n")
        else:
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
    for name in configuration_names(rows):
        runs = [row for row in rows if row["configuration"] == name]
        column = lambda key, digits=1: mean_std([number(r, key) for r in runs], digits)   # noqa: E731
        sides = lambda key: f"{column('image_' + key, 2)} / {column('caption_' + key, 2)}"  # noqa: E731
        lines.append(f"| {name} | {len(runs)} | {column('rsum')} | {column('i2t_r1')} | {column('t2i_r1')} "
                     f"| {sides('log_circular_variance')} | {sides('intra_set_cos')} | {sides('global_cos')} "
                     f"| {sides('log_set_variance')} | {column('minutes')} |")
    return "\n".join(lines)


def complete_configuration_table(rows):
    """Markdown for the sets experiment: per configuration, mean ± sample std over seeds of the
    metrics against every fitting item (i2t / t2i), RSUM, and the collapse measures where defined."""
    lines = ["| configuration | seeds | mAP@R (mean of i2t, t2i) | mAP@R i2t / t2i | R-Precision i2t / t2i "
             "| R@1 (every positive) i2t / t2i | test RSUM | log circular variance | intra-set cos | min / run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in configuration_names(rows):
        runs = [row for row in rows if row["configuration"] == name]
        column = lambda key, digits=1: mean_std([number(r, key) for r in runs], digits)   # noqa: E731
        directions = lambda key: f"{column('complete_i2t_' + key)} / {column('complete_t2i_' + key)}"  # noqa: E731
        sides = lambda key: f"{column('image_' + key, 2)} / {column('caption_' + key, 2)}"  # noqa: E731
        primary = mean_std([MEASURES["map_at_r"][0](r) for r in runs], 1)
        lines.append(f"| {name} | {len(runs)} | {primary} | {directions('map_at_r')} | {directions('r_precision')} "
                     f"| {directions('r1')} | {column('rsum')} | {sides('log_circular_variance')} "
                     f"| {sides('intra_set_cos')} | {column('minutes')} |")
    positives = [r for r in rows if r["complete_i2t_positives_per_query"] != ""]
    if positives:
        lines.append("")
        lines.append(f"Positives per query (test split): {number(positives[0], 'complete_i2t_positives_per_query'):.2f} "
                     f"captions per image, {number(positives[0], 'complete_t2i_positives_per_query'):.2f} "
                     "images per caption.")
    return "\n".join(lines)


def ordering_table(rows):
    """Markdown, descriptive: the configurations ordered by mean RSUM and by mean mAP@R, and for each pair
    the seeds on which the two measures agree on the winner."""
    names = configuration_names(rows)
    means = {measure: {name: mean([MEASURES[measure][0](r) for r in rows if r["configuration"] == name])
                       for name in names} for measure in ("rsum", "map_at_r")}
    order = lambda measure: " > ".join(sorted(names, key=lambda n: -means[measure][n]))   # noqa: E731
    lines = ["| measure | order of the configurations (mean over seeds) |", "|---|---|",
             f"| test RSUM (R@K, written ground truth) | {order('rsum')} |",
             f"| mAP@R (every fitting item) | {order('map_at_r')} |", "",
             "| pair | seeds | same winner under RSUM and mAP@R |", "|---|---|---|"]
    for first_index, first in enumerate(names):
        for second in names[first_index + 1:]:
            agree, seeds = 0, 0
            for seed in sorted({r["seed"] for r in rows if r["configuration"] == first}, key=int):
                pair = [next((r for r in rows if r["configuration"] == name and r["seed"] == seed), None)
                        for name in (first, second)]
                if None in pair:
                    continue
                seeds += 1
                signs = [math.copysign(1, MEASURES[m][0](pair[0]) - MEASURES[m][0](pair[1])) for m in ("rsum", "map_at_r")]
                agree += signs[0] == signs[1]
            lines.append(f"| {first} vs {second} | {seeds} | {agree} / {seeds} |")
    return "\n".join(lines)


def hypothesis_table(rows, hypotheses=HYPOTHESES):
    """Markdown: every comparison of `hypotheses` as a paired difference, and each hypothesis' verdict."""
    lines = [f"| hypothesis | claimed better - worse | measure | pairs | mean difference (+ = as claimed) "
             f"| {CONFIDENCE:.0%} CI "
             "| wins | verdict |", "|---|---|---|---|---|---|---|---|"]
    for name, claim, measure, comparisons, decisive in hypotheses:
        results = [paired_difference(rows, better, worse, measure) for better, worse in comparisons]
        for (better, worse), result in zip(comparisons, results):
            lines.append(f"| {name} | {better} - {worse} | {measure} | {result['n']} | {signed(result['mean'])} "
                         f"| [{signed(result['low'])}, {signed(result['high'])}] | {result['wins']} / {result['n']} "
                         f"| {result['verdict'] if decisive else 'descriptive'} |")
        if decisive:
            lines.append(f"| **{name}** | {claim} | | | | | | **{combined_verdict([r['verdict'] for r in results])}** |")
    return "\n".join(lines)


def configuration_names(rows):
    """The configurations in the order of their first row."""
    names = []
    for row in rows:
        if row["configuration"] not in names:
            names.append(row["configuration"])
    return names


def both_directions(row, key):
    """The mean of a complete-positive metric over i2t and t2i."""
    return (number(row, f"complete_i2t_{key}") + number(row, f"complete_t2i_{key}")) / 2


def mean(values):
    return sum(values) / len(values) if values else math.nan


def signed(value):
    return "n/a" if math.isnan(value) else f"{value:+.2f}"


def number(row, key):
    """A CSV cell as a float; blank (a measure the run predates) as nan."""
    return float(row[key]) if row[key] != "" else math.nan


def mean_std(values, digits):
    values = [v for v in values if not math.isnan(v)]     # a measure absent for a configuration (K = 1)
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
