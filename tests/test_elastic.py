"""Continuing a run under torchrun's elastic agent, on the default path (ResNet + BiGRU, random crops,
token drop) at tiny size with 2 gloo processes on the CPU: exact resume mid-epoch, a worker killed
without warning and started again by the agent (static and c10d rendezvous), a hung peer, a run
continued with another number of processes, and two launchers acting as two nodes.

Every multi-process run has a time limit (see test_distributed.torchrun); the repeated kills that
show the restart is reliable are `benchmarks/elastic_stress.py`."""
import collections
import datetime
import json
import os
import shutil
import signal
import re
import socket
import subprocess
import threading
import time

import pytest
import torch
import torch.distributed as dist

import distributed
import train
from model import load_checkpoint
from test_distributed import GLOO_THREADS_WARNING, REPO, RUN_LIMIT_S, kill_job, shapes_overrides, shapes_root, start_torchrun, torchrun, worker_pid  # noqa: F401
from test_train import assert_same_weights, weights

EXACT = ["run.deterministic=true"]          # dropout 0.1 on; 6 steps/epoch x 2 epochs = 12 steps
# Runs continued with another number of processes are compared with one process on the weights too:
# no dropout, BatchNorm on running statistics, SGD (see test_distributed.SAME_GLOBAL_BATCH).
COMPARABLE = ["model.dropout=0.0", "model.image.batchnorm=frozen", "train.optimizer=sgd", "train.lr=0.1"]
RESTARTS = ["--nproc_per_node=2", "--max-restarts=2"]
RECORDER = """import os, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import train
from test_elastic import record_samples
train.set_loader_epoch, train.training_step = record_samples(train, {out!r})
sys.exit(train.main(sys.argv[1:], exiting=True))
"""
SLOW_LINE = """import sys, time
sys.path.insert(0, {repo!r})
import train
reason = train.lost_peer_reason
train.lost_peer_reason = lambda error: (time.sleep(3), reason(error))[1]
sys.exit(train.main(sys.argv[1:], exiting=True))
"""


@pytest.fixture(scope="module")
def left_alone(tmp_path_factory, shapes_root):
    """last.pt of the 2-process run that nothing interrupts (torchrun --standalone)."""
    tmp_path = tmp_path_factory.mktemp("left_alone")
    result = torchrun(shapes_overrides(tmp_path, shapes_root, "straight") + EXACT)
    assert result.returncode == 0, result.stderr[-12000:]
    return tmp_path / "runs" / "straight" / "last.pt"


# ----------------------------------------------------------------------------- a worker dies

@pytest.mark.parametrize("checkpoint_every, rendezvous, continued_from", [
    (2, "static", "epoch 2 step 2 (global step 8)"),     # the step checkpoint before the kill
    (0, "c10d", "epoch 2 step 0 (global step 6)"),       # epoch ends only: the end of epoch 1
])
def test_a_worker_killed_without_warning_is_started_again_by_torchrun_and_the_run_ends_as_if_left_alone(
        tmp_path, shapes_root, left_alone, checkpoint_every, rendezvous, continued_from):
    """SIGKILL to rank 1 once step 9 (of 6 per epoch) is logged; the same command line, no --resume."""
    args = shapes_overrides(tmp_path, shapes_root, "killed") + EXACT + [f"train.checkpoint_every={checkpoint_every}"]
    result = run_and_kill(args, rendezvous_arguments(rendezvous) + RESTARTS, tmp_path / "runs" / "killed",
                          at_global_step=9)
    assert result.returncode == 0, result.stderr[-12000:]
    assert f"torchrun started the workers again: continuing {tmp_path}/runs/killed/last.pt at {continued_from}" \
        in result.stdout
    # the survivor left with one line and no traceback. torchrun's agent sends it SIGTERM within 0.1 s
    # of the kill; that signal used to end it before the line when it landed after the loop put the
    # default handler back (see the next test).
    assert "Traceback" not in result.stderr, result.stderr[-6000:]
    assert "error: rank 0: another process of the job died or hung" in result.stderr, result.stderr[-6000:]
    assert_same_weights(weights(left_alone), weights(tmp_path / "runs" / "killed" / "last.pt"))   # bit for bit
    straight_rng = load_checkpoint(str(left_alone))["rng"]
    killed_rng = load_checkpoint(str(tmp_path / "runs" / "killed" / "last.pt"))["rng"]
    assert not torch.equal(straight_rng[0]["torch"], straight_rng[1]["torch"])      # each rank its own
    for rank in (0, 1):      # every RNG ends where the uninterrupted run's did, the loader's generator too
        for name in ("torch", "loader"):
            assert torch.equal(straight_rng[rank][name], killed_rng[rank][name]), (rank, name)
        assert straight_rng[rank]["python"] == killed_rng[rank]["python"]
    logged = [json.loads(line).get("global_step") for line in (tmp_path / "runs" / "killed" / "log.jsonl").open()]
    assert [step for step in logged if step] == list(range(1, 13))     # the redone steps are logged once


def test_a_survivor_of_a_hung_peer_leaves_within_the_timeout_with_one_line(tmp_path, shapes_root):
    """SIGSTOP to rank 1 (a hung peer: its sockets stay open, so only the timeout can tell)."""
    args = shapes_overrides(tmp_path, shapes_root, "hung") + ["train.epochs=1000", "run.dist_timeout_s=5"]
    process = start_torchrun(args, ["--standalone", "--nproc_per_node=2", "--max-restarts=0"])
    lines = LineReader(process.stderr)
    try:
        wait_for_logged_step(process, tmp_path / "runs" / "hung" / "log.jsonl", 3)
        hung = worker_pid(process.pid, rank=1)
        os.kill(hung, signal.SIGSTOP)
        stopped = time.time()
        line = lines.first(lambda text: text.startswith("error:"), timeout=60)
        left_after = time.time() - stopped
        os.kill(hung, signal.SIGCONT)        # so that it can take torchrun's SIGTERM
        process.wait(timeout=60)
    except (AssertionError, subprocess.TimeoutExpired):
        kill_job(process)
        raise
    assert 4.5 < left_after < 20, left_after
    # gloo says so in one of two ways, depending on the collective rank 0 is in (a receive, or DDP's
    # buffer broadcast, which rank 0 sends)
    assert re.match(r"error: rank 0: another process of the job died or hung \((Timed out waiting 5000ms|"
                    r"Application timeout caused pair closure)", line), line
    assert process.returncode != 0
    output = "".join(lines.lines)
    assert 'train.py", line' not in output, output[-6000:]
    assert GLOO_THREADS_WARNING not in output, output[-6000:]


def test_a_survivor_says_why_it_leaves_even_when_torchrun_sigterms_it_on_the_way_out(tmp_path, shapes_root):
    """SIGKILL to rank 1; rank 0's path from the failed collective to its one line is slowed by 3 s,
    so torchrun's SIGTERM to the survivor (sent within 0.1 s of the kill) lands inside it. Until the
    signals stayed ignored on that path, rank 0 died by that SIGTERM there, silently."""
    script = tmp_path / "slow_line.py"
    script.write_text(SLOW_LINE.format(repo=REPO))
    args = shapes_overrides(tmp_path, shapes_root, "slow") + ["train.epochs=1000"]
    process = start_torchrun(args, ["--standalone", "--nproc_per_node=2", "--max-restarts=0"], script=str(script))
    try:
        wait_for_logged_step(process, tmp_path / "runs" / "slow" / "log.jsonl", 3)
        os.kill(worker_pid(process.pid, rank=1), signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=RUN_LIMIT_S)
    except (AssertionError, subprocess.TimeoutExpired):
        kill_job(process)
        raise
    assert "error: rank 0: another process of the job died or hung" in stderr, stderr[-6000:]
    assert 'train.py", line' not in stderr, stderr[-6000:]           # no worker traceback (torchrun has its own)
    exit_codes = dict(re.findall(r"rank\s*:\s*(\d+) \(local_rank[^\n]*\n[^\n]*exitcode\s*:\s*(-?\d+)", stderr))
    assert exit_codes.get("0") in (None, str(train.LOST_PEER_EXIT)), stderr[-6000:]      # not -15


# ----------------------------------------------------------------------------- membership changes

@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_run_continued_with_another_number_of_processes_trains_on_every_sample_once_to_the_same_step(
        tmp_path, shapes_root, monkeypatch, capsys, before, after):
    """Stopped after 5 of 12 steps (mid-epoch 1) with `before` processes, continued with `after`; the
    uninterrupted run has one process."""
    samples = tmp_path / "samples"
    samples.mkdir()
    base = shapes_overrides(tmp_path, shapes_root, "run") + COMPARABLE

    def run(processes, args, out):
        os.makedirs(out, exist_ok=True)
        if processes == 1:
            with monkeypatch.context() as patch:
                recorded = record_samples(train, out)
                patch.setattr(train, "set_loader_epoch", recorded[0])
                patch.setattr(train, "training_step", recorded[1])
                assert train.main(args) == 0
            return capsys.readouterr().out
        script = tmp_path / "record.py"
        script.write_text(RECORDER.format(repo=REPO, tests=os.path.dirname(__file__), out=str(out)))
        result = torchrun(args, script=str(script))
        assert result.returncode == 0, result.stderr[-12000:]
        return result.stdout

    run(1, base + ["run.name=straight"], samples / "straight")
    run(before, base + ["run.name=continued", "train.stop_after_steps=5"], samples / "continued")
    stdout = run(after, base + ["run.name=continued", "--resume", "auto"], samples / "continued")
    assert (f"continuing {tmp_path}/runs/continued/last.pt at epoch 1 step 5 (global step 5) with {after} "
            f"process(es), written by {before}") in stdout
    straight = load_checkpoint(str(tmp_path / "runs" / "straight" / "last.pt"))
    continued = load_checkpoint(str(tmp_path / "runs" / "continued" / "last.pt"))
    assert continued["state"]["global_step"] == straight["state"]["global_step"] == 12
    assert continued["world_size"] == after and len(continued["rng"]) == after
    assert recorded_samples(samples / "continued") == recorded_samples(samples / "straight")
    assert sum(recorded_samples(samples / "straight").values()) == 12 * 8          # 12 steps of 8 images
    # floating-point sums split another way: far below what one batch more or less would move
    assert_same_weights(straight["model"], continued["model"], atol=1e-4)


# ----------------------------------------------------------------------------- several nodes

def test_two_launchers_as_two_nodes_reach_the_weights_of_one_launcher_with_two_processes(tmp_path, shapes_root,
                                                                                    left_alone):
    """`torchrun --nnodes=2 --nproc_per_node=1` twice, c10d rendezvous on loopback, one run folder."""
    args = shapes_overrides(tmp_path, shapes_root, "nodes") + EXACT
    launcher = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                "--rdzv-id=two-nodes"]
    nodes = [start_torchrun(args, launcher) for _ in range(2)]
    outputs = finish_launchers(nodes)
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert_same_weights(weights(left_alone), weights(tmp_path / "runs" / "nodes" / "last.pt"))


def test_nodes_that_do_not_share_the_run_folder_stop_with_one_line_instead_of_training_apart(tmp_path, shapes_root,
                                                                                            left_alone):
    """Two launchers as nodes 0 and 1 (static rendezvous), each with its own run.out_dir; only node
    0's holds last.pt, as after a restart on nodes without a shared file system."""
    port = free_port()
    nodes = []
    for node in (0, 1):
        args = shapes_overrides(tmp_path / f"node{node}", shapes_root, "run") + EXACT + ["--resume", "auto"]
        if node == 0:
            os.makedirs(tmp_path / "node0" / "runs" / "run")
            shutil.copy(left_alone, tmp_path / "node0" / "runs" / "run" / "last.pt")
        nodes.append(start_torchrun(args, ["--nnodes=2", f"--node-rank={node}", "--nproc_per_node=1",
                                           "--master-addr=127.0.0.1", f"--master-port={port}"]))
    outputs = finish_launchers(nodes)
    errors = [line for _, stderr in outputs for line in stderr.splitlines() if line.startswith("error:")]
    assert all(node.returncode != 0 for node in nodes)
    assert errors and all("found different checkpoints" in line and "global steps -1 to 12" in line and
                          "run.out_dir" in line for line in errors), errors
    assert not (tmp_path / "node1" / "runs" / "run" / "last.pt").exists()


# ----------------------------------------------------------------------------- pieces, in one process

def test_workers_started_again_ignore_the_attempt_id_that_dead_workers_left_in_the_store():
    """The store outlives the workers; rank 1 of the new start reads the old id first and must not
    connect under it. A HashStore shared by threads stands in for torchrun's TCPStore."""
    store = dist.HashStore()
    store.set("maxmatch/attempt", "left-by-the-dead")
    store.set("maxmatch/attempt/left-by-the-dead/echo/1", "an old token")
    timeout = datetime.timedelta(seconds=30)
    agreed = {}

    def join(rank):
        agreed[rank] = distributed.agree_on_attempt(store, rank, 3, timeout, poll_s=0.005)
    others = [threading.Thread(target=join, args=(rank,)) for rank in (1, 2)]
    for thread in others:
        thread.start()
    time.sleep(0.2)          # ranks 1 and 2 have seen the old id before rank 0 starts
    join(0)
    for thread in others:
        thread.join(timeout=30)
    assert agreed[0] != "left-by-the-dead" and agreed == {0: agreed[0], 1: agreed[0], 2: agreed[0]}


def test_an_attempt_without_rank_0_ends_with_a_store_error_naming_the_timeout():
    store = dist.HashStore()
    with pytest.raises(dist.DistStoreError, match="run.dist_timeout_s=0.2"):
        distributed.agree_on_attempt(store, 1, 2, datetime.timedelta(seconds=0.2))
    assert distributed.lost_peer_reason(dist.DistStoreError("rank 0 did not answer")) == \
        "another process of the job died or hung (rank 0 did not answer)"
    assert distributed.lost_peer_reason(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    # what DDP's buffer broadcast raised on rank 0 once rank 1 hung (1 hung-peer test in 8 under load)
    assert distributed.lost_peer_reason(RuntimeError("Application timeout caused pair closure")) == \
        "another process of the job died or hung (Application timeout caused pair closure)"


def test_a_start_in_a_job_whose_store_saw_the_run_continues_it_whatever_resume_says(tmp_path, monkeypatch):
    """A node joining or leaving restarts the workers with TORCHELASTIC_RESTART_COUNT=0: the job's store
    tells that start from the job's first."""
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    context = distributed.DistributedContext(0, 1, torch.device("cpu"), job_store=dist.HashStore())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes(b"")
    assert train.elastic_resume(None, str(run_dir), context) == (None, False)       # the job's first start
    context.store_mark(train.run_started_key(str(run_dir)))
    assert train.elastic_resume(None, str(run_dir), context) == ("auto", True)
    assert train.elastic_resume("elsewhere/best.pt", str(run_dir), context) == ("auto", True)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    fresh = distributed.DistributedContext(0, 1, torch.device("cpu"), job_store=dist.HashStore())
    assert train.elastic_resume(None, str(run_dir), fresh) == ("auto", True)
    (run_dir / "last.pt").unlink()                  # died before its first checkpoint: starts over
    assert train.elastic_resume(None, str(run_dir), fresh) == (None, True)


def test_continuing_drops_the_log_lines_of_the_steps_that_run_again(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [{"epoch": 0, "step": 1, "global_step": 1}, {"epoch": 0, "step": 2, "global_step": 2},
               {"epoch": 1, "train": {}}, {"epoch": 1, "step": 1, "global_step": 3},
               {"epoch": 1, "step": 2, "global_step": 4}, {"epoch": 2, "train": {}}]
    log.write_text("".join(json.dumps(record) + "\n" for record in records))
    train.trim_log(str(log), {"epoch": 1, "step": 1, "global_step": 3})
    assert [json.loads(line) for line in log.open()] == records[:4]
    train.trim_log(str(log), None)
    assert log.read_text() == ""


# ----------------------------------------------------------------------------- helpers

def record_samples(train_module, out_dir):
    """Replacements for train's set_loader_epoch and training_step that append every trained batch's
    (epoch, image indices) to <out_dir>/samples.<pid>.jsonl."""
    set_loader_epoch, training_step = train_module.set_loader_epoch, train_module.training_step
    epoch = [None]

    def recording_set_loader_epoch(loader, number, start_batch=0):
        epoch[0] = number
        return set_loader_epoch(loader, number, start_batch)

    def recording_training_step(trainer, batch, *args):
        with open(os.path.join(out_dir, f"samples.{os.getpid()}.jsonl"), "a") as handle:
            handle.write(json.dumps([epoch[0], batch["image_ids"].tolist()]) + "\n")
        return training_step(trainer, batch, *args)
    return recording_set_loader_epoch, recording_training_step


def recorded_samples(out_dir):
    """Counter of (epoch, image index) over every process's record in out_dir."""
    counts = collections.Counter()
    for name in os.listdir(out_dir):
        for line in open(os.path.join(out_dir, name)):
            epoch, indices = json.loads(line)
            counts.update((epoch, index) for index in indices)
    return counts


def rendezvous_arguments(kind):
    if kind == "static":      # torchrun's default rendezvous: a fixed master port
        return ["--nnodes=1", f"--master-port={free_port()}"]
    return ["--standalone"]   # c10d rendezvous on a free local port


def run_and_kill(args, launcher, run_dir, at_global_step, rank=1):
    """torchrun `launcher` train.py `args`; SIGKILL to the worker of `rank` once log.jsonl shows
    `at_global_step`; the CompletedProcess of the whole job."""
    process = start_torchrun(args, launcher)
    try:
        wait_for_logged_step(process, run_dir / "log.jsonl", at_global_step)
        os.kill(worker_pid(process.pid, rank), signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=RUN_LIMIT_S)
    except (AssertionError, subprocess.TimeoutExpired) as error:
        stderr = kill_job(process)
        raise AssertionError(f"{error}; the workers' stacks and stderr:\n{stderr[-12000:]}") from None
    assert GLOO_THREADS_WARNING not in stderr, stderr[-12000:]
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def finish_launchers(launchers):
    """(stdout, stderr) of each torchrun launcher once all have ended; kills them all past the limit."""
    try:
        return [launcher.communicate(timeout=RUN_LIMIT_S) for launcher in launchers]
    except subprocess.TimeoutExpired:
        for launcher in launchers:
            kill_job(launcher)
        pytest.fail(f"the launchers did not end within {RUN_LIMIT_S} s")


def wait_for_logged_step(process, log, global_step, timeout=RUN_LIMIT_S):
    deadline = time.time() + timeout
    while logged_step(log) < global_step:
        assert process.poll() is None, "the job ended before the step"
        assert time.time() < deadline, f"step {global_step} was not logged within {timeout} s"
        time.sleep(0.01)


def logged_step(log):
    try:
        with open(log) as handle:
            return max([json.loads(line).get("global_step", 0) for line in handle if line.endswith("\n")] or [0])
    except FileNotFoundError:
        return 0


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LineReader:
    """Reads a pipe line by line in a thread, so a test can wait for a line with a time limit."""

    def __init__(self, pipe):
        self.lines, self.condition = [], threading.Condition()
        threading.Thread(target=self.read, args=(pipe,), daemon=True).start()

    def read(self, pipe):
        for line in pipe:
            with self.condition:
                self.lines.append(line)
                self.condition.notify_all()

    def first(self, wanted, timeout):
        deadline = time.time() + timeout
        with self.condition:
            while True:
                found = [line for line in self.lines if wanted(line)]
                if found:
                    return found[0]
                assert time.time() < deadline, "no such line within the time limit; the output so far:\n" + \
                    "".join(self.lines[-60:])
                self.condition.wait(timeout=0.1)
