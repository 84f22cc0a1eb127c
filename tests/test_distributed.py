"""train.py under torchrun with 2 gloo processes on the CPU: N processes train like one, BatchNorm
modes, and preemption of one rank stopping all of them (continuing runs: test_elastic.py).

Every multi-process run has a time limit and is killed with its whole process group when it
passes it, so a hang fails the test instead of blocking the suite."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import distributed
import train
from data import prepare_data
from model import load_checkpoint
from test_train import assert_same_weights, tiny_overrides, weights, write_precomputed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# PYTHONFAULTHANDLER: a worker killed by a fatal signal (a C++ abort at exit was seen once in CI)
# prints every thread's Python stack, so a failure shows where it happened
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
       "PYTHONFAULTHANDLER": "1"}
RUN_LIMIT_S = 300
GLOO_THREADS_WARNING = "gloo threads still running at exit"     # train.main's warning (see distributed.py)
# Comparisons of 1 and 2 processes: SGD (Adam's update ignores the gradient's scale and would hide a
# loss-scaling bug), dropout off, 3 steps. One step at this lr moves half of the weights by more
# than 1e-4; float noise stays below it.
SAME_GLOBAL_BATCH = ["model.dropout=0.0", "train.epochs=1", "train.stop_after_steps=3", "train.optimizer=sgd",
                     "train.lr=0.1"]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    """The built-in dataset at its tiny test size (48 training images of 32 px), generated once."""
    root = tmp_path_factory.mktemp("shapes")
    cfg = train.load_config(None, shapes_overrides(root, root, "unused"))
    prepare_data(cfg["data"])
    return root


def shapes_overrides(tmp_path, shapes_root, name):
    """The DEFAULT path (ResNet + BiGRU, random crops, token drop 0.2) at tiny size: 6 steps/epoch."""
    return tiny_overrides(tmp_path, name=name) + [f"data.root={shapes_root}"]


def torchrun(args, timeout=RUN_LIMIT_S, launcher=("--standalone", "--nproc_per_node=2"), script="train.py"):
    """train.py under `torchrun --nproc_per_node=2` (gloo; `launcher`: torchrun's own arguments); the
    CompletedProcess. Past `timeout` the test fails with every worker's Python stacks (see kill_job).
    Every run must leave without gloo threads still running at exit (train.py warns of them)."""
    process = start_torchrun(args, launcher, script)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stderr = kill_job(process)
        pytest.fail(f"torchrun {' '.join(args[-3:])} did not finish within {timeout} s; the workers' stacks and "
                    f"stderr:\n{stderr[-12000:]}")
    assert GLOO_THREADS_WARNING not in stderr, stderr[-12000:]
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def kill_job(process):
    """End a job that outlived its limit: SIGABRT to torchrun's workers (each in its own session, so not
    in the launcher's process group), which with PYTHONFAULTHANDLER prints every thread's Python
    stack, then SIGKILL to them and the launcher. Returns the launcher's stderr from then on (the
    workers' stacks: they share it)."""
    workers = worker_pids(process.pid)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGABRT)
        except ProcessLookupError:
            pass
    time.sleep(2)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.killpg(process.pid, signal.SIGKILL)
    try:
        return process.communicate()[1] or ""
    except ValueError:          # the pipe was read by another thread (LineReader)
        return ""


def start_torchrun(args, launcher=("--standalone", "--nproc_per_node=2"), script="train.py"):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, script, *args], cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def worker_pids(launcher_pid):
    """The launcher's child processes (its workers)."""
    try:
        with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as handle:
            return [int(pid) for pid in handle.read().split()]
    except FileNotFoundError:
        return []


def worker_pid(launcher_pid, rank):
    """The pid of the torchrun worker process with RANK=rank (a child of the launcher)."""
    children = worker_pids(launcher_pid)
    for pid in children:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            if f"RANK={rank}".encode() in handle.read().split(b"\0"):
                return pid
    raise AssertionError(f"no worker with RANK={rank} among {children}")


def single_process(args):
    assert train.main(args) == 0


# ----------------------------------------------------------------------------- N processes = 1

def test_two_processes_train_like_one_on_the_default_path_with_frozen_batchnorm(tmp_path, shapes_root):
    base = shapes_overrides(tmp_path, shapes_root, "run") + SAME_GLOBAL_BATCH + ["model.image.batchnorm=frozen"]
    single_process(base + ["run.name=single"])
    double = torchrun(base + ["run.name=double"])
    assert double.returncode == 0, double.stderr[-12000:]
    assert_same_weights(weights(tmp_path / "runs" / "single" / "last.pt"),
                        weights(tmp_path / "runs" / "double" / "last.pt"), atol=1e-4)


def test_two_processes_train_like_one_on_a_tiny_bert_path(tmp_path):
    write_precomputed(tmp_path / "precomp")
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    words = ["red", "blue", "cat", "dog", "sits", "runs", "big", "small", "on", "mat"]
    (tokenizer / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    (tokenizer / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer", "do_lower_case": true}')
    bert = ("{vocab_size: 16, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64, "
            "max_position_embeddings: 32, hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}")
    base = tiny_overrides(tmp_path, dataset="precomputed") + SAME_GLOBAL_BATCH + [
        "model.text.type=bert", f"model.text.tokenizer={tokenizer}", f"model.text.bert_config={bert}"]
    single_process(base + ["run.name=single"])
    double = torchrun(base + ["run.name=double"])
    assert double.returncode == 0, double.stderr[-12000:]
    assert_same_weights(weights(tmp_path / "runs" / "single" / "last.pt"),
                        weights(tmp_path / "runs" / "double" / "last.pt"), atol=1e-4)


def test_sync_batchnorm_on_cpu_processes_stops_with_one_line_naming_the_alternatives(tmp_path, shapes_root):
    result = torchrun(shapes_overrides(tmp_path, shapes_root, "run") + ["model.image.batchnorm=sync"])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors     # each rank prints it, unless torchrun ends the job first (the first rank to fail does)
    assert all("model.image.batchnorm=sync" in line and "frozen" in line and "batch" in line for line in errors)
    assert 'train.py", line' not in result.stderr              # no traceback from train.py (torchrun has its own)
    assert not (tmp_path / "runs" / "run" / "last.pt").exists()


# ----------------------------------------------------------------------------- preemption

def test_sigterm_to_one_worker_stops_every_rank_and_the_run_resumes(tmp_path, shapes_root):
    base = shapes_overrides(tmp_path, shapes_root, "run") + ["train.epochs=1000"]
    process = start_torchrun(base)
    log = tmp_path / "runs" / "run" / "log.jsonl"
    deadline = time.time() + RUN_LIMIT_S
    try:
        while not (log.exists() and log.read_text().count("\n") >= 3) and process.poll() is None:
            assert time.time() < deadline, "training did not start"
            time.sleep(0.05)
        os.kill(worker_pid(process.pid, rank=1), signal.SIGTERM)         # rank 1 only: rank 0 must follow
        signalled = time.time()
        stdout, stderr = process.communicate(timeout=60)
    except (AssertionError, subprocess.TimeoutExpired):
        stderr = kill_job(process)
        pytest.fail(f"the job did not start, or did not end after SIGTERM to one worker; the workers' stacks and "
                    f"stderr:\n{stderr[-12000:]}")
    assert GLOO_THREADS_WARNING not in stderr, stderr[-12000:]
    assert time.time() - signalled < 30
    # torchrun's failure summary: "rank : 1 (local_rank: 1)" then "exitcode : 143 (pid: ...)"
    exit_codes = dict(re.findall(r"rank\s*:\s*(\d+) \(local_rank[^\n]*\n[^\n]*exitcode\s*:\s*(-?\d+)", stderr))
    assert exit_codes == {"0": str(128 + signal.SIGTERM), "1": str(128 + signal.SIGTERM)}, stderr[-12000:]
    assert "stopped by signal" in stdout and "--resume auto" in stdout
    checkpoint = load_checkpoint(str(tmp_path / "runs" / "run" / "last.pt"))
    saved_step = checkpoint["state"]["global_step"]
    assert saved_step >= 3 and len(checkpoint["rng"]) == 2
    assert not [name for name in os.listdir(tmp_path / "runs" / "run") if ".tmp" in name]

    resumed = torchrun(base + ["train.stop_after_steps=3", "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-12000:]
    assert load_checkpoint(str(tmp_path / "runs" / "run" / "last.pt"))["state"]["global_step"] == saved_step + 3


def test_a_signal_arriving_while_the_stop_flag_is_in_flight_is_sent_at_the_next_step(monkeypatch):
    """The handler runs when the flag's all_reduce returns; the flag sent before it must not erase it
    (it did once, and the job then trained on forever). The collective here is rank 0's view of a
    2-rank MAX where the other rank has no signal: the tensor is left as it is."""
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    stop = train.StopRequest(distributed.DistributedContext(0, 2, torch.device("cpu")))

    def all_reduce_during_which_sigterm_arrives(flag, op, group):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
    try:
        monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce_during_which_sigterm_arrives)
        assert stop.signal_number == 0 and not stop.agreed()      # sent 0: no rank stops at this step
        monkeypatch.setattr(distributed.dist, "all_reduce", lambda flag, op, group: None)
        assert stop.agreed() and stop.agreed_signal == signal.SIGTERM    # sent at the next step
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


# ----------------------------------------------------------------------------- leaving the job

def test_leaving_the_job_stops_every_gloo_thread_before_the_interpreter_exits():
    """distributed.py imports torch.distributed.nn before any group exists; imported after one (as
    torchvision does when the image encoder is built), its default arguments keep the group and its
    threads alive past destroy_process_group into the interpreter's shutdown (the abort's cause).
    Each case runs in a fresh interpreter with a one-process gloo group."""
    script = """import os, sys
sys.path.insert(0, {repo!r})
import torch.distributed as dist
if {first}:
    import distributed
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
import torch.distributed.nn        # the late import: torchvision's, via torch._dynamo
import distributed
before = distributed.gloo_threads_left()
distributed.DistributedContext(0, 1, None, owns_groups=True).close()
print(len(before), len(distributed.gloo_threads_left()))
"""
    counts = {}
    for first in (True, False):
        result = subprocess.run([sys.executable, "-c", script.format(repo=REPO, first=first)], env=ENV,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        counts[first] = [int(n) for n in result.stdout.split()]
    assert counts[True][0] > 0 and counts[True][1] == 0, counts         # imported first: all stopped
    assert counts[False][1] > 0, counts                                  # imported late: they outlive the group


def test_a_two_process_run_that_stops_after_steps_exits_with_no_gloo_thread_left(tmp_path, shapes_root):
    """The CI abort's path: 2 processes, train.stop_after_steps; torchrun() requires no warning."""
    result = torchrun(shapes_overrides(tmp_path, shapes_root, "run") + ["train.stop_after_steps=3"])
    assert result.returncode == 0, result.stderr[-12000:]
    assert "Traceback" not in result.stderr and "terminate called" not in result.stderr, result.stderr[-12000:]
