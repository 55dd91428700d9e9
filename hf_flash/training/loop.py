"""LoRA fine-tuning on the Transformers Trainer, with per-step measurements, Ctrl-C checkpoints and
resume. ``scripts/finetune_lora.py`` parses arguments into :class:`FinetuneConfig` and calls
:func:`finetune`; ``scripts/compare_backends.py`` runs that script once per backend.

The same code runs as N processes under ``accelerate launch`` or ``torchrun`` (DDP or FSDP, see
examples/accelerate/): ``--batch-size`` is per process, the numbers below are the whole job's, and
rank 0 alone prints and writes the logs and the adapter (a checkpoint holds every rank's RNG state,
and under FSDP every rank's shard). distributed.py has the few multi-process pieces.

Files written to ``output_dir``:
- ``steps.jsonl``: one JSON object per optimizer step (loss averaged over ranks; tokens of all ranks;
  step time of the slowest rank; tokens/s; peak memory: the largest of any rank, and per rank);
- ``checkpoint-N/``: the Trainer's checkpoints (adapter, optimizer, scheduler, RNG, data position);
- ``adapter/``: the final LoRA adapter (``adapter_config.json`` + weights), the tokenizer and
  ``run_config.json`` (enough to rebuild a random-init base, see :func:`load_finetuned`);
- ``summary.json``: status (ok / interrupted / oom), medians, the parallelism (single / ddp / fsdp,
  number of processes) and the environment.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from . import require
from .data import IGNORE_INDEX, LAYOUTS, build_train_dataset, parse_lengths
from .distributed import allow_indexed_cpu_locations, fsdp_ignored_reason, full_state_dict, gather_floats, parallelism
from .loss import DEFAULT_LOSS, LOSSES, LossPlan, LossTrainerMixin
from .models import (
    BACKENDS,
    UsageError,
    add_lora,
    attn_note,
    backend_unavailable_reason,
    build_model,
    check_seq_len,
    extend_positions,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
)  # fmt: skip
from .profile import parse_steps, profile_callback_class

require("peft", "accelerate")  # LoRA and the Trainer: say so when imported, not after the model has loaded

STEPS_FILE, SUMMARY_FILE, RUN_CONFIG_FILE = "steps.jsonl", "summary.json", "run_config.json"


@dataclass
class FinetuneConfig:
    model: str | None = None
    model_preset: str | None = None
    attn: str = "hf_flash"
    data: str | None = None
    text_field: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    max_docs: int | None = None
    seq_len: int = 512
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_steps: int = 0
    max_steps: int | None = None
    epochs: float = 1.0
    packing: bool = False  # the older spelling of layout="packed"
    layout: str = "blocks"  # blocks | padded | packed (data.py)
    max_doc_len: int | None = None  # padded/packed: documents cut at this many tokens (default seq_len)
    lengths: str | None = None  # lognormal:MEDIAN:SIGMA:N random-token documents instead of --data
    gradient_checkpointing: bool = False
    loss: str = DEFAULT_LOSS  # auto | chunked | liger | plain, see loss.py
    loss_chunk_tokens: int | None = None  # None: loss.default_chunk_tokens(vocab)
    offload_activations: bool = False
    max_position_embeddings: int | None = None  # random-init models only: train past the config's limit
    gpu_memory_gib: float | None = None  # cap PyTorch's share of the GPU (a smaller card on a larger one)
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: str = "all-linear"
    output_dir: str = "outputs/finetune"
    save_steps: int = 100
    save_total_limit: int = 2
    resume: bool = False
    save_adapter: bool = True
    warmup_measure_steps: int = 1  # steps left out of the medians (compilation, autotuning, caches)
    profile_steps: str | None = None  # "A:B": torch.profiler over optimizer steps A..B -> profile.md (profile.py)
    stop_after: int | None = None  # behave as if Ctrl-C came after this many steps (tests, demos)


def validate(cfg: FinetuneConfig) -> None:
    if cfg.attn not in BACKENDS:
        raise UsageError(f"unknown --attn {cfg.attn!r}; choose one of {', '.join(BACKENDS)}")
    for name in ("seq_len", "batch_size", "grad_accum", "lora_r"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.loss not in LOSSES:
        raise UsageError(f"unknown --loss {cfg.loss!r}; choose one of {', '.join(LOSSES)}")
    for name in ("max_steps", "loss_chunk_tokens", "max_position_embeddings"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"unknown --device {cfg.device!r}; choose auto, cpu or cuda")
    if cfg.packing:
        if cfg.layout not in ("blocks", "packed"):
            raise UsageError(f"--packing asks for the packed layout; it contradicts --layout {cfg.layout}")
        cfg.layout = "packed"
    if cfg.layout not in LAYOUTS:
        raise UsageError(f"unknown --layout {cfg.layout!r}; choose one of {', '.join(LAYOUTS)}")
    if cfg.max_doc_len is not None and cfg.max_doc_len < 2:
        raise UsageError(f"--max-doc-len must be at least 2 (got {cfg.max_doc_len})")
    if cfg.lengths is not None:
        parse_lengths(cfg.lengths)
    if cfg.profile_steps is not None:
        try:
            parse_steps(cfg.profile_steps)
        except ValueError as exc:
            raise UsageError(str(exc)) from None


def pick_device(name: str) -> str:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to PyTorch")
    return name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def cap_gpu_memory(device: str, gib: float) -> None:
    """PyTorch's allocator may hold at most ``gib`` GiB of the GPU: out of memory comes where it would on a
    card of that size (the CUDA context, outside the allocator, is not counted on either)."""
    import torch

    if device != "cuda":
        raise UsageError("--gpu-memory-gib needs a CUDA GPU")
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if not 0 < gib * 2**30 <= total:
        raise UsageError(f"--gpu-memory-gib {gib:g}: this GPU has {total / 2**30:.1f} GiB; pass a positive number up to that")
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total)


def _allocator_counts() -> dict:
    """cudaMalloc calls and out-of-memory retries (free the cache, try again) of the caching allocator so far."""
    import torch

    stats = torch.cuda.memory_stats()
    return {"device_allocs": stats.get("num_device_alloc", 0), "alloc_retries": stats.get("num_alloc_retries", 0)}


class StepMeter:
    """Times each optimizer step, counts its tokens and reads its peak GPU memory, for the whole job.

    The meter lives beside the Trainer: the callback opens/closes steps, ``MeteredTrainer`` counts
    tokens and turns the numbers into the step's log record. With several processes, closing a step
    gathers every rank's count and peak (ranks may hold different numbers of tokens: packed bins
    vary), so the record is the job's, not rank 0's times the world size.
    """

    def __init__(self, device: str):
        import torch

        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        self.tokens = 0  # real tokens (pads excluded), an int or a tensor on the device until end()
        self.targets = 0  # tokens the loss predicts (labels != -100 after the shift)
        self.start = 0.0
        self.last: dict = {}
        self.allocs: dict = {}

    def _sync(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def begin(self):
        import torch

        self._sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.allocs = _allocator_counts()
        self.tokens = self.targets = 0
        self.start = time.perf_counter()

    def count(self, inputs: dict) -> None:
        """Add a micro-batch's real tokens and loss targets; summed on its device, read once in end()."""
        mask = inputs.get("attention_mask")
        self.tokens = self.tokens + (mask.sum() if mask is not None else inputs["input_ids"].numel())
        labels = inputs.get("labels")
        if labels is not None:
            self.targets = self.targets + labels[..., 1:].ne(IGNORE_INDEX).sum()

    def end(self, stop: bool = False) -> bool:
        """Close the step on every rank; True when any rank asked to stop (Ctrl-C, --stop-after)."""
        import torch

        self._sync()
        peak = torch.cuda.max_memory_allocated() if self.cuda else 0.0
        ranks = gather_floats([float(self.tokens), float(self.targets), peak, float(stop)])
        # The clock is read after the gather, which returns once the slowest rank has finished its
        # step: the job's step time. The gather also lines the ranks up for the next step's start.
        seconds = time.perf_counter() - self.start
        tokens = int(sum(r[0] for r in ranks))
        peaks = [r[2] / 2**30 for r in ranks] if self.cuda else None
        self.last = {"tokens": tokens, "targets": int(sum(r[1] for r in ranks)), "step_time_s": seconds,
                     "tokens_per_s": tokens / seconds, "peak_mem_gib": max(peaks) if peaks else None}  # fmt: skip
        if peaks and len(peaks) > 1:
            self.last["peak_mem_gib_per_rank"] = peaks
        if self.cuda:  # this rank's: new device memory and allocator retries are where a first pass can stall
            self.last.update({k: v - self.allocs[k] for k, v in _allocator_counts().items()})
        return any(r[3] for r in ranks)


class RunFinished(Exception):
    """Training resumed from the checkpoint of the run's last step: nothing is left to train."""


def _callback_class():
    from transformers import TrainerCallback

    class MeterCallback(TrainerCallback):
        """Opens/closes the meter around each optimizer step and turns an interrupt into save-and-stop."""

        def __init__(self, meter: StepMeter, stop_after: int | None):
            self.meter = meter
            self.stop_after = stop_after
            self.interrupted = False

        def on_train_begin(self, args, state, control, **kwargs):
            # Resumed from the last step's checkpoint (a run killed before its end): the Trainer's loop checks
            # for the end only after a step, so it would train one past max_steps. The weights are loaded by now.
            if state.global_step >= state.max_steps > 0:
                raise RunFinished

        def on_step_begin(self, args, state, control, **kwargs):
            self.meter.begin()

        def on_step_end(self, args, state, control, **kwargs):
            if self.stop_after is not None and state.global_step >= self.stop_after:
                self.interrupted = True
            # Ctrl-C may reach the ranks during different steps; all must stop after the same one, or
            # the checkpoint's collectives would wait forever for the ranks still training.
            if self.meter.end(stop=self.interrupted):
                self.interrupted = True
            if self.interrupted:  # the Trainer saves a checkpoint right after this hook, then stops
                control.should_save = True
                control.should_training_stop = True
            return control

    return MeterCallback


def _trainer_class():
    from transformers import Trainer

    class MeteredTrainer(LossTrainerMixin, Trainer):
        """Counts the tokens of each micro-batch and writes one JSON line per optimizer step; the loss is
        computed as ``loss_plan`` says (loss.py)."""

        meter: StepMeter
        steps_path: Path

        def training_step(self, model, inputs, *args, **kwargs):
            self.meter.count(inputs)
            return super().training_step(model, inputs, *args, **kwargs)

        def log(self, logs, *args, **kwargs):
            if "loss" in logs and self.meter.last:
                record = {"step": self.state.global_step, "epoch": self.state.epoch, "loss": logs["loss"],
                          **self.meter.last}  # fmt: skip
                for key in ("grad_norm", "learning_rate"):
                    if key in logs:
                        record[key] = logs[key]
                if self.is_world_process_zero():
                    with open(self.steps_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                logs["tokens_per_s"] = round(record["tokens_per_s"], 1)
                if record["peak_mem_gib"] is not None:
                    logs["peak_mem_gib"] = round(record["peak_mem_gib"], 2)
                self.meter.last = {}
            super().log(logs, *args, **kwargs)

    return MeteredTrainer


def read_steps(output_dir) -> list[dict]:
    path = Path(output_dir) / STEPS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _latest_checkpoint(output_dir: Path) -> tuple[str | None, int]:
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    return last, (int(Path(last).name.split("-")[-1]) if last else 0)


def _pass_of(step: dict) -> int:
    """1 for the steps of the first pass over the data, 2 for the second, ... (the Trainer's epoch
    reaches exactly 1.0 at the first pass's last step)."""
    return max(1, math.ceil(round(step.get("epoch") or 0.0, 6)))


def summarize(steps: list[dict], warmup: int) -> dict:
    """Medians over the measured steps (all of them when there are too few to leave any out), and over
    whole passes: ``real_tokens_per_s`` of the steady state (the passes after the first, or the measured
    steps when there is one pass), ``first_pass_s`` (compiles and caches included) and ``loss_per_token``,
    the target-weighted mean loss of the first pass (the weights before any update when --lr is 0)."""
    measured = steps[warmup:] if len(steps) > warmup else steps
    peaks = [s["peak_mem_gib"] for s in steps if s.get("peak_mem_gib") is not None]
    per_rank = [s["peak_mem_gib_per_rank"] for s in steps if s.get("peak_mem_gib_per_rank")]
    first = [s for s in steps if _pass_of(s) == 1]
    steady = [s for s in steps if _pass_of(s) > 1] or measured
    targets = sum(s.get("targets", 0) for s in first)
    return {
        "steps": len(steps),
        "median_tokens_per_s": statistics.median(s["tokens_per_s"] for s in measured) if measured else None,
        "median_step_time_s": statistics.median(s["step_time_s"] for s in measured) if measured else None,
        "real_tokens_per_s": sum(s["tokens"] for s in steady) / sum(s["step_time_s"] for s in steady) if steady else None,
        "first_pass_s": sum(s["step_time_s"] for s in first) if len(first) < len(steps) else None,
        "loss_per_token": sum(s["loss"] * s.get("targets", 0) for s in first) / targets if targets else None,
        "peak_mem_gib": max(peaks) if peaks else None,
        "peak_mem_gib_per_rank": [max(column) for column in zip(*per_rank)] if per_rank else None,
        "final_loss": steps[-1]["loss"] if steps else None,
        "losses": [s["loss"] for s in steps],
    }


def _environment(device: str) -> dict:
    import torch
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": device}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def _training_arguments(cfg: FinetuneConfig, out: Path, device: str, dtype):
    """The Trainer's settings. Creating them also joins the process group when a launcher started us."""
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out),
        max_steps=cfg.max_steps if cfg.max_steps else -1,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        logging_steps=1,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=max(cfg.save_steps, 1),
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device == "cpu",  # also what makes accelerate pick gloo (MULTI_CPU) under a launcher
        remove_unused_columns=False,  # our collators already emit exactly what the model takes
        dataloader_num_workers=0,
        # An incomplete last batch would be topped up with examples from the epoch's start when the
        # batches are spread over several ranks; dropping it means no example is seen twice per epoch,
        # and every step holds the same number of rows whatever the number of processes. One process
        # keeps it: a pass over variable-length data then holds every document, in every layout.
        dataloader_drop_last=int(os.environ.get("WORLD_SIZE", "1")) > 1,
        # LoRA uses every trainable parameter in every step; looking for unused ones costs DDP a
        # walk over the autograd graph per step.
        ddp_find_unused_parameters=False,
        report_to="none",
        optim="adamw_torch",
    )


def _check_enough_rows(cfg: FinetuneConfig, rows: int, world: int) -> None:
    need = cfg.batch_size * world
    if rows < need:
        layout = f"--batch-size {cfg.batch_size}" + (f" x {world} processes" if world > 1 else "")
        raise UsageError(
            f"{layout} needs {need} rows per micro-step, but the data makes only {rows} "
            f"{_rows_word(cfg)} of <= {cfg.seq_len} tokens; "
            "use a smaller --batch-size or --seq-len, or more data"
        )


def _rows_word(cfg: FinetuneConfig) -> str:
    return {"blocks": "rows", "padded": "padded rows", "packed": "packed bins"}[cfg.layout]


def _build_trainer(cfg: FinetuneConfig, args, spec, dtype, say):
    """Data, model with LoRA, and the Trainer with its meter and stop callback."""
    tokenizer = load_tokenizer(spec)
    dataset, collator, n_tokens = build_train_dataset(
        tokenizer, cfg.data, cfg.seq_len, text_field=cfg.text_field, prompt_field=cfg.prompt_field,
        response_field=cfg.response_field, max_docs=cfg.max_docs, layout=cfg.layout, max_doc_len=cfg.max_doc_len,
        lengths=cfg.lengths, vocab_size=spec.config.vocab_size, seed=cfg.seed,
    )  # fmt: skip
    _check_enough_rows(cfg, len(dataset), args.world_size)
    # Built straight on this rank's device (cuda:LOCAL_RANK): on "cuda", every rank would first put a
    # whole copy of the model on GPU 0.
    base = build_model(spec, cfg.attn, dtype, str(args.device), cfg.seed)
    if cfg.gradient_checkpointing:
        # Enabled on the model, not through TrainingArguments, whose flag is renamed in Transformers 5.
        # Non-reentrant checkpointing needs no input gradients, which a frozen LoRA base does not have.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = add_lora(base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules)
    trainable, total = (sum(p.numel() for p in model.parameters() if p.requires_grad),
                        sum(p.numel() for p in model.parameters()))  # fmt: skip

    meter = StepMeter(str(args.device))
    callback = _callback_class()(meter, cfg.stop_after)
    callbacks = [callback]
    if cfg.profile_steps is not None:  # after the meter's callback: its syncs bound the profiled steps
        steps, is_main = parse_steps(cfg.profile_steps), args.process_index == 0
        callbacks.append(profile_callback_class()(steps, Path(cfg.output_dir), str(args.device), is_main))
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=callbacks
    )
    trainer.meter = meter
    trainer.loss_plan = LossPlan.for_model(model, cfg.loss, cfg.loss_chunk_tokens, cfg.offload_activations)
    layout = parallelism(trainer)
    world = layout["world_size"]
    batch = cfg.batch_size * cfg.grad_accum * world
    say(f"model {spec.name} ({total / 1e6:.1f}M params, {trainable / 1e6:.2f}M trainable LoRA), "
        f"attn={cfg.attn}{attn_note(cfg.attn, args.device.type, dtype)}, "
        f"dtype={str(dtype).removeprefix('torch.')}, device={args.device.type}; data: {len(dataset)} "
        f"{_rows_word(cfg)} of <= {cfg.seq_len} tokens from {n_tokens} tokens; "
        f"loss: {trainer.loss_plan.describe()}")  # fmt: skip
    if world > 1:
        say(f"{world} processes, {layout['mode']} over {layout['backend']}: {batch} rows per optimizer step "
            f"({cfg.batch_size} per process x {cfg.grad_accum} accumulation x {world})")  # fmt: skip
    ignored = fsdp_ignored_reason(trainer)
    if ignored:
        say(f"warning: {ignored}")
    return trainer, tokenizer, callback, layout


def _write_json(path: Path, data: dict) -> None:
    # Written to a side file, then renamed: two ranks that both hit OOM may write at once.
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def finetune(cfg: FinetuneConfig) -> dict:
    """Run the fine-tune described by ``cfg``; returns the summary also written to summary.json.

    Under ``accelerate launch`` / ``torchrun`` every rank runs this; rank 0 alone prints, logs steps
    and writes files, and the other ranks return ``{"status": ..., "main_process": False}``.
    Raises UsageError (one line, says what to fix) for bad input before anything slow starts.
    """
    import torch

    validate(cfg)
    device = pick_device(cfg.device)
    if cfg.gpu_memory_gib is not None:
        cap_gpu_memory(device, cfg.gpu_memory_gib)
    spec = extend_positions(resolve_model(cfg.model, cfg.model_preset), cfg.max_position_embeddings)
    check_seq_len(spec, cfg.seq_len)
    reason = backend_unavailable_reason(cfg.attn, device)
    if reason:
        raise UsageError(f"--attn {cfg.attn} cannot run here: {reason}")
    dtype = resolve_dtype(cfg.dtype, device, cfg.attn)
    out = Path(cfg.output_dir)
    args = _training_arguments(cfg, out, device, dtype)
    main = args.process_index == 0

    def say(*parts):
        if main:
            print(*parts, flush=True)

    checkpoint, done_steps = _latest_checkpoint(out) if cfg.resume else (None, 0)
    if checkpoint is not None and args.world_size > 1 and args.device.type == "cpu":
        allow_indexed_cpu_locations()  # the optimizer state of a multi-CPU run may be mapped to "cpu:<rank>"
    if cfg.resume and checkpoint is None:
        say(f"--resume: no checkpoint in {out}; starting from step 0")
    elif checkpoint is not None:
        say(f"resuming from {Path(checkpoint).name} in {out}")
    trainer, tokenizer, callback, layout = _build_trainer(cfg, args, spec, dtype, say)

    out.mkdir(parents=True, exist_ok=True)
    steps_path = out / STEPS_FILE
    if main:  # Keep the log in step with the checkpoint: steps after it will be run (and logged) again.
        kept = [s for s in read_steps(out) if s["step"] <= done_steps] if checkpoint else []
        steps_path.write_text("".join(json.dumps(s) + "\n" for s in kept))
    trainer.steps_path = steps_path

    def on_sigint(signum, frame):
        if callback.interrupted:  # a second Ctrl-C means: stop now, without a checkpoint
            raise KeyboardInterrupt
        callback.interrupted = True
        say("\nCtrl-C: saving a checkpoint at the end of this step (press again to quit at once)")

    status = "ok"
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except RunFinished:  # what is left is the run's end: the adapter and the summary, from the checkpoint
        say(f"{Path(checkpoint).name} is the run's last step: nothing left to train")
    except getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError) as exc:
        status, error = "oom", " ".join(str(exc).split())[:300]
    finally:
        signal.signal(signal.SIGINT, previous)
    if status == "ok" and callback.interrupted:
        status = "interrupted"

    if status == "ok" and cfg.save_adapter:
        save_adapter(trainer, tokenizer, cfg, out / "adapter")  # every rank: FSDP gathers the shards
    # A rank that ran out of memory writes the summary itself: the launcher stops the others at once.
    if not main and status != "oom":
        return {"status": status, "main_process": False}
    summary = {"status": status, "attn": cfg.attn, "seq_len": cfg.seq_len, "model": spec.name,
               "dtype": str(dtype).removeprefix("torch."), "parallelism": layout, "loss": trainer.loss_plan.impl,
               "offload_activations": cfg.offload_activations, "gpu_memory_gib": cfg.gpu_memory_gib,
               **summarize(read_steps(out), cfg.warmup_measure_steps), "environment": _environment(device)}  # fmt: skip
    if status == "oom":
        summary["error"] = error
    _write_json(out / SUMMARY_FILE, summary)
    return {**summary, "main_process": main}


def save_adapter(trainer, tokenizer, cfg: FinetuneConfig, path: Path) -> None:
    """The LoRA weights, tokenizer and run config; call on every rank, rank 0 writes."""
    state = full_state_dict(trainer)  # None unless FSDP: then the gathered (full) weights, on rank 0
    if not trainer.is_world_process_zero():
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.save_pretrained(str(path), **({"state_dict": state} if state is not None else {}))
    tokenizer.save_pretrained(str(path))
    (path / RUN_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


def load_finetuned(adapter_dir, attn: str = "sdpa", device: str = "cpu", dtype=None):
    """Rebuild the base model of a run (same config/checkpoint and seed) and load its saved adapter."""
    from peft import PeftModel

    cfg = FinetuneConfig(**json.loads((Path(adapter_dir) / RUN_CONFIG_FILE).read_text()))
    spec = extend_positions(resolve_model(cfg.model, cfg.model_preset), cfg.max_position_embeddings)
    base = build_model(spec, attn, dtype or resolve_dtype(cfg.dtype, device), device, cfg.seed)
    return PeftModel.from_pretrained(base, str(adapter_dir))
