"""Train MaxMatch (METHOD.md §4) on one CPU, one GPU, or many GPUs with torchrun.

    python train.py                                   # built-in shapes dataset, then test metrics
    python train.py --config configs/X.yaml train.epochs=3 model.num_embeds=2
    torchrun --nproc_per_node=8 --max-restarts=3 train.py --config configs/X.yaml
    python train.py --resume auto                     # continue runs/<run.name>/last.pt exactly

Each step encodes B images and their B*C captions as sets, all-gathers the sets WITH gradient
across processes (so hardest negatives come from the global batch), scores every image against
every caption with `similarity.pairwise_similarity` (exact max_pair by default) and minimises
`losses.maxmatch_loss`: L = L_tri + l_con L_con + l_mmd L_mmd + l_div L_div + l_gd L_gd + l_isd L_isd.
`train.batch_size` is the GLOBAL number of images per step.

A run directory `<run.out_dir>/<run.name>` holds config.yaml, log.jsonl, last.pt, best.pt (by
validation RSUM, ties counted against the ground truth as in evaluate.py) and, at the end,
test_metrics.json (the layout of `evaluate.py --out`). Checkpoints are written atomically, at epoch
ends and every `train.checkpoint_every` steps.

Under torchrun's elastic agent a dead or hung worker makes the others leave within
`run.dist_timeout_s` with one line; when the agent starts the workers again (`--max-restarts`, or a
node joining or leaving under `--nnodes=MIN:MAX`) they continue the run folder's last.pt by
themselves, with any number of processes (same global batch and sample order). Joining the job,
the collectives, the lost-peer test and leaving the job are distributed.py's.
"""
import json
import math
import os
import random
import signal
import sys
import time
import traceback
import weakref

import numpy
import torch
import yaml
from tqdm import tqdm

from config import ConfigError, checkpoint_config, load_config, validate_config
from distributed import gloo_threads_left, join_job, lost_peer_reason
from data import (DataError, build_loader, build_text_tokenizer, build_vocabulary, derive_seed, prepare_data,
                  set_loader_epoch, training_captions)
from evaluate import (ArgumentParser, FlagError, build_eval_context, evaluate_model, format_results,
                      write_results)
from losses import maxmatch_loss
from model import CheckpointError, ModelError, autocast, build_model, load_checkpoint, move_to
from similarity import pairwise_similarity

CHECKPOINT_VERSION = 2     # 2: 'rng' is a list with one entry per rank, and 'world_size'


class TrainingError(Exception):
    """The run cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


USER_ERRORS = (ConfigError, DataError, ModelError, CheckpointError, FlagError, TrainingError)
LOST_PEER_EXIT = 1          # exit code after another process of the job died or hung


def main(argv=None, exiting=False):
    """exiting=True (the command line): the process ends when this returns. Every path out (normal
    end, train.stop_after_steps, a signal, a lost peer, a user error, any other exception) has left
    the job (distributed.py's teardown, inside train) and dropped the exception before this returns;
    an unexpected exception is then printed here instead of by the interpreter, whose saved
    traceback would keep the training frames, and the process group they use, alive into its
    shutdown."""
    try:
        args = parse_command_line(argv)
        cfg = load_config(args.config, args.overrides)
        train(cfg, resume=args.resume, exiting=exiting)
        code = 0
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    except Interrupted as stop:
        code = stop.exit_code
    except LostPeer:                # its one line is already printed (see train)
        code = LOST_PEER_EXIT
    except KeyboardInterrupt:       # Ctrl-C outside the training loop (e.g. in the final test)
        print("interrupted; checkpoints already written are complete", file=sys.stderr)
        code = 128 + signal.SIGINT
    except Exception:               # noqa: BLE001 - a bug: its traceback, then the same exit as every path
        if not exiting:
            raise
        traceback.print_exc()
        code = 1
    if exiting:
        left = gloo_threads_left()
        if left:
            print(f"warning: rank {os.environ.get('RANK', '0')}: gloo threads still running at exit ({', '.join(left)}): "
                  "something still holds the process group; the interpreter's shutdown may abort",
                  file=sys.stderr, flush=True)
    return code


def parse_command_line(argv=None):
    """--config, --resume and key.sub=value overrides, in any order (overrides keep their order)."""
    parser = ArgumentParser(description="Train MaxMatch; overrides are key.sub=value", allow_abbrev=False)
    parser.add_argument("--config", default=None, help="YAML merged over config.yaml (default: config.yaml)")
    parser.add_argument("--resume", default=None, help="'auto' (<run dir>/last.pt if present) or a checkpoint path")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3")
    return parser.parse_intermixed_args(argv)


# ----------------------------------------------------------------------------- training

def train(cfg, resume=None, exiting=False):
    """Run training as configured; returns the run directory.

    SIGTERM / Ctrl-C during training or validation stop the run at the next step or epoch end (all
    ranks agree, last.pt is saved, Interrupted is raised); the previous signal handlers are back when
    this returns or raises, and before the final test, which a Ctrl-C interrupts at once. exiting=True
    (the command line): when training ends any other way than normally (a signal stop, a lost peer,
    an error) they stay ignored instead, so a SIGTERM that torchrun sends to the ranks still exiting
    cannot turn their exit code into death by signal, nor end them before they said why.

    Under torchrun, a start of the workers after the first one in the same job continues the run
    folder's last.pt whatever `resume` says (see elastic_resume). A lost peer prints its one line
    and raises LostPeer. The job is left (distributed.py) on every way out."""
    validate_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    require_tensorboard(cfg)
    context = None
    try:
        context = join_job(select_device(cfg), cfg["run"]["dist_timeout_s"])
        return train_in_job(cfg, context, resume, exiting)
    except Exception as error:      # noqa: BLE001 - only a lost peer is turned into one line
        reason = lost_peer_reason(error)
        if reason is None:
            raise
        # printed before leaving the job: a teardown that waited on the dead peer must not swallow it
        print(f"error: rank {os.environ.get('RANK', '0')}: {reason}; leaving so that torchrun can restart "
              "the workers (they continue from the run's last.pt)", file=sys.stderr, flush=True)
        raise LostPeer(reason) from None
    finally:
        if context is not None:
            context.close()


def train_in_job(cfg, context, resume, exiting):
    """train() once this process has joined the job."""
    if cfg["run"]["num_threads"]:
        torch.set_num_threads(int(cfg["run"]["num_threads"]))
    if cfg["run"]["deterministic"]:
        torch.use_deterministic_algorithms(True)
    run_dir = os.path.join(cfg["run"]["out_dir"], cfg["run"]["name"])
    resume, restarted = elastic_resume(resume, run_dir, context)
    checkpoint = resume_checkpoint(resume, run_dir, cfg)
    check_same_checkpoint(checkpoint, context, run_dir)
    saved_rng = rank_rng_state(checkpoint, context)
    if context.is_main:
        report_continuation(checkpoint, restarted, context, run_dir)
        if checkpoint or restarted:
            trim_log(os.path.join(run_dir, "log.jsonl"), checkpoint["state"] if checkpoint else None)
    context.store_mark(run_started_key(run_dir))   # later starts of the workers in this job continue it

    if context.local_rank == 0:         # one per node: nodes need not share the data folder
        prepare_data(cfg["data"])
    context.barrier()
    vocab = checkpoint["vocab"] if checkpoint else make_vocabulary(cfg)
    tokenizer = build_text_tokenizer(cfg["model"]["text"], vocab)
    seed_everything(cfg["run"]["seed"])
    model = synchronise_batchnorm(build_model(cfg, vocab), cfg, context).to(context.device)
    train_loader = build_loader(cfg, "train", tokenizer, train=True, rank=context.rank,
                                world_size=context.world_size)
    val_loader = build_loader(cfg, "val", tokenizer, train=False) if context.is_main else None
    steps_per_epoch = train_loader.batch_sampler.batches_per_epoch
    optimizer = build_optimizer(model, cfg["train"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(
        total_steps=cfg["train"]["epochs"] * steps_per_epoch, warmup_steps=cfg["train"]["warmup_steps"]))
    use_scaler = context.device.type == "cuda" and cfg["train"]["amp"] == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    state = {"epoch": 0, "step": 0, "global_step": 0, "best_rsum": -math.inf}
    if checkpoint:
        state = restore_state(checkpoint, model, optimizer, scheduler, scaler)
    if checkpoint and saved_rng is None:    # written by another number of processes: fresh streams per rank
        stream = derive_seed(cfg["run"]["seed"], state["global_step"], context.world_size, context.rank)
        seed_everything(stream)
        train_loader.generator.manual_seed(stream)
    else:
        seed_everything(cfg["run"]["seed"] + context.rank, restore=saved_rng, loader=train_loader)
    trainer = model
    if context.world_size > 1:
        # device_ids=None: move_to already put the batch on this process's device, and DDP must not
        # move its host copy of the caption lengths (the GRU packs with them on the CPU).
        trainer = torch.nn.parallel.DistributedDataParallel(model, device_ids=None)
    if cfg["train"]["compile"]:     # caption lengths vary per batch: compile for dynamic shapes once
        trainer = torch.compile(trainer, dynamic=True)

    if context.is_main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as handle:
            yaml.safe_dump(cfg, handle, sort_keys=False)
        print(f"run {run_dir}: {count_parameters(model) / 1e6:.2f}M parameters, {steps_per_epoch} steps/epoch "
              f"x {cfg['train']['epochs']} epochs, {context.world_size} process(es) on {context.device}",
              flush=True)
    save = CheckpointWriter(run_dir, cfg, vocab, model, optimizer, scheduler, scaler, context)
    stop = StopRequest(context)
    try:
        finished = train_epochs(cfg, context, state, stop, save, trainer, model, optimizer, scheduler, scaler,
                                train_loader, val_loader, run_dir, exiting)
    except BaseException:
        # Leaving with an error or a signal stop. On the command line the signals stay ignored: torchrun
        # sends SIGTERM to the survivors within 0.1 s of one worker failing, and the default handler
        # back here would end this process before train() prints why it leaves (a lost peer's line).
        stop.ignore_further_signals() if exiting else stop.restore()
        raise
    stop.restore()          # before the final test: a Ctrl-C there interrupts the evaluation
    del trainer             # DDP's reducer holds the process group: leaving the job must free it
    if not finished:        # train.stop_after_steps
        return run_dir
    if context.is_main:
        final_test(cfg, run_dir, context.device)
    context.barrier()
    return run_dir


def train_epochs(cfg, context, state, stop, save, trainer, model, optimizer, scheduler, scaler,
                 train_loader, val_loader, run_dir, exiting):
    """The epochs from `state` on; False if train.stop_after_steps ended them early. Raises
    Interrupted after a signal stop (see StopRequest), checked after every step and after each
    epoch's validation."""
    steps_per_epoch = train_loader.batch_sampler.batches_per_epoch
    log = (JsonlLog(os.path.join(run_dir, "log.jsonl"), tensorboard=cfg["run"]["tensorboard"])
           if context.is_main else None)
    steps_this_invocation = 0
    stop_after = cfg["train"]["stop_after_steps"]
    checkpoint_every = cfg["train"]["checkpoint_every"] or 0
    started = time.time()

    for epoch in range(state["epoch"], cfg["train"]["epochs"]):
        set_loader_epoch(train_loader, epoch, start_batch=state["step"])
        save.loader_state = train_loader.generator.get_state()   # before iterating draws from it
        trainer.train()
        running = RunningMean()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg['train']['epochs']}", leave=False,
                   disable=not context.is_main or None, initial=state["step"], total=steps_per_epoch)
        for batch in bar:
            terms = training_step(trainer, batch, cfg, context, optimizer, scheduler, scaler)
            state["step"] += 1
            state["global_step"] += 1
            steps_this_invocation += 1
            running.add(terms)     # on the device; checked for NaN/inf only where the host reads it anyway
            if state["global_step"] % cfg["train"]["log_every"] == 0:
                raise_if_diverged(running, epoch, state, run_dir)     # every rank, so none waits alone
                if log:
                    log.write({"epoch": epoch, "step": state["step"], "global_step": state["global_step"],
                               "lr": scheduler.get_last_lr()[0], **running.means()})
            stopping = stop.agreed()        # every rank, every step: a signal to any rank stops all here
            if stopping or (stop_after and steps_this_invocation >= stop_after):
                raise_if_diverged(running, epoch, state, run_dir)
                save("last.pt", state)
                context.barrier()           # no rank leaves (and makes torchrun end the job) mid-save
                if stopping:
                    stop_by_signal(stop, context, exiting, f"epoch {epoch + 1} step {state['step']}", run_dir)
                return False
            # A step checkpoint: what a worker killed without warning loses; the epoch's last step is
            # saved with the epoch just below.
            if checkpoint_every and state["global_step"] % checkpoint_every == 0 and state["step"] < steps_per_epoch:
                raise_if_diverged(running, epoch, state, run_dir)
                save("last.pt", state)
        raise_if_diverged(running, epoch, state, run_dir)
        state["epoch"], state["step"] = epoch + 1, 0
        summary = {"epoch": epoch + 1, "train": running.means(), "time_s": round(time.time() - started, 1)}
        if context.is_main:
            results = evaluate_model(model, cfg, val_loader, context.device, split="val")
            summary["val"] = results["all"]
            if "complete" in results:       # logged beside RSUM; best.pt is still chosen on RSUM
                summary["val_complete"] = results["complete"]
            summary["collapse"] = results["collapse"]
            is_best = results["all"]["rsum"] > state["best_rsum"]
            state["best_rsum"] = max(state["best_rsum"], results["all"]["rsum"])
            log.write(summary)
            print(epoch_line(summary, is_best), flush=True)
        else:
            is_best = False
        save.loader_state = train_loader.generator.get_state()   # what the next epoch starts from
        save("last.pt", state)
        if is_best:
            save("best.pt", state, rng_states=save.last_rng_states)
        context.barrier()
        if stop.agreed():           # a signal during validation: last.pt above already holds the epoch
            stop_by_signal(stop, context, exiting, f"the end of epoch {epoch + 1}", run_dir)
    return True


def stop_by_signal(stop, context, exiting, where, run_dir):
    """After every rank agreed on a signal and last.pt is saved: report and raise Interrupted."""
    if exiting:
        stop.ignore_further_signals()
    if context.is_main:
        print(f"stopped by signal at {where}; saved {run_dir}/last.pt (continue with --resume auto)",
              flush=True)
    raise Interrupted(128 + stop.agreed_signal)


def training_step(trainer, batch, cfg, context, optimizer, scheduler, scaler):
    """One optimizer step on the global batch; returns the detached loss terms, total as 'loss'."""
    batch = move_to(batch, context.device)
    with autocast(context.device, cfg["train"]["amp"]):
        image, caption = trainer(batch)
    image = context.gather([t.float() for t in image])                       # (B, K, D), (B, K, D), (B, D)
    caption = context.gather([t.float() for t in caption])                   # (B*C, ...)
    image_ids, caption_image_ids = context.gather([batch["image_ids"], batch["caption_image_ids"]],
                                                  with_grad=False)
    scores = pairwise_similarity(image[0], caption[0], method=cfg["loss"]["similarity"], check_finite=False,
                                 **cfg["loss"]["similarity_options"])        # (B, B*C); the loop checks the loss
    positives = image_ids[:, None] == caption_image_ids[None, :]
    loss, terms = maxmatch_loss(cfg["loss"], scores, positives, image[0], caption[0], image[1], caption[1],
                                image[2], caption[2])
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg["train"]["grad_clip"]:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainer.parameters(), cfg["train"]["grad_clip"])
        # Logged, and checked with the loss: an inf gradient would make the weights NaN. The fp16
        # scaler skips steps with inf gradients by itself, so its norm is not checked.
        if not scaler.is_enabled():
            terms["grad_norm"] = grad_norm.detach()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return {"loss": loss.detach(), **terms}


def raise_if_diverged(running, epoch, state, run_dir):
    """Stop if a step summed into `running` had a NaN/inf loss or gradient norm (NaN and inf stay in
    the sums).

    Called at log lines, before saving and at the end of each epoch, not every step: reading the
    loss on the host every step would make the GPU wait. Nothing is saved after a bad step.
    """
    checked = [running.sums[key] for key in ("loss", "grad_norm") if key in running.sums]
    if not checked or torch.isfinite(torch.stack(checked)).all():
        return
    values = ", ".join(f"{key}={value:.4g}" for key, value in running.means().items())
    raise TrainingError(f"non-finite loss or gradient in epoch {epoch + 1} between steps "
                        f"{state['step'] - running.count + 1} and {state['step']} (global step {state['global_step']}); "
                        f"means over those steps: {values}. The last good checkpoint in {run_dir} is kept; "
                        "lower train.lr or check the data")


def final_test(cfg, run_dir, device):
    """Evaluate best.pt on the test split, print the table and write test_metrics.json."""
    checkpoint = load_checkpoint(os.path.join(run_dir, "best.pt"))
    model, loader, device = build_eval_context(cfg, checkpoint, cfg["data"]["test_split"], device)
    results = evaluate_model(model, cfg, loader, device, split=cfg["data"]["test_split"])
    print(format_results(results, title=f"test split, best checkpoint (epoch {checkpoint['epoch']})"), flush=True)
    write_results(results, os.path.join(run_dir, "test_metrics.json"))     # the layout of evaluate.py --out
    return results


# ----------------------------------------------------------------------------- pieces

def select_device(cfg):
    """run.device: auto (this process's GPU, LOCAL_RANK, when there is one), cpu or cuda."""
    wanted = cfg["run"]["device"]
    if wanted not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"run.device={wanted!r}; use auto, cpu or cuda")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA device is available; use run.device=auto or cpu")
    if not torch.cuda.is_available() or wanted == "cpu":
        return torch.device("cpu")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    torch.cuda.set_device(device)
    return device


def make_vocabulary(cfg):
    if cfg["model"]["text"]["type"] != "gru":
        return None
    return build_vocabulary(training_captions(cfg["data"]), cfg["data"]["vocab_min_count"])


def build_optimizer(model, train_cfg):
    """AdamW (or SGD with momentum) with one parameter group per module group at lr * lr_scales[group]."""
    groups = []
    for name, params in model.parameter_groups().items():
        if name not in train_cfg["lr_scales"]:
            raise ConfigError(f"train.lr_scales has no entry for parameter group {name!r}")
        if params:
            groups.append({"params": params, "name": name, "lr": train_cfg["lr"] * train_cfg["lr_scales"][name]})
    if train_cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=train_cfg["lr"], momentum=0.9, weight_decay=train_cfg["weight_decay"])
    return torch.optim.AdamW(groups, lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"])


def cosine_with_warmup(total_steps, warmup_steps):
    """LR multiplier per iteration: linear warm-up, then cosine decay to 0 at total_steps."""
    def multiplier(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return multiplier


def resume_checkpoint(resume, run_dir, cfg):
    """The checkpoint to continue from (None for a fresh run), checked against the config."""
    if resume is None:
        for name in ("last.pt", "best.pt"):
            if os.path.exists(os.path.join(run_dir, name)):
                raise ConfigError(f"{run_dir} already holds {name}: continue it with --resume auto, or "
                                  "start a new run with run.name=<new name>")
        return None
    path = os.path.join(run_dir, "last.pt") if resume == "auto" else resume
    if resume == "auto" and not os.path.exists(path):
        return None
    checkpoint = load_checkpoint(path)
    # over today's defaults: a model key added since the checkpoint was written is not a difference
    differences = config_differences(checkpoint_config(checkpoint, path)["model"], cfg["model"], "model")
    if differences:
        raise CheckpointError(f"{path} was trained with another model config ({'; '.join(differences[:5])}); "
                              "resume with the same config or start a new run")
    return checkpoint


def config_differences(old, new, prefix):
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(old) + [k for k in new if k not in old]
        return [d for k in keys for d in config_differences(old.get(k), new.get(k), f"{prefix}.{k}")]
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def restore_state(checkpoint, model, optimizer, scheduler, scaler):
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    return dict(checkpoint["state"])


def seed_everything(seed, restore=None, loader=None):
    """Seed Python, NumPy and torch RNGs, or restore them (and the loader's generator) from one
    rank's entry of a checkpoint's 'rng' list (see rng_state)."""
    if restore:
        random.setstate(restore["python"])
        torch.set_rng_state(restore["torch"])
        if restore.get("numpy") is not None:
            name, keys, position, has_gauss, gauss = restore["numpy"]
            numpy.random.set_state((name, keys.numpy().astype(numpy.uint32), position, has_gauss, gauss))
        if isinstance(restore.get("cuda"), list) and torch.cuda.is_available():     # version 1: all devices
            torch.cuda.set_rng_state_all(restore["cuda"])
        elif restore.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(restore["cuda"])            # this process's current device
        if loader is not None and restore.get("loader") is not None:
            loader.generator.set_state(restore["loader"])
        return
    random.seed(seed)
    numpy.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(loader_state=None):
    """This process's RNG states: Python, NumPy, torch CPU, its CUDA device, and `loader_state`: the
    state of the generator the train loader draws its worker seeds from, as of the start of the
    epoch (iterating the loader draws from it once)."""
    name, keys, position, has_gauss, gauss = numpy.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(numpy.int64)), position, has_gauss, gauss)  # loads weights_only
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "loader": loader_state}


def rank_rng_state(checkpoint, context):
    """This rank's RNG states from a checkpoint, or None: for a fresh run, and for a checkpoint written
    by another number of processes (the ranks then get new streams, see train)."""
    if checkpoint is None or checkpoint.get("world_size", 1) != context.world_size:
        return None
    states = checkpoint.get("rng")
    states = states if isinstance(states, list) else [states]     # version 1: rank 0's states only
    return states[context.rank]


def elastic_resume(resume, run_dir, context):
    """(resume, restarted): under torchrun, a start of the workers that is not the job's first (the
    agent restarted them after a failure, or a node joined or left) continues <run_dir>/last.pt when
    it exists, whatever --resume says, since the agent repeats the first command line. Such a start is
    seen by TORCHELASTIC_RESTART_COUNT > 0 on any rank, or by the job's store, which outlives the
    workers and holds a mark from every run that started training in it (a membership change does
    not count as a restart)."""
    if context.job_store is None:
        return resume, False
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 or \
        context.store_has(run_started_key(run_dir))
    if not context.any_rank(restarted):     # every rank looked before any rank marks the run started
        return resume, False
    return ("auto" if os.path.exists(os.path.join(run_dir, "last.pt")) else resume), True


def run_started_key(run_dir):
    return f"maxmatch/started/{os.path.abspath(run_dir)}"


def check_same_checkpoint(checkpoint, context, run_dir):
    """Every rank must continue from the same step: they each read <run_dir>, which must be one
    folder shared by all nodes."""
    step = checkpoint["state"]["global_step"] if checkpoint else -1
    low, high = context.min_max(step)
    if low != high:
        raise CheckpointError(f"the processes found different checkpoints in {run_dir} (global steps {low} "
                              f"to {high}; -1: none): every node must see the same run folder, so put "
                              "run.out_dir on a file system all nodes share")


def report_continuation(checkpoint, restarted, context, run_dir):
    """One line when a run continues (after a torchrun restart, or with another process count)."""
    if restarted and checkpoint is None:
        print(f"torchrun started the workers again: {run_dir} has no last.pt yet, so the run starts from "
              "the beginning", flush=True)
    if checkpoint is None:
        return
    state, written_by = checkpoint["state"], checkpoint.get("world_size", 1)
    where = (f"epoch {state['epoch'] + 1} step {state['step']} (global step {state['global_step']}) "
             f"with {context.world_size} process(es)")
    if written_by != context.world_size:
        where += (f", written by {written_by}: the same global batch and sample order, new dropout streams "
                  "and BatchNorm batches (not bit-identical)")
    prefix = "torchrun started the workers again: continuing" if restarted else "continuing"
    print(f"{prefix} {run_dir}/last.pt at {where}", flush=True)


def trim_log(path, state):
    """Drop the log.jsonl lines written after the checkpoint being continued (all when None): the
    steps they describe run again."""
    if not os.path.exists(path):
        return
    with open(path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    kept = [r for r in records if state is not None and (
        r["global_step"] <= state["global_step"] if "global_step" in r else r["epoch"] <= state["epoch"])]
    if len(kept) < len(records):
        temporary = f"{path}.tmp{os.getpid()}"
        with open(temporary, "w") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in kept)
        os.replace(temporary, path)


def synchronise_batchnorm(model, cfg, context):
    """model.image.batchnorm=sync: SyncBatchNorm across processes (CUDA only). One process: as batch."""
    has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if cfg["model"]["image"]["batchnorm"] != "sync" or context.world_size == 1 or not has_batchnorm:
        return model
    if context.device.type != "cuda":
        raise ConfigError("model.image.batchnorm=sync needs CUDA (torch's SyncBatchNorm cannot run on the "
                          "CPU); use model.image.batchnorm=frozen (exact across processes) or batch")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


class CheckpointWriter:
    """Writes checkpoints atomically (temp file, fsync, rename) from the main process. Every rank
    calls it (unless rng_states are given): the RNG states of all ranks are gathered into the file.
    The training loop sets `loader_state` (see rng_state)."""

    def __init__(self, run_dir, cfg, vocab, model, optimizer, scheduler, scaler, context):
        self.run_dir, self.cfg, self.vocab, self.context = run_dir, cfg, vocab, context
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.loader_state, self.last_rng_states = None, None

    def __call__(self, name, state, rng_states=None):
        if rng_states is None:
            rng_states = self.context.gather_objects(rng_state(self.loader_state))     # [rank 0, rank 1, ...]
            self.last_rng_states = rng_states
        if not self.context.is_main:
            return
        checkpoint = {"version": CHECKPOINT_VERSION, "model": self.model.state_dict(),
                      "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                      "scaler": self.scaler.state_dict(), "state": dict(state), "epoch": state["epoch"],
                      "rng": rng_states, "world_size": self.context.world_size, "config": self.cfg,
                      "vocab": self.vocab}
        atomic_save(checkpoint, os.path.join(self.run_dir, name))


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(temporary, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


class LostPeer(Exception):
    """Another process of the job died or hung; its one line is printed (see train)."""


class Interrupted(Exception):
    """Raised after a signal-triggered save; carries the shell exit code (128 + signal)."""

    def __init__(self, exit_code):
        super().__init__(exit_code)
        self.exit_code = exit_code


class StopRequest:
    """SIGTERM / Ctrl-C set a flag in the process that receives it; `agreed()`, called by every rank
    after every step, tells all ranks whether any rank has it (the largest signal number wins), so
    all stop at the same step boundary, save last.pt once and exit with 128 + `agreed_signal`.

    The handler only ever raises `signal_number`: a signal that arrives while the flag is in flight
    (the handler runs when the all_reduce returns) is sent at the next step, never lost."""

    def __init__(self, context):
        self.context, self.signal_number, self.agreed_signal = context, 0, 0
        self.previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
        for signal_number in self.previous:
            signal.signal(signal_number, self.handle)

    def restore(self):
        """Reinstall the handlers found at construction (not after ignore_further_signals)."""
        for signal_number, handler in self.previous.items():
            signal.signal(signal_number, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def handle(self, signal_number, frame):
        self.signal_number = max(self.signal_number, signal_number)

    def agreed(self):
        self.agreed_signal = self.context.largest(self.signal_number)
        return self.agreed_signal > 0

    def ignore_further_signals(self):
        """After the stop is saved: a SIGTERM from torchrun (sent to the ranks still exiting when the
        first one has left) must not turn this rank's exit code 128 + signal into death by signal."""
        self.previous = {}
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signal_number, signal.SIG_IGN)


class JsonlLog:
    """log.jsonl, one JSON object per line. With tensorboard=True (run.tensorboard) the same scalars
    also go to TensorBoard event files in the same folder: a step line's as step/<key> at its
    global step, an epoch summary's as epoch/<key>[/<sub key>...] at its epoch."""

    def __init__(self, path, tensorboard=False):
        self.path, self.writer = path, None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter     # present: require_tensorboard checked it
            self.writer = SummaryWriter(log_dir=os.path.dirname(path) or ".")
            weakref.finalize(self, self.writer.close)

    def write(self, record):
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            kind, position = ("step", "global_step") if "global_step" in record else ("epoch", "epoch")
            for tag, value in numeric_leaves(record, skip=("epoch", "step", "global_step")):
                self.writer.add_scalar(f"{kind}/{tag}", value, global_step=record[position])
            self.writer.flush()


def numeric_leaves(record, skip=(), prefix=""):
    """('key/sub key', number) for every number in a nested dict, keys in `skip` left out at the top."""
    for key, value in record.items():
        if key in skip:
            continue
        if isinstance(value, dict):
            yield from numeric_leaves(value, prefix=f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", value


def require_tensorboard(cfg):
    """run.tensorboard=true without the tensorboard package: one line saying how to install it, before
    anything is trained."""
    if not cfg["run"]["tensorboard"]:
        return
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError("run.tensorboard=true needs the tensorboard package: pip install tensorboard "
                          "(or run with run.tensorboard=false)") from None


class RunningMean:
    """Running means of the loss terms, kept on the device until read (no per-step host sync)."""

    def __init__(self):
        self.sums, self.count = {}, 0

    def add(self, terms):
        for key, value in terms.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
        self.count += 1

    def means(self):
        return {key: round(value.item() / max(self.count, 1), 5) for key, value in self.sums.items()}


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def epoch_line(summary, is_best):
    val, train_terms = summary["val"], summary["train"]
    terms = " ".join(f"{k} {v:.3f}" for k, v in train_terms.items())
    return (f"epoch {summary['epoch']:3d} | {terms} | val R@1 i2t {val['i2t_r1']:.1f} t2i {val['t2i_r1']:.1f} "
            f"rsum {val['rsum']:.1f}{' *' if is_best else ''} | {summary['time_s']:.0f}s")


if __name__ == "__main__":
    sys.exit(main(exiting=True))
