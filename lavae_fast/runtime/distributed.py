"""Data-parallel training over several processes (DistributedDataParallel), launched by torchrun.

One machine, N processes (one per GPU, or CPU processes)::

    torchrun --standalone --nproc_per_node=N -m lavae_fast.train --out RUN [...]

Several machines (run the same line on every node; torchrun's c10d rendezvous finds the others)::

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29400 \\
        --rdzv_id=myrun -m lavae_fast.train --device cuda --out RUN [...]

What the training loop gets from :func:`setup` (a :class:`DistContext`):

* the process group, initialised from torchrun's environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): backend gloo for CPU tensors, NCCL for CUDA;
  with ``--device cuda`` every process uses ``cuda:LOCAL_RANK``. Without torchrun's variables (or
  with ``WORLD_SIZE=1``) nothing is initialised and the same code runs as a single process;
* the batch split: ``--batch-size`` is the *global* batch; each step's B data indices are drawn as
  in a single-process run (:func:`lavae_fast.noise.data_indices`) and process r takes the r-th of
  ``WORLD_SIZE`` equal slices (B must be divisible, or the run is refused). This is a distributed
  sampler that needs no epoch bookkeeping: the order is a pure function of (seed, step);
* the noise of every image is keyed by its *global* sample index ``step·B + j``
  (:mod:`lavae_fast.noise`), and every schedule by the global step, so neither depends on the number
  of processes;
* :meth:`DistContext.wrap`: the model and the warm-up VAE in ``DistributedDataParallel``, which
  averages the gradients over the processes (``find_unused_parameters=True``: a process whose
  share of the batch holds no object does not run the sprite decoder, and after the warm-up nobody
  runs the aux VAE);
* rank 0 alone writes the log, TensorBoard, the evaluation and the checkpoints; the logged
  training metrics are averaged over all processes (:meth:`DistContext.reduce_meter`);
* ``--resume``: rank 0 reads the checkpoint and sends it to the others (no shared file system
  needed); at every checkpoint the processes check that their parameters are still identical;
* the run directory: rank 0 checks it and holds its lock (``DIR/.lock``) for the whole run, and
  tells the others whether to go on;
* SIGINT / SIGTERM: after every step the processes agree (:meth:`DistContext.agree_on_stop`, an
  all-reduce of the signal number) whether any of them was asked to stop, so all stop after the
  same step, and rank 0 writes its checkpoint.

What a distributed step computes is exactly what one process computes when it evaluates each
rank's share of the batch separately and averages the gradients (tests/test_distributed.py checks
this). It is not bit-for-bit the single-process run with the whole batch, because batch
statistics are per process: batch norm (unless ``--sync-bn``) and the warm-up target's automatic
scale (:func:`lavae_fast.aux_vae.auto_target_scale`, a median over the process's images).

``--sync-bn`` (GPU runs only): the batch norms of the inference nets (and of the baseline and the
aux VAE) become ``SyncBatchNorm``, normalising over the global batch. SyncBatchNorm does not run on
CPU tensors, so the option is refused with ``--device cpu``. The sprite decoder keeps per-process
batch norm: its batch is the present objects of the process's images, which may be none at all,
and a process that skips a SyncBatchNorm would leave the others waiting for it forever.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["DistContext", "DistributedSetupError", "setup", "env_world", "convert_sync_batchnorm"]

# The sprite decoder's batch is the process's present objects (possibly none): never synchronised.
SYNC_BN_EXCLUDE = ("sprite_decoder",)


class DistributedSetupError(ValueError):
    """Bad combination of command-line options and launch environment (names the culprit)."""


@dataclass
class DistContext:
    """Where this process sits in the job. ``world_size == 1``: a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- the batch ----------------------------------------------------------------------------

    def shard(self, batch_size: int) -> Tuple[int, int]:
        """[lo, hi): this process's slice of a global batch of ``batch_size`` images."""
        if batch_size % self.world_size:
            raise DistributedSetupError(
                f"--batch-size {batch_size} must be divisible by the number of processes "
                f"(WORLD_SIZE={self.world_size}): each process takes an equal share of the global batch")
        b = batch_size // self.world_size
        return self.rank * b, (self.rank + 1) * b

    # -- modules ------------------------------------------------------------------------------

    def wrap(self, module: Optional[nn.Module]):
        """``module`` in DistributedDataParallel (itself when not distributed or None)."""
        if module is None or not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids, find_unused_parameters=True)

    def assert_in_sync(self, **modules: Optional[nn.Module]) -> None:
        """Raise RuntimeError unless every process holds the same parameters (a digest of each
        module's parameters is compared; collective: every process must call it)."""
        if not self.enabled:
            return
        from .checkpoint import state_digest

        mine = {k: state_digest(dict(m.named_parameters())) for k, m in modules.items() if m is not None}
        everyone = [None] * self.world_size
        torch.distributed.all_gather_object(everyone, mine)
        bad = [k for k in sorted({k for d in everyone for k in d}) if len({d.get(k) for d in everyone}) > 1]
        if bad:
            raise RuntimeError(f"distributed replicas diverged: parameters of {', '.join(bad)} differ between "
                               f"processes (rank {self.rank} of {self.world_size})")

    # -- communication ------------------------------------------------------------------------

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process (picklable objects, tensors included)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def reduce_meter(self, sums: Dict[str, float], counts: Dict[str, int]) -> Dict[str, float]:
        """Means over every process of running sums (a key missing on a process counts 0 there)."""
        if self.enabled:
            everyone = [None] * self.world_size
            torch.distributed.all_gather_object(everyone, (sums, counts))
            sums, counts = {}, {}
            for s, c in everyone:
                for k, v in s.items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + c[k]
        return {k: sums[k] / counts[k] for k in sums if counts[k]}

    def agree_on_stop(self, signum: int) -> int:
        """The largest stop request (a signal number, 0 for none) over every process (collective:
        every process calls it once per step, so all stop after the same step). Costs one
        all-reduce of a single integer per step in a distributed run, nothing otherwise."""
        if not self.enabled:
            return int(signum)
        t = torch.tensor([int(signum)], dtype=torch.int64,
                         device=self.device if self.backend == "nccl" else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        """End of a completed run: every process waits for the others, then tears down."""
        if self.enabled and torch.distributed.is_initialized():
            # Rank 0 writes the last checkpoint while the others reach this point first. Once (a CI
            # run with the cores shared by a training job) rank 0 aborted in teardown ("terminate
            # called without an active exception") after its peer had destroyed its group and
            # exited; the barrier makes every rank finish its work before any of them tears down.
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def env_world() -> Tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables; (0, 1, 0) without them."""
    def read(name, default):
        v = os.environ.get(name)
        if v is None or v == "":
            return default
        try:
            return int(v)
        except ValueError:
            raise DistributedSetupError(f"environment variable {name}={v!r} must be an integer") from None

    world = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    local = read("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedSetupError(f"inconsistent launch environment: RANK={rank}, WORLD_SIZE={world}, "
                                    f"LOCAL_RANK={local}")
    return rank, world, local


def _resolve_device(device_arg: str, world: int, local_rank: int) -> torch.device:
    try:
        device = torch.device(device_arg)
    except (RuntimeError, ValueError) as exc:
        raise DistributedSetupError(f"--device {device_arg!r} is not a device ({exc})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedSetupError(f"--device {device_arg}: no CUDA device is available")
        if world > 1:
            if device.index is not None:
                raise DistributedSetupError(
                    f"--device {device_arg} names one GPU, but under torchrun every process uses cuda:LOCAL_RANK; "
                    "pass --device cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)")
            if local_rank >= torch.cuda.device_count():
                raise DistributedSetupError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA "
                                            "device(s) are visible: start at most one process per GPU")
            device = torch.device("cuda", local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise DistributedSetupError(f"--device {device_arg}: only cpu and cuda are supported")
    return device


def setup(device_arg: str = "cpu", batch_size: int = 1, sync_bn: bool = False, backend: str = "auto",
          timeout_s: float = 1800.0) -> DistContext:
    """Check the options against the launch environment and join the process group.

    Raises :class:`DistributedSetupError` (naming the option) for a batch not divisible by the
    number of processes, ``--sync-bn`` on the CPU, a backend that cannot serve the device, or a
    broken torchrun environment.
    """
    rank, world, local = env_world()
    device = _resolve_device(device_arg, world, local)
    if sync_bn and device.type != "cuda":
        raise DistributedSetupError(
            "--sync-bn needs --device cuda: SyncBatchNorm does not run on CPU tensors. Without it each "
            "process normalises over its own share of the batch (the same as a single-process run with "
            "that batch), which is what CPU runs do")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend not in ("gloo", "nccl"):
        raise DistributedSetupError(f"--dist-backend must be auto, gloo or nccl, got {backend!r}")
    if backend == "nccl" and device.type != "cuda":
        raise DistributedSetupError("--dist-backend nccl needs --device cuda (NCCL moves CUDA tensors only); "
                                    "use gloo on the CPU")
    ctx = DistContext(rank=rank, world_size=world, local_rank=local, backend=backend if world > 1 else None,
                      device=device)
    ctx.shard(batch_size)  # refuse an indivisible batch before anything starts
    if world > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise DistributedSetupError(f"WORLD_SIZE={world} but {name} is not set: launch with torchrun")
        if not torch.distributed.is_available():
            raise DistributedSetupError("this torch build has no torch.distributed")
        if not torch.distributed.is_initialized():
            kw = {"device_id": device} if device.type == "cuda" else {}
            torch.distributed.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                                 timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return ctx


def convert_sync_batchnorm(module: nn.Module, exclude=SYNC_BN_EXCLUDE) -> nn.Module:
    """``module`` with its BatchNorm layers turned into SyncBatchNorm, except inside the children
    named in ``exclude`` (the parameters are the same objects, the state-dict keys unchanged)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in list(module.named_children()):
        if name not in exclude:
            setattr(module, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return module
