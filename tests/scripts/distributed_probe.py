"""Started by tests/scripts/test_distributed.py under a launcher (2 CPU processes, gloo); not a test itself.

``distributed_probe.py shards OUT_DIR``: every rank writes OUT_DIR/rank{R}.json, the dataset rows its
training data loader yields in epochs 0 and 1, with the loader built by the library code that
finetune_lora.py runs.

``distributed_probe.py fsdp YAML``: wrap the LoRA model with torch's FSDP using YAML's settings
(accelerate turns FSDP on only on GPUs), run one step and gather the full state dict; rank 0 prints
one JSON line.
"""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shards(out_dir: Path) -> None:
    import torch

    from hf_flash.training.loop import FinetuneConfig, _build_trainer, _training_arguments
    from hf_flash.training.models import resolve_model

    cfg = FinetuneConfig(attn="sdpa", seq_len=64, batch_size=2, max_docs=60, device="cpu", output_dir=str(out_dir))
    args = _training_arguments(cfg, out_dir, "cpu", torch.float32)
    trainer = _build_trainer(cfg, args, resolve_model(), torch.float32, say=lambda *parts: None)[0]
    index = {tuple(row["input_ids"]): i for i, row in enumerate(trainer.train_dataset.rows)}
    loader = trainer.get_train_dataloader()
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)  # what the Trainer does at the start of each epoch: a new shuffle
        epochs.append([index[tuple(row)] for batch in loader for row in batch["input_ids"].tolist()])
    record = {"rank": args.process_index, "world_size": args.world_size, "rows": len(index),
              "dataset_rows": len(trainer.train_dataset), "epochs": epochs}  # fmt: skip
    (out_dir / f"rank{args.process_index}.json").write_text(json.dumps(record))


def fsdp(config_path: Path) -> None:
    import torch
    import torch.distributed as dist
    import yaml
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullStateDictConfig, MixedPrecision, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from hf_flash.training.models import add_lora, build_model, resolve_model

    config = yaml.safe_load(config_path.read_text())
    fsdp_config = config["fsdp_config"]
    dist.init_process_group("gloo")
    # peft's wrapping rule reads the layer class from the same variable accelerate's launcher sets
    os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[config["mixed_precision"]]
    base = build_model(resolve_model(), "sdpa", dtype, "cpu", seed=0)
    model = add_lora(base, r=4, alpha=8.0, dropout=0.0, target_modules="all-linear")
    expected = sorted(k for k in model.state_dict() if "lora_" in k)  # before wrapping: then it is a collective
    wrapped = FSDP(
        model,
        auto_wrap_policy=fsdp_auto_wrap_policy(model),  # what the Trainer installs for a peft model
        use_orig_params=fsdp_config["fsdp_use_orig_params"],
        mixed_precision=MixedPrecision(param_dtype=dtype, reduce_dtype=dtype, buffer_dtype=dtype),
        device_id=torch.device("cpu"),
    )
    ids = torch.randint(0, base.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(dist.get_rank()))
    with torch.autocast("cpu", dtype):  # accelerate's mixed precision runs the forward under autocast
        loss = wrapped(input_ids=ids, labels=ids).loss
    loss.backward()
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    with_grad = [n for n, p in wrapped.named_parameters() if p.requires_grad and p.grad is not None]
    # offload_to_cpu=False: with CPU tensors torch 2.13's offloading crashes; on a GPU accelerate offloads
    config_full = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, config_full):
        state = wrapped.state_dict()
    units = sum(1 for m in wrapped.modules() if isinstance(m, FSDP))
    if dist.get_rank() == 0:
        lora = sorted(k for k in state if "lora_" in k)
        print(json.dumps({"loss": loss.item(), "fsdp_units": units, "trainable": len(trainable),
                          "with_grad": len(with_grad), "lora_keys_match": lora == expected,
                          "lora_keys": len(lora)}), flush=True)  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, path = sys.argv[1], Path(sys.argv[2])
    {"shards": shards, "fsdp": fsdp}[mode](path)
