"""The process group of a training job, from joining to leaving, in the order it happens.

train.py's loop calls what is here and nothing of torch.distributed itself. The lifecycle:

1. **Import.** `torch.distributed.nn` is imported with this file, before any group exists. Its
   functions take `group=group.WORLD` as a default argument, evaluated when the module is first
   imported; imported after `init_process_group` (torchvision imports it through torch._dynamo when
   the image encoder is built), the defaults of its ten collectives hold the default group for the life of the
   interpreter. `destroy_process_group()` then cannot free it: gloo's worker threads
   (`pt_gloo_runloop`, `gloo_tcp_loop`) keep running into interpreter shutdown, where the group's
   destructor finally runs and joins them. A C++ thread that is still joinable, or one that takes
   the GIL once shutdown has begun (Python 3.11 ends it with pthread_exit, which through a
   `noexcept` frame becomes std::terminate), aborts the process after training finished:
   "terminate called without an active exception". Imported first, the defaults are None.
2. **Joining** (`join_job`): one process alone has no group. Under torchrun, `env://` rendezvous
   gives torchrun's store, which lives as long as the job; rank 0 draws an attempt id for this start
   of the workers and the others take it only once rank 0 echoed their token (`agree_on_attempt`),
   so workers started again never read the addresses that dead ones left in the store; the default
   group (NCCL on GPUs, gloo on the CPU) connects under that id's key prefix. On GPUs a second, gloo
   group carries the small host-side collectives (stop flags, RNG states), so the host never waits
   on the GPU. torchrun with one process: the store only (no group).
3. **Collectives** the loop uses, on `DistributedContext`: `gather` (all_gather WITH gradient, so hardest
   negatives come from the global batch), `gather_objects`, `min_max` / `any_rank` / `largest`,
   `barrier`. All are no-ops for one process.
4. **A lost peer** (`lost_peer_reason`): an error from a collective or the store, because another
   process died, hung past `run.dist_timeout_s` or never connected, is told apart from any other
   error, so train.py can leave with one line and let torchrun restart the workers.
5. **Leaving** (`DistributedContext.close`), on every exit path: the caller drops its last reference to the
   group's users first (the DDP wrapper, whose reducer holds the group); then every group this
   process created is destroyed (newest first, by torch), the store reference dropped and a garbage
   collection run, so the group's destructor joins gloo's threads here, while the interpreter is
   whole. `gloo_threads_left()` names any gloo thread still running after that: train.py warns about it,
   and the tests require it to be empty.

Imports only torch.
"""
import datetime
import gc
import os
import time
import uuid

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401 - before any group exists: see step 1 above

# gloo's errors that reach Python as a bare RuntimeError, not a DistError: its transport errors name
# their source file, but a broadcast from the root (DDP's buffer sync) whose peer hung past the
# timeout only says "Application timeout caused pair closure".
GLOO_PEER_ERRORS = ("gloo/transport", "Application timeout caused pair closure", "Connection closed by peer")
GLOO_THREAD_NAMES = ("pt_gloo_runloop", "gloo_tcp_loop")


def join_job(device, timeout_s):
    """This process's place in the job on `device` (a torch.device): rank, world size and the groups,
    from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK); alone without one. A group that
    already exists (created by the caller) is used and left to the caller."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = datetime.timedelta(seconds=timeout_s)
    job_store, owns_groups = None, False
    if world_size > 1 and not dist.is_initialized():
        job_store = join_process_group("nccl" if device.type == "cuda" else "gloo", rank, world_size, timeout)
        owns_groups = True
    elif world_size == 1 and "TORCHELASTIC_RUN_ID" in os.environ:    # torchrun with one process: no group
        job_store = next(dist.rendezvous("env://", 0, 1, timeout=timeout))[0]
    host_group = None
    if world_size > 1 and device.type == "cuda":
        host_group = dist.new_group(backend="gloo", timeout=timeout)
    return DistributedContext(rank, world_size, device, host_group, local_rank, job_store, owns_groups=owns_groups)


def lost_peer_reason(error):
    """What happened, in one line, when `error` comes from a collective or the store (a peer died,
    hung past run.dist_timeout_s, or never connected); None for any other error."""
    text = str(error)
    if not isinstance(error, dist.DistError) and not any(part in text for part in GLOO_PEER_ERRORS):
        return None
    detail = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    detail = detail.split("] ", 1)[1] if detail.startswith("[") and "] " in detail else detail  # "[file.cc:561] "
    detail = detail.split(". This is typically")[0]
    return f"another process of the job died or hung ({detail[:200]})"


def gloo_threads_left():
    """Names of gloo's threads still running in this process (empty after a complete teardown), after
    a garbage collection (a group in a reference cycle is freed by it)."""
    gc.collect()
    names = []
    for task in sorted(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else []:
        try:
            with open(f"/proc/self/task/{task}/comm") as handle:
                name = handle.read().strip()
        except OSError:         # the thread ended while we looked
            continue
        if name.startswith(GLOO_THREAD_NAMES):
            names.append(name)
    return names


class DistributedContext:
    """Rank, world size and device of this process, the collectives of the loop (no-ops alone) and
    the teardown. `job_store`: under torchrun, the launcher's key-value store (lives as long as the
    job). `owns_groups`: this context created the groups and `close` destroys them."""

    def __init__(self, rank, world_size, device, host_group=None, local_rank=0, job_store=None,
                 owns_groups=False):
        self.rank, self.world_size, self.device, self.local_rank = rank, world_size, device, local_rank
        self.is_main = rank == 0
        self.host_group = host_group    # a gloo group for small host-side collectives (None: the default)
        self.job_store = job_store
        self.owns_groups = owns_groups

    def any_rank(self, flag):
        """True on every rank when `flag` is true on any rank."""
        return self.min_max(int(bool(flag)))[1] == 1

    def min_max(self, value):
        """(smallest, largest) of an integer over the ranks, on every rank."""
        if self.world_size == 1:
            return value, value
        values = torch.tensor([-value, value], dtype=torch.int64)
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.host_group)
        return -int(values[0]), int(values[1])

    def largest(self, value):
        """The largest of a small integer over the ranks: one-element all_reduce on the host (gloo), no
        GPU sync (benchmarks/stop_flag_cost.py)."""
        if self.world_size == 1:
            return int(value)
        flag = torch.tensor([value], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.host_group)
        return int(flag[0])

    def gather_objects(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects, host side)."""
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.host_group)
        return gathered

    def gather(self, tensors, with_grad=True):
        """Concatenate each tensor over processes along dim 0 (rank order), keeping the gradient."""
        if self.world_size == 1:
            return tensors
        if with_grad:
            return [GatherWithGradient.apply(t) for t in tensors]
        return [all_gather_cat(t) for t in tensors]

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def store_mark(self, key):
        """Set `key` in the job's store (from rank 0; nothing without torchrun)."""
        if self.job_store is not None and self.is_main:
            self.job_store.set(key, "1")

    def store_has(self, key):
        return self.job_store is not None and self.job_store.check([key])

    def close(self):
        """Leave the job: destroy the groups this context created and drop the store, then collect
        garbage so that a group nothing uses any more is freed now (its destructor joins gloo's
        threads). Safe to call twice. The caller has dropped the DDP wrapper before."""
        if self.owns_groups and dist.is_initialized():
            dist.destroy_process_group()        # every group, newest first
        self.owns_groups, self.host_group, self.job_store = False, None, None
        gc.collect()


class GatherWithGradient(torch.autograd.Function):
    """all_gather whose backward hands each process the gradient of its own slice, summed over the
    processes (each computes the same global loss; DDP then averages, which undoes the sum)."""

    @staticmethod
    def forward(ctx, tensor):
        ctx.rows = tensor.shape[0]
        return all_gather_cat(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def all_gather_cat(tensor):
    """Concatenation over processes along dim 0, in rank order (equal sizes on every rank)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


# ----------------------------------------------------------------------------- joining, in detail

def join_process_group(backend, rank, world_size, timeout):
    """init_process_group through torchrun's store (MASTER_ADDR:MASTER_PORT), under a key prefix that
    is new at every start of the workers; returns that store.

    torchrun's agent keeps one store for the whole job, so the keys a process group writes while it
    connects (each rank's address) outlive the workers. Workers started again after a failure read
    the dead ones' addresses there and wait for them (static rendezvous) or are refused (c10d). Rank 0
    therefore draws a new attempt id for every start, and the other ranks take it only after rank 0
    has echoed a token each of them wrote under it: an id left in the store by an earlier start has
    no live rank 0 to answer."""
    store = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))[0]
    attempt = agree_on_attempt(store, rank, world_size, timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(f"maxmatch/attempt/{attempt}/", store), rank=rank,
                            world_size=world_size, timeout=timeout)
    return store


def agree_on_attempt(store, rank, world_size, timeout, poll_s=0.02):
    """The attempt id that rank 0 of THIS start of the workers drew (see join_process_group)."""
    current = "maxmatch/attempt"
    if rank == 0:
        attempt = uuid.uuid4().hex
        store.set(current, attempt)
        tokens = [f"maxmatch/attempt/{attempt}/token/{other}" for other in range(1, world_size)]
        store.wait(tokens, timeout)
        for other, key in enumerate(tokens, start=1):
            store.set(f"maxmatch/attempt/{attempt}/echo/{other}", store.get(key))
        return attempt
    token, attempt = uuid.uuid4().hex.encode(), None
    deadline = time.monotonic() + timeout.total_seconds()
    while time.monotonic() < deadline:
        latest = store.get(current).decode() if store.check([current]) else None
        if latest is not None and latest != attempt:    # a new id (or the first seen): hand in our token
            attempt = latest
            store.set(f"maxmatch/attempt/{attempt}/token/{rank}", token)
        echo = f"maxmatch/attempt/{attempt}/echo/{rank}"
        if attempt is not None and store.check([echo]) and store.get(echo) == token:
            return attempt
        time.sleep(poll_s)
    raise dist.DistStoreError(f"rank 0 did not answer within run.dist_timeout_s={timeout.total_seconds():g} s "
                              "while the processes connected")
