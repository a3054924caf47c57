"""The process group for multi-process training under ``torchrun``.

One process is the ordinary case (rank 0 of 1, nothing initialised). Under
``torchrun`` the environment names this process's rank; the backend is ``nccl``
on GPUs and ``gloo`` on CPUs, and each process takes the GPU ``LOCAL_RANK``.

Two timeouts bound every wait, so a stalled peer ends the job instead of hanging it:

* collectives of the training step (gradient all-reduce, token counts, the stop
  decision) give up after ``ENCDEC_DIST_TIMEOUT_MINUTES`` (default 10);
* waiting for rank 0 while it alone prepares the data, validates or writes a
  checkpoint (:meth:`Context.wait_for_main`) gives up after
  ``ENCDEC_DIST_WAIT_MINUTES`` (default 1440), since that work may take long.

A peer that dies is noticed at once (its sockets close) and ``torchrun`` stops
the other processes; :func:`explain_failures` turns the low-level error a rank
sees into one line saying what happened.
"""
from __future__ import annotations

import datetime
import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

TIMEOUT_ENV, WAIT_ENV = "ENCDEC_DIST_TIMEOUT_MINUTES", "ENCDEC_DIST_WAIT_MINUTES"


class DistributedError(RuntimeError):
    """This rank lost contact with the others: one failed, was killed or stalled past the timeout."""


@dataclass
class Context:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    wait_group: Any = None  # gloo group with the long timeout of wait_for_main
    timeout_minutes: float = 10.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def wait_for_main(self) -> None:
        """Barrier after work that only rank 0 does (data preparation, validation, checkpoints).

        It uses its own gloo group whose timeout is long: the other ranks may wait
        for rank 0 far longer than a training collective may take.
        """
        if self.distributed:
            dist.barrier(group=self.wait_group)

    def _tensor(self, value, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([value], dtype=dtype, device=self.device if self.device.type == "cuda" else "cpu")

    def sum(self, value: float) -> float:
        """Sum of ``value`` over all ranks."""
        if not self.distributed:
            return value
        t = self._tensor(value, torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def broadcast(self, value: int | float) -> int | float:
        """Rank 0's ``value`` on every rank (e.g. a stop decision, rank 0's clock); keeps int or float."""
        if not self.distributed:
            return value
        kind = float if isinstance(value, float) else int
        t = self._tensor(value, torch.float64 if kind is float else torch.long)
        dist.broadcast(t, src=0)
        return kind(t.item())

    def check_same(self, value: int, what: str) -> None:
        """Raise ``ValueError`` on every rank unless all ranks hold the same ``value``."""
        if not self.distributed:
            return
        main = self.broadcast(value)
        if self.sum(float(main != value)) > 0:
            mine = f", rank {self.rank} has {value}" if value != main else ""
            raise ValueError(f"ranks disagree on {what} (rank 0 has {main}{mine}); the run folder must be "
                             "one folder that every rank sees, e.g. on a shared filesystem")


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device: cuda requested but no GPU is visible; use device: cpu or auto")
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def _minutes(env: str, default: float) -> float:
    text = os.environ.get(env, "")
    try:
        minutes = float(text) if text else default
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise ValueError(f"{env}={text!r}: expected a positive number of minutes")
    return minutes


def setup(requested_device: str = "auto", timeout_minutes: float | None = None,
          wait_minutes: float | None = None) -> Context:
    """Join the process group if launched by torchrun; otherwise a single-process context.

    Timeouts default to the environment variables named in the module doc, then 10 and 1440 minutes.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    timeout = timeout_minutes or _minutes(TIMEOUT_ENV, 10.0)
    wait_group = None
    if world_size > 1:
        wait = wait_minutes or _minutes(WAIT_ENV, 24 * 60.0)
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout))
        wait_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=wait))
    return Context(rank, local_rank, world_size, device, wait_group, timeout)


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch's generators (dropout) from ``(seed, step, rank)``.

    Ranks draw different dropout masks, and a resumed run, on any rank, draws
    exactly the masks the uninterrupted run would have: no RNG state needs saving.
    """
    digest = hashlib.blake2b(f"encdec/{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    torch.manual_seed(int.from_bytes(digest, "little") >> 1)


_COMM_ERROR_HINTS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "broken pipe")


def _is_comm_error(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(h in str(error).lower() for h in _COMM_ERROR_HINTS)


@contextmanager
def explain_failures(ctx: Context) -> Iterator[None]:
    """Re-raise a failed collective as a one-line :class:`DistributedError` naming this rank and the likely cause."""
    try:
        yield
    except Exception as e:
        if not (ctx.distributed and _is_comm_error(e)) or isinstance(e, DistributedError):
            raise
        detail = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise DistributedError(
            f"rank {ctx.rank} of {ctx.world_size} lost contact with the other ranks: another rank failed, was "
            f"killed or stalled for more than {ctx.timeout_minutes:g} minutes (set {TIMEOUT_ENV} to change); "
            f"look for the first rank that failed (torchrun's 'Root Cause'). Gloo/NCCL said: {detail[:300]}"
        ) from None


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
