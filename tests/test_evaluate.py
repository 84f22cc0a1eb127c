"""evaluate.py: retrieval metrics against brute force (ties counted against the ground truth),
COCO 5-fold 1K, collapse diagnostics."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import config
import evaluate
import train
from evaluate import collapse_diagnostics, five_fold_metrics, retrieval_metrics, score_matrix, separate_overrides
from model import build_model, load_checkpoint
from test_train import tiny_overrides, write_precomputed


def metrics_from_ranks(i2t, t2i):
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


def pessimistic_metrics(scores, caption_to_image):
    """The tie rule counted by hand: rank = number of OTHER items scoring >= the ground truth."""
    scores = scores.tolist()
    owners = caption_to_image.tolist()
    i2t, t2i = [], []
    for i, row in enumerate(scores):
        threshold = max(row[j] for j, owner in enumerate(owners) if owner == i)
        i2t.append(sum(1 for j, owner in enumerate(owners) if owner != i and row[j] >= threshold))
    for j, owner in enumerate(owners):
        t2i.append(sum(1 for i in range(len(scores)) if i != owner and scores[i][j] >= scores[owner][j]))
    return metrics_from_ranks(i2t, t2i)


def brute_force_metrics(scores, caption_to_image):
    """Sort every row / column and look up ranks one by one (the textbook VSE++ procedure, which
    on ties favours whichever item the sort puts first; meant for tie-free scores)."""
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
    return metrics_from_ranks(i2t, t2i)


def noisy_scores(num_images, captions_per_image, signal, seed):
    """Gaussian noise plus `signal` on the ground truth; float64, so ties are practically impossible."""
    generator = torch.Generator().manual_seed(seed)
    owners = torch.arange(num_images).repeat_interleave(captions_per_image)
    scores = torch.randn(num_images, num_images * captions_per_image, generator=generator, dtype=torch.float64)
    scores[owners, torch.arange(len(owners))] += signal
    return scores, owners


@pytest.mark.parametrize("signal", [0.0, 1.5, 4.0])
def test_retrieval_metrics_match_brute_force_ranking(signal):
    """On tie-free scores the pessimistic rule gives exactly the textbook (VSE++) numbers."""
    scores, owners = noisy_scores(40, 5, signal, seed=int(signal * 10))
    assert scores.unique().numel() == scores.numel()
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


@pytest.mark.parametrize("decimals", [0, 1])
def test_tied_scores_count_against_the_ground_truth(decimals):
    """Scores rounded to a few values (a partly collapsed model) rank like the hand count."""
    scores, owners = noisy_scores(30, 5, signal=1.0, seed=decimals)
    scores = scores.round(decimals=decimals)
    fast = retrieval_metrics(scores, owners)
    slow = pessimistic_metrics(scores, owners)
    for key, value in slow.items():
        assert fast[key] == pytest.approx(value, abs=1e-9), key
    assert fast["rsum"] < brute_force_metrics(scores, owners)["rsum"]     # sort order used to break ties


def test_constant_scores_give_zero_recall_in_both_protocols():
    """A fully collapsed model scores every pair alike: every ground truth ranks last, not first."""
    owners = torch.arange(60).repeat_interleave(5)
    scores = torch.full((60, 300), 0.7)
    for metrics in (retrieval_metrics(scores, owners), five_fold_metrics(scores, owners, fold_size=12)):
        for key in evaluate.RECALL_KEYS + ("rsum",):
            assert metrics[key] == 0.0, key
    full = retrieval_metrics(scores, owners)
    assert full["i2t_meanr"] == 300 - 5 + 1 and full["t2i_meanr"] == 60


def test_planted_ties_give_the_hand_counted_rank():
    """Image 0's best ground-truth caption (0.9, tied with its sibling) is tied with exactly 3
    captions of other images and beaten by 2: rank 5. Caption 4's image score 0.8 is tied with
    exactly 7 other images: rank 7. Every other ground truth is alone at the top (rank 0)."""
    owners = torch.arange(12).repeat_interleave(2)                   # 12 images x 2 captions
    scores = torch.zeros(12, 24)
    scores[owners, torch.arange(24)] = 1.0
    scores[0, :2] = 0.9                                              # both own captions: not counted
    scores[0, [5, 9, 13]] = 0.9                                      # ties with other images' captions
    scores[0, [7, 20]] = 0.95
    scores[[1, 3, 5, 6, 7, 10, 11], 4] = 0.8                         # caption 4 belongs to image 2
    scores[2, 4] = 0.8
    scores[[2, 8], 7] = 0.5                                          # below caption 7's own score
    metrics = retrieval_metrics(scores, owners)
    assert metrics["i2t_meanr"] == pytest.approx(1 + 5 / 12)
    assert metrics["i2t_r1"] == metrics["i2t_r5"] == pytest.approx(100 * 11 / 12)
    assert metrics["i2t_r10"] == 100.0
    assert metrics["t2i_meanr"] == pytest.approx(1 + 7 / 24)
    assert metrics["t2i_r1"] == metrics["t2i_r5"] == pytest.approx(100 * 23 / 24)
    assert metrics["t2i_r10"] == 100.0
    for key, value in pessimistic_metrics(scores, owners).items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key


def test_identical_captions_of_different_images_do_not_inflate_recall():
    """Two images with the same caption text get the same score from both: neither is ranked first."""
    owners = torch.tensor([0, 1, 2])
    scores = torch.tensor([[0.9, 0.9, 0.1],
                           [0.9, 0.9, 0.2],
                           [0.0, 0.3, 0.8]])
    metrics = retrieval_metrics(scores, owners)
    assert metrics["i2t_r1"] == pytest.approx(100 / 3) and metrics["t2i_r1"] == pytest.approx(100 / 3)


def test_nan_scores_are_refused():
    scores, owners = noisy_scores(4, 2, signal=1.0, seed=0)
    scores[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(scores, owners)


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


def test_log_circular_variance_is_the_mean_over_sets_of_log_one_minus_the_mean_resultant_length():
    global_ = torch.nn.functional.normalize(torch.ones(3, 8), dim=-1)
    collapsed = torch.nn.functional.normalize(torch.ones(3, 4, 8), dim=-1)
    orthogonal = torch.eye(8)[:4].expand(3, 4, 8)                    # R = ||(1,1,1,1,0..)/4|| = 1/2
    opposed = torch.eye(8)[:2].repeat(3, 2, 1) * torch.tensor([1.0, 1.0, -1.0, -1.0]).view(1, 4, 1)   # R = 0
    assert collapse_diagnostics(collapsed, global_)["log_circular_variance"] == pytest.approx(math.log(1e-6))
    assert collapse_diagnostics(orthogonal, global_)["log_circular_variance"] == pytest.approx(math.log(0.5))
    assert collapse_diagnostics(opposed, global_)["log_circular_variance"] == pytest.approx(0.0, abs=1e-12)
    # two elements at angle theta: R = cos(theta / 2); a nearly collapsed set is very negative but finite
    theta = torch.tensor(0.01, dtype=torch.float64)
    pair = torch.stack([torch.tensor([1.0, 0.0]), torch.stack([theta.cos(), theta.sin()]).float()]).unsqueeze(0)
    expected = math.log(1 - math.cos(0.005))
    assert collapse_diagnostics(pair, pair[:, 0])["log_circular_variance"] == pytest.approx(expected, rel=1e-3)
    assert expected < -10
    # the mean is over the per-set logs (a geometric mean of 1 - R), not the log of the mean
    mixed = torch.cat([orthogonal[:1], opposed[:1]])
    assert collapse_diagnostics(mixed, global_[:2])["log_circular_variance"] == pytest.approx(math.log(0.5) / 2)


def test_overrides_and_flags_separate_in_any_order():
    parser = evaluate.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--ckpt", nargs="+")
    parser.add_argument("--out")
    argv = ["eval.chunk_size=64", "--ckpt", "a.pt", "b.pt", "data.root=/x", "c.pt", "--data.image_dir", "/img",
            "--out=m.json", "--eval.batch_size=8", "train.lr=1e-3"]
    flags, overrides = separate_overrides(argv, parser)
    assert flags == ["--ckpt", "a.pt", "b.pt", "c.pt", "--out=m.json"]
    assert overrides == ["eval.chunk_size=64", "data.root=/x", "data.image_dir=/img", "eval.batch_size=8",
                         "train.lr=1e-3"]
    assert parser.parse_args(flags).ckpt == ["a.pt", "b.pt", "c.pt"]


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
           "train": {"amp": "off"}, "data": {"dataset": dataset}, "model": {"set_head": {"type": "slots"}}}
    results = evaluate.evaluate_model(None, cfg, None, "cpu")
    assert set(results) == protocols | {"complete_note", "collapse", "method"}
    scores = evaluate.score_matrix(encoded[0], encoded[2], method="max_pair")
    assert results["all"] == retrieval_metrics(scores, encoded[4])
    if "1k" in protocols:
        assert results["1k"] == five_fold_metrics(scores, encoded[4], fold_size=2)


def test_a_collapsed_model_scores_zero_recall_in_all_and_1k(monkeypatch):
    """Every set the same one-hot vectors: exact, equal scores everywhere; recall 0, not RSUM 600."""
    monkeypatch.setattr(evaluate, "COCO_TEST_IMAGES", 60)     # 60 images in 5 folds of 12 stand in for 5K / 1K
    monkeypatch.setattr(evaluate, "COCO_FOLD_IMAGES", 12)
    element = torch.eye(8)[:2]                                 # (K, D): K = 2 distinct unit vectors
    encoded = (element.expand(60, 2, 8), torch.eye(8)[0].expand(60, 8), element.expand(300, 2, 8),
               torch.eye(8)[0].expand(300, 8), torch.arange(60).repeat_interleave(5))
    monkeypatch.setattr(evaluate, "encode_split", lambda *args: encoded)
    cfg = {"eval": {"method": None, "similarity_options": None, "chunk_size": 7, "rank_bounds": True},
           "loss": {"similarity": "max_pair", "similarity_options": {}},
           "train": {"amp": "off"}, "data": {"dataset": "coco"}, "model": {"set_head": {"type": "slots"}}}
    results = evaluate.evaluate_model(None, cfg, None, "cpu")
    for protocol in ("all", "1k"):
        for key in evaluate.RECALL_KEYS + ("rsum",):
            assert results[protocol][key] == 0.0, (protocol, key)


# ----------------------------------------------------------------------------- command line

def untrained_checkpoint(tmp_path, name="model.pt", seed=0, extra=()):
    """A checkpoint of a freshly initialised tiny model on tiny precomputed data (no training)."""
    if not (tmp_path / "precomp").exists():
        write_precomputed(tmp_path / "precomp")
    cfg = config.load_config(None, tiny_overrides(tmp_path, dataset="precomputed") + list(extra))
    vocab = train.make_vocabulary(cfg)
    torch.manual_seed(seed)
    model = build_model(cfg, vocab)
    path = tmp_path / name
    torch.save({"model": model.state_dict(), "config": cfg, "vocab": vocab, "epoch": 0}, path)
    return str(path)


@pytest.mark.parametrize("args, message", [
    (["--method", "nosuch"], "unknown similarity method 'nosuch'"),
    (["--method", "smooth_chamfer", "eval.similarity_options={alpha: 0}"], "alpha must be > 0"),
    (["eval.similarity_options={beta: 1}"], "unknown option(s) ['beta']"),
    (["--split", "nosuch"], "unknown split 'nosuch'"),
    (["eval.chunk_size=many"], "'eval.chunk_size' (command line) expects int"),
    (["--eval.chunk_size", "many"], "'eval.chunk_size' (command line) expects int"),
    (["eval.nosuch=1"], "unknown config key 'eval.nosuch'"),
    (["--split"], "argument --split: expected one argument"),
], ids=["method", "option_value", "option_name", "split", "override_type", "flag_override_type",
        "override_key", "flag_without_value"])
def test_bad_evaluate_flags_give_one_line_and_exit_2(tmp_path, capsys, args, message):
    code = evaluate.main(["--ckpt", untrained_checkpoint(tmp_path), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_missing_ckpt_flag_gives_one_line_and_exit_2(capsys):
    assert evaluate.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--ckpt" in err and len(err.strip().splitlines()) == 1


def test_unknown_method_on_the_command_line_is_one_line_not_a_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "evaluate.py", "--ckpt", untrained_checkpoint(tmp_path),
                             "--method", "nosuch"], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr


# ----------------------------------------------------------------------------- ensembles

def averaged_score_metrics(paths, split="test"):
    """The ensemble computed here from scratch: every checkpoint's score matrix, their mean, ranked."""
    matrices = []
    for path in paths:
        checkpoint = load_checkpoint(path)
        cfg = config.checkpoint_config(checkpoint, path)
        model, loader, device = evaluate.build_eval_context(cfg, checkpoint, split)
        image_sets, _, caption_sets, _, owners = evaluate.encode_split(model, loader, device)
        matrices.append(score_matrix(image_sets, caption_sets, method=cfg["loss"]["similarity"]))
    return retrieval_metrics(sum(matrices) / len(matrices), owners)


def test_an_ensemble_of_a_checkpoint_with_itself_has_its_metrics(tmp_path):
    path = untrained_checkpoint(tmp_path)
    out = tmp_path / "ensemble.json"
    assert evaluate.main(["--ckpt", path, path, "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert [model["ckpt"] for model in written["models"]] == [path, path]
    assert written["ensemble"]["all"] == written["models"][0]["all"] == written["models"][1]["all"]
    single = tmp_path / "single.json"
    assert evaluate.main(["--ckpt", path, "--out", str(single)]) == 0
    single_results = json.loads(single.read_text())
    assert written["models"][0] == {"ckpt": path, "split": "test", **single_results}   # the one layout, plus names


def test_an_ensemble_of_two_models_ranks_their_averaged_score_matrices(tmp_path, capsys):
    first, second = untrained_checkpoint(tmp_path, "a.pt", seed=0), untrained_checkpoint(tmp_path, "b.pt", seed=1)
    out = tmp_path / "ensemble.json"
    assert evaluate.main(["--ckpt", first, second, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed[2:5]] == [first, second, "ensemble"]
    written = json.loads(out.read_text())
    assert written["ensemble"]["all"] == averaged_score_metrics([first, second])
    assert written["models"][0]["all"] != written["models"][1]["all"]      # two different models


@pytest.mark.parametrize("difference, message", [
    ("data.test_split=dev", "split 'dev'"),
    ("data.root=OTHER", "images differ"),
], ids=["split", "dataset"])
def test_an_ensemble_of_checkpoints_on_different_data_is_one_line(tmp_path, capsys, difference, message):
    first = untrained_checkpoint(tmp_path, "a.pt")
    other_root = tmp_path / "other"
    write_precomputed(other_root / "precomp", seed=1)
    second = untrained_checkpoint(tmp_path, "b.pt", extra=[difference.replace("OTHER", str(other_root / "precomp"))])
    assert evaluate.main(["--ckpt", first, second]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoints ") and first in err and second in err and message in err
    assert len(err.strip().splitlines()) == 1


def test_overrides_before_and_after_ckpt_reach_every_checkpoint(tmp_path):
    first, second = untrained_checkpoint(tmp_path, "a.pt", seed=0), untrained_checkpoint(tmp_path, "b.pt", seed=1)
    for argv, method in ((["eval.method=greedy", "--ckpt", first, second], "greedy"),
                         (["--ckpt", first, second, "eval.method=chamfer", "--split", "dev"], "chamfer")):
        out = tmp_path / f"{method}.json"
        assert evaluate.main([*argv, "--out", str(out)]) == 0
        written = json.loads(out.read_text())
        assert [(m["ckpt"], m["method"]) for m in written["models"]] == [(first, method), (second, method)]


def refuse_to_evaluate(monkeypatch):
    def build_eval_context(*args, **kwargs):
        raise AssertionError("evaluation started before the request was checked")
    monkeypatch.setattr(evaluate, "build_eval_context", build_eval_context)


def test_out_into_a_missing_folder_is_one_line_before_anything_is_evaluated(tmp_path, capsys, monkeypatch):
    path = untrained_checkpoint(tmp_path)
    refuse_to_evaluate(monkeypatch)
    assert evaluate.main(["--ckpt", path, "--out", str(tmp_path / "missing" / "m.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and "missing" in err and len(err.strip().splitlines()) == 1, err


def test_results_that_cannot_be_written_raise_one_line_naming_the_file_not_a_flag():
    path = os.path.join("no", "such", "folder", "m.json")
    with pytest.raises(evaluate.FlagError, match="cannot be written") as caught:
        evaluate.write_results({"all": {}}, path)
    assert repr(path) in str(caught.value) and "--out" not in str(caught.value)   # train.py writes through it too


def test_a_corrupt_second_checkpoint_of_an_ensemble_fails_before_the_first_is_encoded(tmp_path, capsys,
                                                                                      monkeypatch):
    first, second = untrained_checkpoint(tmp_path, "a.pt"), untrained_checkpoint(tmp_path, "b.pt", seed=1)
    with open(second, "r+b") as handle:
        handle.truncate(100)
    refuse_to_evaluate(monkeypatch)
    assert evaluate.main(["--ckpt", first, second]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and second in err and len(err.strip().splitlines()) == 1, err


def test_a_checkpoint_with_nan_weights_is_one_line_naming_the_weight(tmp_path, capsys):
    path = untrained_checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    name = next(key for key, value in checkpoint["model"].items() if value.is_floating_point())
    checkpoint["model"][name].view(-1)[0] = float("nan")
    torch.save(checkpoint, path)
    assert evaluate.main(["--ckpt", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and path in err and repr(name) in err and "NaN" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_a_checkpoint_whose_model_entry_is_not_a_weights_dict_is_one_line(tmp_path, capsys):
    path = untrained_checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    torch.save({**checkpoint, "model": list(checkpoint["model"].values())}, path)
    assert evaluate.main(["--ckpt", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a MaxMatch checkpoint" in err and len(err.strip().splitlines()) == 1


def test_the_ensemble_table_prints_the_collapse_columns_of_the_single_model_table():
    metrics = {key: float(n) for n, key in enumerate(evaluate.RECALL_KEYS + ("rsum", "i2t_medr", "t2i_medr"))}
    diag = {"intra_set_cos": 0.5, "global_cos": 0.25, "log_set_variance": -1.5, "log_circular_variance": -2.75}
    model = {"ckpt": "a.pt", "split": "test", "all": metrics, "collapse": {"image": diag, "caption": diag},
             "method": "max_pair"}
    single = evaluate.format_results({k: v for k, v in model.items() if k not in ("ckpt", "split")}).splitlines()
    ensemble = evaluate.format_ensemble([model], {"all": metrics, "method": "mean"}).splitlines()
    assert single[-1].split() == ["caption", "0.500", "|", "0.250", "|", "-1.500", "|", "-2.750"]
    assert ensemble[-1].split() == ["a.pt", *single[-1].split()]
    assert "log circ var" in ensemble[-3] and single[-3].endswith(ensemble[-3])
