"""The single-vector baseline (model.set_head.type=none) and sets of one (model.num_embeds=1): the
model, every similarity at K = 1, the config checks, and a tiny run on the default ResNet + BiGRU path."""
import json
import os
import subprocess
import sys

import pytest
import torch

import config
import evaluate
import similarity
import train
from model import ModelError, build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(REPO, "configs", "shapes_single_vector.yaml")


def tiny_overrides(tmp_path, name):
    """tests/test_train.py's tiny run: 48 shapes images of 32 px, D = 32, a two-stage ResNet-18 + BiGRU."""
    return [f"run.out_dir={tmp_path / 'runs'}", f"run.name={name}", "run.num_threads=1", "model.embed_dim=32",
            "model.set_head.depth=1", "model.text.word_dim=16", "train.epochs=2", "train.batch_size=8",
            "train.log_every=1", "eval.batch_size=16", f"data.root={tmp_path / 'shapes'}",
            "data.shapes.num_train=48", "data.shapes.num_val=16", "data.shapes.num_test=16",
            "data.shapes.image_size=32", "data.image_size=32", "model.image.stop_after=layer1"]


def test_without_a_set_head_the_one_element_is_the_normalised_global_feature():
    cfg = config.load_config(PRESET, ["model.embed_dim=16", "model.image.stop_after=layer1"])
    model = build_model(cfg, ["<pad>", "<start>", "<end>", "<unk>", "<mask>", "red"]).eval()
    batch = {"images": torch.randn(3, 3, 32, 32), "tokens": torch.tensor([[1, 5, 2], [1, 5, 2], [1, 2, 0]]),
             "lengths": torch.tensor([3, 3, 2])}
    image, caption = model(batch)
    for embedding in (image, caption):
        assert embedding.sets.shape[1] == 1
        assert torch.equal(embedding.sets[:, 0], embedding.global_)
        assert torch.allclose(embedding.sets.norm(dim=-1), torch.ones(3, 1))
        assert not embedding.residuals.any()
    assert not any("slots" in name or "blocks" in name for name, _ in model.named_parameters())
    with pytest.raises(ModelError, match="no set elements that attend"):
        model.encode_images(batch, return_attention=True)


@pytest.mark.parametrize("method", similarity.METHODS)
def test_every_similarity_of_sets_of_one_is_their_cosine(method):
    generator = torch.Generator().manual_seed(3)
    images = torch.nn.functional.normalize(torch.randn(7, 1, 12, generator=generator), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(9, 1, 12, generator=generator), dim=-1)
    cosine = images[:, 0] @ captions[:, 0].t()
    assert torch.allclose(similarity.pairwise_similarity(images, captions, method), cosine, atol=1e-6)
    assert torch.allclose(similarity.score_matrix(images, captions, method, chunk_size=3), cosine, atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (["model.num_embeds=4"], "set model.num_embeds=1"),
    (["loss.gd.weight=0.1"], "loss.gd.weight=0"),
    (["loss.isd.weight=0.1", "loss.div.weight=0.01"], "loss.div.weight=0 loss.isd.weight=0"),
    (["model.set_head.type=mlp"], "model.set_head.type='mlp' is unknown"),
], ids=["num_embeds", "gd", "isd_div", "unknown_type"])
def test_a_single_vector_config_that_cannot_work_is_one_line(tmp_path, capsys, overrides, message):
    assert train.main(["--config", PRESET, f"run.out_dir={tmp_path}", *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_the_default_config_with_no_set_head_names_every_key_to_change(tmp_path, capsys):
    assert train.main([f"run.out_dir={tmp_path}", "model.set_head.type=none", "model.num_embeds=1"]) == 2
    err = capsys.readouterr().err
    assert "loss.div.weight=0 loss.gd.weight=0 loss.isd.weight=0" in err and "shapes_single_vector.yaml" in err


def test_the_baseline_trains_and_evaluates_on_the_default_path_with_absent_collapse_measures(tmp_path):
    """python train.py --config configs/shapes_single_vector.yaml on tiny data, then evaluate.py: the
    complete-positive block is there, the collapse measures are absent with their reason, and every
    similarity gives the same metrics (at K = 1 they are all the cosine)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "train.py", "--config", PRESET, *tiny_overrides(tmp_path, "single")],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "one vector per item" in run.stdout and "n/a" in run.stdout
    run_dir = tmp_path / "runs" / "single"
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert "complete" in metrics
    for side in ("image", "caption"):
        assert set(metrics["collapse"][side].values()) == {None}
    assert "set_head.type=none" in metrics["collapse"]["note"]
    epochs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    train_terms = next(entry["train"] for entry in epochs if "train" in entry)
    assert {"div", "gd", "isd"}.isdisjoint(train_terms) and {"triplet", "con", "mmd"} <= set(train_terms)

    results = {}
    for method in similarity.METHODS:
        out = tmp_path / f"{method}.json"
        assert evaluate.main(["--ckpt", str(run_dir / "best.pt"), "--method", method, "--out", str(out)]) == 0
        results[method] = json.loads(out.read_text())
    reference = results["max_pair"]
    for method, result in results.items():
        for part in ("all", "complete"):
            assert json.dumps(result[part], sort_keys=True) == json.dumps(reference[part], sort_keys=True), method


def test_a_slot_set_of_one_trains_and_reports_only_the_cosine_to_the_global_feature(tmp_path, capsys):
    overrides = tiny_overrides(tmp_path, "one_slot") + ["model.num_embeds=1", "train.epochs=1"]
    assert train.main(overrides) == 0
    metrics = json.loads((tmp_path / "runs" / "one_slot" / "test_metrics.json").read_text())
    for side in ("image", "caption"):
        diagnostics = metrics["collapse"][side]
        assert isinstance(diagnostics["global_cos"], float) and -1.0 <= diagnostics["global_cos"] <= 1.0
        assert diagnostics["intra_set_cos"] is None and diagnostics["log_circular_variance"] is None
    assert "K = 1" in metrics["collapse"]["note"]
    assert "-13.816" not in capsys.readouterr().out      # the "fully collapsed" floor is never printed for K = 1
