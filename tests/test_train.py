"""train.py / evaluate.py end to end on tiny data: config handling, a CPU run, exact resume,
interruption, host-to-device copies of a step, and the one-line errors a user can cause
(multi-process runs: test_distributed.py)."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import config
import distributed
import evaluate
import train
from model import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_overrides(tmp_path, name="run", dataset="shapes"):
    """A run that takes seconds: 48 tiny shapes images, K=2, D=32, a two-stage ResNet-18."""
    common = [f"run.out_dir={tmp_path / 'runs'}", f"run.name={name}", "run.num_threads=1",
              "model.embed_dim=32", "model.num_embeds=2", "model.set_head.depth=1", "model.text.word_dim=16",
              "train.epochs=2", "train.batch_size=8", "train.log_every=1", "eval.batch_size=16"]
    if dataset == "shapes":
        return common + [f"data.root={tmp_path / 'shapes'}", "data.shapes.num_train=48", "data.shapes.num_val=16",
                         "data.shapes.num_test=16", "data.shapes.image_size=32", "data.image_size=32",
                         "model.image.stop_after=layer1"]
    return common + [f"data.root={tmp_path / 'precomp'}", "data.dataset=precomputed", "model.image.type=precomputed",
                     "model.image.feature_dim=12"]


def write_precomputed(root, num_images=32, regions=5, feature_dim=12, seed=0):
    """A SCAN-layout folder: {split}_ims.npy (N, regions, F) and 5 captions per image."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    words = ["red", "blue", "cat", "dog", "sits", "runs", "big", "small", "on", "mat"]
    for split in ("train", "dev", "test"):
        np.save(os.path.join(root, f"{split}_ims.npy"),
                rng.standard_normal((num_images, regions, feature_dim)).astype(np.float32))
        with open(os.path.join(root, f"{split}_caps.txt"), "w") as handle:
            for _ in range(num_images * 5):
                handle.write(" ".join(rng.choice(words, size=rng.integers(3, 7))) + "\n")


def run_cli(args, timeout=300, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def weights(path):
    return load_checkpoint(str(path))["model"]


def assert_same_weights(first, second, atol=0.0):
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=atol, rtol=0, msg=key)


# ----------------------------------------------------------------------------- configuration

def test_overrides_are_typed_and_unknown_keys_are_named():
    cfg = config.load_config(None, ["train.epochs=3", "train.lr=1e-4", "model.image.weights=/x/r.pth",
                                   "loss.similarity_options={alpha: 8}", "train.grad_clip=0"])
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["lr"] == pytest.approx(1e-4)
    assert cfg["model"]["image"]["weights"] == "/x/r.pth"
    assert cfg["loss"]["similarity_options"] == {"alpha": 8}
    with pytest.raises(config.ConfigError, match="train.epoch"):
        config.load_config(None, ["train.epoch=3"])
    with pytest.raises(config.ConfigError, match="'train.epochs' .* expects int"):
        config.load_config(None, ["train.epochs=many"])
    with pytest.raises(config.ConfigError, match="nosuch.key"):
        config.load_config(None, ["nosuch.key=1"])
    with pytest.raises(config.ConfigError, match="key.sub=value"):
        config.load_config(None, ["train.epochs"])


def test_config_file_is_merged_over_defaults_with_the_same_checks(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text("model:\n  num_embeds: 7\ntrain:\n  batch_size: 64\n")
    cfg = config.load_config(str(path), ["train.batch_size=32"])
    assert cfg["model"]["num_embeds"] == 7 and cfg["train"]["batch_size"] == 32
    assert cfg["model"]["embed_dim"] == config.load_config()["model"]["embed_dim"]
    path.write_text("model:\n  num_embedz: 7\n")
    with pytest.raises(config.ConfigError, match="model.num_embedz.*preset.yaml"):
        config.load_config(str(path))


def test_impossible_combinations_are_rejected_before_training():
    cfg = config.load_config(None, ["train.batch_size=10"])
    with pytest.raises(config.ConfigError, match="divisible by the number of processes"):
        config.validate_config(cfg, world_size=3)
    with pytest.raises(config.ConfigError, match="loss.similarity='hungarian'"):
        config.validate_config(config.load_config(None, ["loss.similarity=hungarian"]), world_size=1)


@pytest.mark.parametrize("argv", [
    ["train.epochs=1", "--resume", "auto", "model.num_embeds=2"],
    ["--resume", "auto", "train.epochs=1", "model.num_embeds=2"],
    ["train.epochs=1", "model.num_embeds=2", "--resume", "auto"],
    ["train.epochs=1", "--resume=auto", "model.num_embeds=2"],
])
def test_flags_and_overrides_come_in_any_order(argv):
    args = train.parse_command_line(argv + ["--config", "x.yaml", "train.epochs=4"])
    assert (args.config, args.resume) == ("x.yaml", "auto")
    assert args.overrides == ["train.epochs=1", "model.num_embeds=2", "train.epochs=4"]    # order kept: last wins


@pytest.mark.parametrize("argv, message", [
    (["--resume"], "argument --resume: expected one argument"),
    (["--nosuch", "x"], "unrecognized arguments: --nosuch"),
    (["--res", "auto"], "unrecognized arguments: --res"),
])
def test_bad_train_flags_give_one_line_and_exit_2(capsys, argv, message):
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_cosine_schedule_warms_up_then_decays_to_zero():
    multiplier = train.cosine_with_warmup(total_steps=110, warmup_steps=10)
    assert multiplier(0) == pytest.approx(0.1) and multiplier(9) == pytest.approx(1.0)
    assert multiplier(10) == pytest.approx(1.0) and multiplier(60) == pytest.approx(0.5)
    assert multiplier(110) == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- end to end

def test_tiny_run_writes_every_artifact_and_evaluate_needs_only_the_checkpoint(tmp_path, capsys):
    result = run_cli(["train.py", *tiny_overrides(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "run"
    for name in ("config.yaml", "log.jsonl", "last.pt", "best.pt", "test_metrics.json"):
        assert (run_dir / name).is_file(), name
    assert "rsum" in result.stdout and "i2t_r1" in result.stdout
    assert "against every fitting item" in result.stdout and "mAP@R" in result.stdout
    complete = json.loads((run_dir / "test_metrics.json").read_text())["complete"]
    assert set(complete) == {"i2t", "t2i", "source"}
    assert set(complete["t2i"]) == {"map_at_r", "r_precision", "r1", "positives_per_query"}
    assert complete["t2i"]["positives_per_query"] >= 1.0 and complete["i2t"]["positives_per_query"] >= 5.0
    checkpoint = load_checkpoint(str(run_dir / "best.pt"))
    assert checkpoint["vocab"][:5] == ["<pad>", "<start>", "<end>", "<unk>", "<mask>"]
    assert checkpoint["config"]["loss"]["similarity"] == "max_pair"

    out = tmp_path / "metrics.json"
    evaluated = run_cli(["evaluate.py", "--ckpt", str(run_dir / "best.pt"), "--out", str(out)])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "intra-set cos" in evaluated.stdout
    # one JSON layout: test_metrics.json and evaluate.py --out agree key for key
    assert_same_results(json.loads((run_dir / "test_metrics.json").read_text()), json.loads(out.read_text()))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # as the run (run.num_threads=1): the same float rounding
    try:
        # validation (best.pt selection) ranks by the same rule: best.pt's epoch has the best logged
        # val RSUM, and evaluating best.pt on val reproduces that epoch's logged metrics
        epochs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        epochs = [entry for entry in epochs if "val" in entry]
        best = max(epochs, key=lambda entry: entry["val"]["rsum"])
        assert best["epoch"] == checkpoint["epoch"]
        val_out = tmp_path / "val.json"
        assert evaluate.main(["--ckpt", str(run_dir / "best.pt"), "--split", "val", "--out", str(val_out)]) == 0
        assert_same_results({"all": best["val"], "complete": best["val_complete"], "collapse": best["collapse"]},
                            {k: v for k, v in json.loads(val_out.read_text()).items() if k != "method"})
        assert evaluate.main(["--ckpt", str(run_dir / "best.pt"), "--method", "greedy", "--split", "val"]) == 0
        assert "similarity: greedy" in capsys.readouterr().out
        # an ensemble over image files (the shapes path): best.pt and last.pt share the test split
        assert evaluate.main(["--ckpt", str(run_dir / "best.pt"), str(run_dir / "last.pt")]) == 0
        assert "ensemble: mean of 2 score matrices" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)


def assert_same_results(first, second):
    """Same nested keys; the same numbers up to float rounding (recalls are multiples of 100/N)."""
    assert isinstance(first, dict) == isinstance(second, dict)
    if isinstance(first, dict):
        assert first.keys() == second.keys()
        for key in first:
            assert_same_results(first[key], second[key])
    elif isinstance(first, float):
        assert first == pytest.approx(second, abs=1e-5)
    else:
        assert first == second


def test_one_seed_gives_two_methods_the_same_initial_weights_batches_and_random_draws(tmp_path):
    # lr = 0 keeps every weight at its initial value while the steps still run: the ResNet's
    # BatchNorm running statistics then record exactly which (cropped) images each step saw, and
    # the checkpoint's RNG states show whether dropout drew the same numbers. A paired comparison
    # of two similarities with one run.seed must differ in nothing else.
    base = tiny_overrides(tmp_path) + ["train.lr=0", "train.stop_after_steps=3"]
    for name, extra in (("max_pair", []), ("mil", ["loss.similarity=mil", "loss.gd.weight=0"]),
                        ("seed1", ["run.seed=1"])):
        assert train.main(base + [f"run.name={name}", *extra]) == 0
    runs = {name: load_checkpoint(str(tmp_path / "runs" / name / "last.pt")) for name in ("max_pair", "mil", "seed1")}
    assert_same_weights(runs["max_pair"]["model"], runs["mil"]["model"])
    running_mean = "image_encoder.backbone.1.running_mean"
    assert running_mean in runs["max_pair"]["model"]
    assert runs["max_pair"]["model"][running_mean].abs().sum() > 0        # the batches did reach BatchNorm
    assert runs["max_pair"]["rng"][0]["python"] == runs["mil"]["rng"][0]["python"]
    assert torch.equal(runs["max_pair"]["rng"][0]["torch"], runs["mil"]["rng"][0]["torch"])
    assert not torch.equal(runs["max_pair"]["model"][running_mean], runs["seed1"]["model"][running_mean])
    assert not torch.equal(runs["max_pair"]["rng"][0]["torch"], runs["seed1"]["rng"][0]["torch"])


@pytest.mark.parametrize("stop_after, saved_at", [(5, (1, 1)), (4, (0, 4))], ids=["mid_epoch", "epoch_end"])
def test_resuming_gives_the_same_weights_as_training_straight(tmp_path, stop_after, saved_at):
    base = tiny_overrides(tmp_path, dataset="precomputed") + ["run.deterministic=true", "data.region_drop=0.3"]
    write_precomputed(tmp_path / "precomp")
    straight = train.main(base + ["run.name=straight"])
    assert straight == 0
    first = train.main(base + ["run.name=resumed", f"train.stop_after_steps={stop_after}"])   # 4 steps/epoch
    assert first == 0
    state = load_checkpoint(str(tmp_path / "runs" / "resumed" / "last.pt"))["state"]
    assert (state["epoch"], state["step"]) == saved_at       # (epochs done, steps into the next one)
    second = train.main([*base[:3], "--resume", "auto", *base[3:], "run.name=resumed"])   # overrides on both sides
    assert second == 0
    assert_same_weights(weights(tmp_path / "runs" / "straight" / "last.pt"),
                        weights(tmp_path / "runs" / "resumed" / "last.pt"))


def test_compiled_training_reaches_the_weights_of_eager_training(tmp_path, monkeypatch):
    """train.compile=true changes speed, not results (dropout off: compiled kernels draw their own masks)."""
    write_precomputed(tmp_path / "precomp")
    base = tiny_overrides(tmp_path, dataset="precomputed") + [
        "model.dropout=0.0", "train.epochs=1", "train.stop_after_steps=3", "train.optimizer=sgd", "train.lr=0.1"]
    assert train.main(base + ["run.name=eager"]) == 0
    compiled_modules, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled_modules.append(module) or real_compile(module, **kw))
    assert train.main(base + ["run.name=compiled", "train.compile=true"]) == 0
    assert len(compiled_modules) == 1
    assert_same_weights(weights(tmp_path / "runs" / "eager" / "last.pt"),
                        weights(tmp_path / "runs" / "compiled" / "last.pt"), atol=1e-4)


def test_sigterm_saves_a_usable_last_checkpoint_and_exits_cleanly(tmp_path):
    write_precomputed(tmp_path / "precomp", num_images=32)
    args = tiny_overrides(tmp_path, dataset="precomputed") + ["train.epochs=500"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "runs" / "run" / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "saved" in stdout and "--resume auto" in stdout
    checkpoint = load_checkpoint(str(tmp_path / "runs" / "run" / "last.pt"))
    assert checkpoint["state"]["global_step"] >= 3
    assert not [p for p in os.listdir(tmp_path / "runs" / "run") if ".tmp" in p]


class HostToDeviceCopies(torch.overrides.TorchFunctionMode):
    """Records every copy of host data to another device made through Python: Tensor.to / .cuda /
    .copy_ / item assignment from a CPU tensor, and torch.tensor / as_tensor with a device."""

    def __init__(self):
        super().__init__()
        self.copies = []     # (function name, the host tensor or None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if name in ("to", "cuda") and args[0].device.type == "cpu" and torch.is_tensor(out) \
                and out.device.type != "cpu":
            self.copies.append((name, args[0]))
        elif name in ("copy_", "__setitem__") and args[0].device.type != "cpu" and torch.is_tensor(args[-1]) \
                and args[-1].device.type == "cpu" and args[-1].dim() > 0:
            self.copies.append((name, args[-1]))
        elif name in ("tensor", "as_tensor", "asarray") and torch.is_tensor(out) and out.device.type != "cpu":
            self.copies.append((name, None))
        return out


STEP_PATHS = {   # config path and overrides of the two paths gpu_check.sh runs under sync-debug mode on a GPU
    "default": (None, []),
    "vit_bert": (os.path.join(REPO, "configs", "coco_vit_bert.yaml"), [
        "model.image.weights=null", "model.text.bert=null",
        "model.image.vit_config={image_size: 32, patch_size: 16, num_layers: 1, num_heads: 2, hidden_dim: 16, mlp_dim: 32}",
        "model.text.bert_config={vocab_size: 32, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, "
        "intermediate_size: 32}"]),
}


@pytest.mark.parametrize("path", sorted(STEP_PATHS))
def test_a_training_step_copies_nothing_to_the_device_but_the_batch(path):
    """Default path (ResNet + BiGRU, max_pair, every loss term, AdamW, clipping) and the ViT + BERT
    preset's path on the meta device: after one warm-up step (which fills the per-device caches), a
    step moves the batch's tensors and nothing else (transformers included, in whichever version is
    installed). Without the collated caption order, the GRU's sort indices would be uploaded."""
    from data import collate_batch
    from model import build_model
    preset, overrides = STEP_PATHS[path]
    cfg = train.load_config(preset, ["model.embed_dim=32", "model.set_head.depth=1", "model.text.word_dim=16",
                                     "data.image_size=32", "model.image.stop_after=layer1", *overrides])
    vocab = ["<pad>", "<start>", "<end>", "<unk>", "<mask>"] + [f"w{i}" for i in range(20)]
    vocab = vocab if cfg["model"]["text"]["type"] == "gru" else None
    generator = torch.Generator().manual_seed(0)
    items = [{"image": torch.randn(3, 32, 32, generator=generator), "index": i,
              "captions": [torch.randint(5, 25, (int(n),), generator=generator).tolist()
                           for n in torch.randint(2, 9, (5,), generator=generator)]} for i in range(4)]
    batch = collate_batch(items, pad_id=0)
    device = torch.device("meta")
    model = build_model(cfg, vocab).to(device).train()
    optimizer = train.build_optimizer(model, cfg["train"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    context = distributed.DistributedContext(0, 1, device)

    def copies_of_one_step(step_batch):
        with HostToDeviceCopies() as recorder:
            train.training_step(model, step_batch, cfg, context, optimizer, scheduler, scaler)
        return recorder.copies

    copies_of_one_step(batch)
    copies = copies_of_one_step(batch)
    moved = [host for _, host in copies if any(host is value for value in batch.values())]
    others = [name for name, host in copies if not any(host is value for value in batch.values())]
    assert len(moved) == len(batch) and others == []
    if vocab:
        without_order = {key: value for key, value in batch.items() if key != "caption_order"}
        assert len(copies_of_one_step(without_order)) == len(without_order) + 1     # the counter sees uploads


# ----------------------------------------------------------------------------- user errors

def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    write_precomputed(tmp_path / "precomp")
    base = tiny_overrides(tmp_path, dataset="precomputed") + ["train.epochs=1"]
    assert train.main(base) == 0
    last = tmp_path / "runs" / "run" / "last.pt"
    before = last.read_bytes()
    code = train.main(base + ["train.epochs=2", "loss.triplet={weight: 1.0, margin: .nan, hardest: true}",
                              "--resume", "auto"])
    assert code == 2
    message = capsys.readouterr().err
    assert "non-finite loss or gradient in epoch 2 between steps 1 and" in message and "triplet=nan" in message
    assert last.read_bytes() == before


def test_non_finite_loss_is_caught_before_a_stop_saves_a_checkpoint(tmp_path, capsys):
    write_precomputed(tmp_path / "precomp")
    base = tiny_overrides(tmp_path, dataset="precomputed") + ["train.log_every=1000", "train.stop_after_steps=2",
                                                              "loss.triplet={weight: 1.0, margin: .nan}"]
    assert train.main(base) == 2
    assert "non-finite loss or gradient in epoch 1 between steps 1 and 2" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "run" / "last.pt").exists()


def test_bad_input_exits_nonzero_with_one_line(tmp_path, capsys):
    # the command line once (exit status, nothing else on stderr) ...
    result = run_cli(["train.py", f"run.out_dir={tmp_path}", "data.dataset=coco", "data.root=/no/such/coco"],
                     timeout=120)
    assert result.returncode == 2
    assert "/no/such/coco" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    # ... and the same main() in this process for the config errors (a process start costs seconds)
    for args, message in [(["loss.similarity=hungarian"], "loss.similarity='hungarian' is unknown"),
                          (["train.epochs=three"], "train.epochs")]:
        assert train.main([f"run.out_dir={tmp_path}", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_tensorboard_logs_the_scalars_of_log_jsonl(tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed (optional: pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert train.main(tiny_overrides(tmp_path) + ["train.epochs=1", "run.tensorboard=true"]) == 0
    run_dir = tmp_path / "runs" / "run"
    expected = {}
    for line in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()):
        kind, position = ("step", "global_step") if "global_step" in line else ("epoch", "epoch")
        for tag, value in train.numeric_leaves(line, skip=("epoch", "step", "global_step")):
            expected.setdefault(f"{kind}/{tag}", []).append((line[position], value))
    assert {"step/loss", "step/grad_norm", "step/lr", "epoch/val/rsum", "epoch/collapse/image/intra_set_cos",
            "epoch/train/loss"} <= set(expected)
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        logged = [(event.step, event.value) for event in events.Scalars(tag)]
        assert [step for step, _ in logged] == [step for step, _ in points], tag
        assert [value for _, value in logged] == pytest.approx([value for _, value in points], rel=1e-6), tag


def test_tensorboard_missing_stops_before_training_with_an_install_hint(tmp_path, capsys, monkeypatch):
    for name in [n for n in sys.modules if n.split(".")[0] == "tensorboard" or n.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)          # import tensorboard now fails, as when missing
    assert train.main(tiny_overrides(tmp_path) + ["run.tensorboard=true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run.tensorboard=true needs") and "pip install tensorboard" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "shapes").exists() and not (tmp_path / "runs").exists()     # nothing prepared or trained


def test_truncated_checkpoint_is_reported_not_traced(tmp_path):
    broken = tmp_path / "best.pt"
    torch.save({"model": {"w": torch.zeros(1000)}, "config": {}}, broken)
    broken.write_bytes(broken.read_bytes()[:500])
    result = run_cli(["evaluate.py", "--ckpt", str(broken)], timeout=120)
    assert result.returncode == 2
    assert "truncated" in result.stderr and "Traceback" not in result.stderr


def test_an_existing_run_is_never_overwritten_without_resume(tmp_path):
    write_precomputed(tmp_path / "precomp")
    base = tiny_overrides(tmp_path, dataset="precomputed") + ["train.epochs=1"]
    assert train.main(base) == 0
    last = tmp_path / "runs" / "run" / "last.pt"
    before = last.read_bytes()
    with pytest.raises(config.ConfigError, match="--resume auto"):
        train.train(config.load_config(None, base))
    assert last.read_bytes() == before


def test_failed_checkpoint_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    train.atomic_save({"a": 1}, str(path))
    before = path.read_bytes()

    def explode(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(OSError):
        train.atomic_save({"a": 2}, str(path))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]


def test_resuming_with_another_model_config_names_the_difference(tmp_path, capsys):
    write_precomputed(tmp_path / "precomp")
    base = tiny_overrides(tmp_path, dataset="precomputed") + ["train.epochs=1"]
    assert train.main(base) == 0
    assert train.main([*base[:2], "--resume", "auto", *base[2:], "model.num_embeds=3"]) == 2
    message = capsys.readouterr().err
    assert "model.num_embeds: 2 -> 3" in message and "another model config" in message


def test_a_checkpoint_from_before_batchnorm_modes_and_per_rank_rng_resumes(tmp_path):
    """Version 1 checkpoints: no model.image.batchnorm key (its default applies) and one RNG state."""
    write_precomputed(tmp_path / "precomp")
    base = tiny_overrides(tmp_path, dataset="precomputed") + ["train.epochs=1"]
    assert train.main(base) == 0
    last = tmp_path / "runs" / "run" / "last.pt"
    checkpoint = load_checkpoint(str(last))
    del checkpoint["config"]["model"]["image"]["batchnorm"], checkpoint["world_size"]
    checkpoint.update(version=1, rng=checkpoint["rng"][0])
    torch.save(checkpoint, last)
    assert train.main(base + ["train.epochs=2", "--resume", "auto"]) == 0
    assert load_checkpoint(str(last))["state"]["epoch"] == 2


def signal_during_evaluation(monkeypatch, at_call, signal_number):
    """train.evaluate_model sends `signal_number` to this process at its `at_call`-th call (1:
    epoch 1's validation), then evaluates as usual."""
    calls = []
    real = train.evaluate_model

    def evaluate_model(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            os.kill(os.getpid(), signal_number)
            time.sleep(0.05)
        return real(*args, **kwargs)
    monkeypatch.setattr(train, "evaluate_model", evaluate_model)


def test_a_signal_during_validation_stops_after_it_and_gives_the_handlers_back(tmp_path, monkeypatch):
    write_precomputed(tmp_path / "precomp", num_images=16)
    signal_during_evaluation(monkeypatch, at_call=1, signal_number=signal.SIGINT)
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    assert train.main(tiny_overrides(tmp_path, dataset="precomputed") + ["train.epochs=3"]) == 128 + signal.SIGINT
    assert {number: signal.getsignal(number) for number in before} == before
    checkpoint = load_checkpoint(str(tmp_path / "runs" / "run" / "last.pt"))
    assert checkpoint["state"]["epoch"] == 1 and checkpoint["state"]["step"] == 0   # not one step of epoch 2
    assert not (tmp_path / "runs" / "run" / "test_metrics.json").exists()


def test_ctrl_c_during_the_final_test_interrupts_it(tmp_path, monkeypatch, capsys):
    # Python's own Ctrl-C handler, whatever this process inherited: a shell that starts pytest in the
    # background (`cmd &` without job control) hands it SIGINT ignored, and Python then keeps it so
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        write_precomputed(tmp_path / "precomp", num_images=16)
        signal_during_evaluation(monkeypatch, at_call=2, signal_number=signal.SIGINT)   # 1 epoch: 2nd is the test
        before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
        assert train.main(tiny_overrides(tmp_path, dataset="precomputed") + ["train.epochs=1"]) == 128 + signal.SIGINT
        assert {number: signal.getsignal(number) for number in before} == before
        assert not (tmp_path / "runs" / "run" / "test_metrics.json").exists()
        assert "interrupted" in capsys.readouterr().err
    finally:
        signal.signal(signal.SIGINT, inherited)
