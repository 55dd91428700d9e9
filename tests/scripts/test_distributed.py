"""Two processes on the CPU (gloo) under `accelerate launch` with the shipped examples/accelerate/ddp.yaml:
the same losses as one process with the same global batch, resume, rows sharded without repeats,
rank 0 alone printing, whole-job token counts, and the FSDP settings checked against peft.

Each launch starts two Python processes that import torch and Transformers (~10 s on 2 cores), so the
CPU tests keep to four launches (about a minute in all); they carry no mark, so CI's `pytest tests`
runs them. The `gpu` test needs two GPUs and runs DDP and FSDP with the hf_flash kernels.
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, SCRIPTS

from hf_flash.training import distributed, loop
from hf_flash.training.loop import StepMeter, read_steps

CONFIGS = ROOT / "examples" / "accelerate"

# No LoRA dropout: one process draws one mask for 4 rows, two processes one each for 2 rows; with it
# the runs would differ by design. A large learning rate makes a wrong update show in the next loss.
RUN = ["--attn", "sdpa", "--seq-len", "64", "--max-docs", "60", "--device", "cpu", "--max-steps", "4",
       "--lr", "1e-2", "--lora-dropout", "0", "--save-steps", "2"]  # fmt: skip


def _launch(*argv, config="ddp", timeout=120, cpu=True):
    """`accelerate launch` of two processes with a shipped config; returns what they printed."""
    # Port 0: accelerate picks a free port, so parallel CI jobs on one machine cannot collide.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml"),
              "--num_processes", "2", "--main_process_port", "0"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if cpu:  # hide the GPUs: the CPU/gloo runs stay on the CPU on a one-GPU machine too (two ranks would collide)
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([*launch, *map(str, argv)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def _count(text: str, start: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith(start))


def test_two_processes_train_like_one_and_resume(run_finetune, tmp_path):
    # One process, 4 rows per step, in this process (quick) ...
    code, _, err, one = run_finetune(*RUN, "--batch-size", "4", "--no-save-adapter", out=tmp_path / "one")
    assert code == 0, err
    # ... against two processes of 2 rows each, stopped after step 2 and resumed from its checkpoint.
    two = tmp_path / "two"
    first = _launch(SCRIPTS / "finetune_lora.py", *RUN, "--batch-size", "2", "--output-dir", two, "--stop-after", 2)
    assert _count(first, "stopped after step 2") == 1 and _count(first, "model embedded") == 1  # rank 0 only
    assert "2 processes, ddp over gloo: 4 rows per optimizer step" in first
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (two / "checkpoint-2").iterdir()}
    second = _launch(SCRIPTS / "finetune_lora.py", *RUN, "--batch-size", "2", "--output-dir", two, "--resume")
    assert _count(second, "done: 4 steps") == 1
    assert second.count("'loss': ") == 2  # steps 3 and 4, logged once each (not once per rank)

    single, double = read_steps(one), read_steps(two)
    assert [s["step"] for s in double] == [1, 2, 3, 4]  # nothing lost, nothing repeated
    assert [s["loss"] for s in double] == pytest.approx([s["loss"] for s in single], abs=1e-4)
    assert [s["grad_norm"] for s in double] == pytest.approx([s["grad_norm"] for s in single], rel=1e-3)
    assert all(s["tokens"] == 4 * 64 for s in double)  # the job's tokens, both ranks together
    summary = json.loads((two / "summary.json").read_text())
    assert summary["status"] == "ok"
    layout = summary["parallelism"]
    assert (layout["mode"], layout["world_size"], layout["distributed_type"], layout["backend"]) == (
        "ddp", 2, "MULTI_CPU", "gloo")  # fmt: skip
    assert (two / "adapter" / "adapter_model.safetensors").exists()


def test_each_rank_reads_its_own_rows(tmp_path):
    _launch(ROOT / "tests" / "scripts" / "distributed_probe.py", "shards", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["rows"] == ranks[0]["dataset_rows"]
    rows, per_step = ranks[0]["rows"], 2 * 2  # 2 rows per rank per step
    for epoch in range(2):
        mine, theirs = ranks[0]["epochs"][epoch], ranks[1]["epochs"][epoch]
        assert len(mine) == len(theirs) == rows // per_step * 2  # the incomplete last step is dropped
        seen = mine + theirs
        assert len(set(seen)) == len(seen)  # no row twice in an epoch, within a rank or across ranks
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # each epoch is shuffled anew


def test_fsdp_settings_agree_with_peft(tmp_path):
    # accelerate enables FSDP only on GPUs, so torch's FSDP is applied directly with fsdp.yaml's settings
    # and peft's wrapping rule: one bf16 step and a full state dict holding every LoRA weight by name.
    output = _launch(ROOT / "tests" / "scripts" / "distributed_probe.py", "fsdp", CONFIGS / "fsdp.yaml")
    result = json.loads(next(line for line in output.splitlines() if line.startswith('{"loss"')))
    assert 7.0 < result["loss"] < 10.0
    assert result["trainable"] == result["with_grad"] == result["lora_keys"] > 0 and result["lora_keys_match"]
    assert result["fsdp_units"] == 1 + 2 + result["lora_keys"]  # root, 2 decoder layers, each LoRA weight


def test_shipped_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    ddp = load_config_from_file(str(CONFIGS / "ddp.yaml"))
    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml"))
    assert str(ddp.distributed_type).endswith("MULTI_GPU") and ddp.mixed_precision == "no"
    assert str(fsdp.distributed_type).endswith("FSDP") and fsdp.mixed_precision == "bf16"
    settings = fsdp.fsdp_config
    assert settings["fsdp_use_orig_params"] is True and settings["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert settings["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert settings["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"


def test_meter_sums_every_ranks_tokens(monkeypatch):
    # Packed bins give ranks different token counts: the job's count is their sum, not rank 0's x 2.
    # per rank: real tokens, loss targets, peak memory, stop
    monkeypatch.setattr(loop, "gather_floats", lambda values: [list(values), [700.0, 690.0, 0.0, 1.0]])
    meter = StepMeter("cpu")
    meter.begin()
    meter.tokens, meter.targets = 300, 298
    assert meter.end(stop=False) is True  # the other rank asked to stop: this one stops too
    seconds = meter.last["step_time_s"]
    assert meter.last["tokens"] == 1000 and meter.last["tokens_per_s"] == pytest.approx(1000 / seconds)
    assert meter.last["targets"] == 988


def test_fsdp_request_on_cpu_is_reported(monkeypatch):
    state = SimpleNamespace(distributed_type="DistributedType.MULTI_CPU", num_processes=2, backend="gloo")
    trainer = SimpleNamespace(is_fsdp_enabled=False, accelerator=SimpleNamespace(state=state))
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert distributed.fsdp_ignored_reason(trainer) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert "plain DDP" in distributed.fsdp_ignored_reason(trainer)
    assert distributed.parallelism(trainer)["mode"] == "ddp"


def test_compare_refuses_to_run_under_a_launcher(compare_script, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert compare_script.main(["--backends", "sdpa"]) == 2
    assert "--launcher" in capsys.readouterr().err
    launcher = "accelerate launch --config_file examples/accelerate/ddp.yaml"
    assert compare_script.finetune_command(launcher)[:4] == ["accelerate", "launch", "--config_file",
                                                             "examples/accelerate/ddp.yaml"]  # fmt: skip
    assert compare_script.finetune_command(launcher)[-1].endswith("finetune_lora.py")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("config", ["ddp", "fsdp"])
def test_two_gpus_with_hf_flash(config, run_finetune, tmp_path, monkeypatch):
    """hf_flash kernels (strict: no silent PyTorch fallback) on 2 GPUs against 1 GPU with the same global
    batch; stop and resume; the final adapter (under FSDP gathered from the shards) loads with peft."""
    from hf_flash.training.loop import load_finetuned

    gpu_run = ["--attn", "hf_flash", "--device", "cuda", "--seq-len", "128", "--max-docs", "200",
               *RUN[RUN.index("--max-steps"):]]  # fmt: skip
    monkeypatch.setenv("HF_FLASH_STRICT", "1")  # here and in the launched processes
    code, _, err, one = run_finetune(*gpu_run, "--batch-size", "4", "--no-save-adapter", out=tmp_path / "one")
    assert code == 0, err
    two = tmp_path / config
    common = [SCRIPTS / "finetune_lora.py", *gpu_run, "--batch-size", "2", "--output-dir", two]
    _launch(*common, "--stop-after", 2, config=config, timeout=600, cpu=False)
    output = _launch(*common, "--resume", config=config, timeout=600, cpu=False)
    assert "asks for FSDP" not in output and _count(output, "done: 4 steps") == 1
    summary = json.loads((two / "summary.json").read_text())
    assert summary["parallelism"]["mode"] == config and len(summary["peak_mem_gib_per_rank"]) == 2
    # bf16 on both sides, reduced in another order (and under FSDP in bf16): close, not equal
    tolerance = 2e-2 if config == "ddp" else 5e-2
    single, double = read_steps(one), read_steps(two)
    assert [s["loss"] for s in double] == pytest.approx([s["loss"] for s in single], abs=tolerance)
    model = load_finetuned(two / "adapter", attn="sdpa", device="cuda")
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # trained weights, not the zero init
