"""What changes when the fine-tune runs as several processes (``accelerate launch``, ``torchrun``).

The Trainer already does the heavy lifting: it wraps the model in DDP or FSDP, shards the data loader
(accelerate's ``BatchSamplerShard``: all ranks draw the same seeded permutation and rank r takes micro-
batches r, r + W, r + 2W, ...), averages the logged loss over ranks and writes per-rank RNG states into
checkpoints. This module holds the few things it leaves to us:

- one small collective per optimizer step, so the job's token count, its slowest rank's step time,
  every rank's peak memory and "someone asked to stop" are known on every rank;
- which parallelism really runs (accelerate silently ignores an FSDP config on CPU);
- the adapter's full state dict under FSDP, where each rank holds only a shard;
- resuming a multi-process CPU run on Transformers releases that load the optimizer state with
  ``map_location=args.device``, which is ``cpu:<rank>`` there (:func:`allow_indexed_cpu_locations`).
"""

from __future__ import annotations

import os


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if _initialized() else 1


def _collective_device():
    """NCCL moves only GPU tensors; gloo (CPU runs) only CPU tensors."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_floats(values: list[float]) -> list[list[float]]:
    """Every rank's ``values`` (same length on all ranks), in rank order, on every rank.

    Without a process group this is just ``[values]``, so single-process runs need no special case.
    float64 keeps token counts exact far beyond what one step can hold.
    """
    import torch
    import torch.distributed as dist

    if not _initialized() or dist.get_world_size() == 1:
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)  # all_gather of a list: the one form that gloo and NCCL both take
    return [t.tolist() for t in everyone]


def fsdp_requested() -> bool:
    """An accelerate config (or ``--use_fsdp``) asked for FSDP; the launcher says so in this variable."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def parallelism(trainer) -> dict:
    """What this run really is: ``{"mode": "single" | "ddp" | "fsdp", "world_size", "backend"}``.

    ``mode`` comes from the accelerator, not from the launcher's flags: accelerate 1.x switches to FSDP
    only for GPU-like devices, so an FSDP config on CPU gives plain DDP over gloo, and a record must
    not claim otherwise.
    """
    state = trainer.accelerator.state
    kind = str(state.distributed_type).rsplit(".", 1)[-1]
    mode = "fsdp" if kind == "FSDP" else ("ddp" if state.num_processes > 1 else "single")
    info = {"mode": mode, "world_size": state.num_processes, "distributed_type": kind}
    if state.num_processes > 1:
        info["backend"] = state.backend
    if mode == "fsdp":
        info["fsdp_version"] = getattr(state.fsdp_plugin, "fsdp_version", 1)
    return info


def fsdp_ignored_reason(trainer) -> str | None:
    """Why an FSDP request did not give FSDP (None when it did, or when nobody asked)."""
    if not fsdp_requested() or getattr(trainer, "is_fsdp_enabled", False):
        return None
    return (
        f"the accelerate config asks for FSDP, but accelerate turns it on only on GPUs "
        f"(here: {parallelism(trainer)['distributed_type']}); this run is plain DDP, every rank holds the whole model"
    )


def full_state_dict(trainer) -> dict | None:
    """The model's full state dict for saving the adapter: None outside FSDP (the model is whole on
    every rank, ``save_pretrained`` reads it directly); under FSDP every rank must call this, since the
    shards are gathered to rank 0 (which gets the dict; the others get an empty one)."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


def end_processes() -> None:
    """Take the process group down in an order that cannot hang or abort; call on every rank after the
    run's objects are out of reach (``finetune`` has returned). A no-op in one process.

    A gloo group's worker thread may still hold tensors of the last collectives, whose Python objects it
    must release under the GIL, and ``ProcessGroupGloo``'s destructor joins that thread:

    - left to interpreter shutdown, the thread cannot take the GIL any more and the rank dies with
      "terminate called without an active exception" (SIGABRT) after a finished run;
    - destroyed from the last C++ reference, DDP's ``Reducer`` (freed by the garbage collector, which
      holds the GIL), the join waits for a thread that waits for the GIL: a hang.

    So the Reducer and everything else of the run is collected first, while the group is still
    registered (that reference keeps it alive), the ranks meet, and the group is destroyed last through
    ``destroy_process_group``, whose binding releases the GIL while the group is torn down.
    """
    import gc

    import torch.distributed as dist

    if not _initialized():
        return
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


_INDEXED_CPU_REGISTERED = False


def allow_indexed_cpu_locations() -> None:
    """Let ``torch.load`` restore storages mapped to ``cpu:<n>``. Transformers 5.17 resumes a multi-process
    run with ``map_location=args.device``, and under accelerate's multi-CPU setup that device is
    ``cpu:<rank>``, a location torch has no handler for ("don't know how to restore data location ...
    (tagged with cpu:0)"); later releases map to the CPU themselves. A CPU storage is already where it
    belongs, so the handler returns it as it is. Idempotent; touches no other location."""
    global _INDEXED_CPU_REGISTERED
    if _INDEXED_CPU_REGISTERED:
        return
    import torch

    def restore(storage, location: str):
        return storage if location.startswith("cpu:") else None

    # a priority of its own: registry entries of equal priority are compared by their functions, which fails
    torch.serialization.register_package(97, lambda obj: None, restore)
    _INDEXED_CPU_REGISTERED = True

