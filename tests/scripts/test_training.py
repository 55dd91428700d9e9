"""Short CPU fine-tunes on the embedded model: logs, adapter save/load, resume, Ctrl-C, OOM rows."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, SCRIPTS, TINY, needs_datasets

from hf_flash.training.loop import load_finetuned, read_steps


def test_three_step_run_writes_steps_summary_and_adapter(run_finetune):
    code, out, _, run_dir = run_finetune("--max-steps", "3")
    assert code == 0 and "done: 3 steps" in out
    steps = read_steps(run_dir)
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s in steps:
        assert s["tokens"] == 2 * 64 and s["tokens_per_s"] > 0 and s["step_time_s"] > 0
        assert 7.0 < s["loss"] < 10.0  # about ln(4096) = 8.3 for a random model
        assert "peak_mem_gib" in s  # None on CPU
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == 3 and summary["final_loss"] == steps[-1]["loss"]
    assert {"adapter_config.json", "adapter_model.safetensors", "run_config.json"} <= {
        p.name for p in (run_dir / "adapter").iterdir()
    }


def test_adapter_loads_with_peft_and_changes_the_model(run_finetune):
    from peft import PeftModel
    from safetensors.torch import load_file

    code, _, _, run_dir = run_finetune("--max-steps", "3", "--lr", "1e-2", "--target-modules", "q_proj,v_proj")
    assert code == 0
    model = load_finetuned(run_dir / "adapter", attn="sdpa")
    assert isinstance(model, PeftModel)
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert saved and all("q_proj" in k or "v_proj" in k for k in saved)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    for key, value in saved.items():  # peft drops the adapter name from saved keys
        match = [v for k, v in loaded.items() if k.replace(".default", "") == key]
        assert len(match) == 1 and torch.equal(match[0], value)
    ids = torch.arange(1, 33).unsqueeze(0)
    model.eval()
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert (tuned - base).abs().max() > 1e-4  # the trained LoRA B matrices are no longer zero


def test_resume_continues_with_the_same_losses(run_finetune, tmp_path):
    common = ["--max-steps", "6", "--save-steps", "2", "--lora-dropout", "0.1", "--no-save-adapter"]
    assert run_finetune(*common, out=tmp_path / "straight")[0] == 0
    code, out, _, split = run_finetune(*common, "--stop-after", "3", out=tmp_path / "split")
    assert code == 0 and "rerun the same command with --resume" in out
    assert [s["step"] for s in read_steps(split)] == [1, 2, 3]
    code, out, _, _ = run_finetune(*common, "--resume", out=split)
    assert code == 0 and f"resuming from checkpoint-3 in {split}" in out
    straight_losses = [s["loss"] for s in read_steps(tmp_path / "straight")]
    resumed = read_steps(split)
    assert [s["step"] for s in resumed] == [1, 2, 3, 4, 5, 6]  # nothing lost, nothing repeated
    assert [s["loss"] for s in resumed] == pytest.approx(straight_losses, abs=1e-6)


@needs_datasets
def test_run_on_a_data_file(run_finetune, tmp_path):
    # through `datasets`: CI runs this in the Transformers 4.56 environment too, whose huggingface-hub
    # only some datasets releases work with
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"Row {i}: keys, queries and values. " * 8}) + "\n" for i in range(20)))
    code, out, err, run_dir = run_finetune("--max-steps", "2", "--data", str(path), "--no-save-adapter")
    assert code == 0 and "done: 2 steps" in out, err
    assert [s["step"] for s in read_steps(run_dir)] == [1, 2]


def test_resuming_a_finished_run_trains_nothing_more(run_finetune, tmp_path):
    from safetensors.torch import load_file

    common = ["--max-steps", "2", "--save-steps", "2"]
    code, _, _, run_dir = run_finetune(*common)
    assert code == 0 and (run_dir / "checkpoint-2").is_dir()
    # as if killed after the last step's checkpoint, before the run's end wrote the adapter and the summary
    shutil.rmtree(run_dir / "adapter")
    (run_dir / "summary.json").unlink()
    code, out, err, _ = run_finetune(*common, "--resume", out=run_dir)
    assert code == 0, err
    assert "resuming from checkpoint-2" in out and "nothing left to train" in out and "done: 2 steps" in out
    assert [s["step"] for s in read_steps(run_dir)] == [1, 2]  # no step 3 of --max-steps 2
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")  # the checkpoint's weights, not new ones
    trained = load_file(run_dir / "checkpoint-2" / "adapter_model.safetensors")
    assert adapter.keys() == trained.keys() and all(torch.equal(adapter[k], trained[k]) for k in adapter)


def test_packing_run(run_finetune):
    code, _, _, run_dir = run_finetune("--max-steps", "2", "--packing", "--attn", "eager", "--no-save-adapter")
    assert code == 0 and len(read_steps(run_dir)) == 2


def test_out_of_memory_is_reported_not_raised(run_finetune, monkeypatch):
    from transformers import Trainer

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setattr(Trainer, "train", oom)
    code, _, err, run_dir = run_finetune("--max-steps", "2")
    assert code == 3 and "out of memory at --seq-len 64 with --attn sdpa" in err
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "oom"


def test_hf_flash_kernels_train_like_sdpa(run_finetune, monkeypatch, tmp_path):
    # fp16: the kernels' dtype, and on CPU the default for hf_flash (there they run in Triton's interpreter,
    # which tests/conftest.py turns on). Strict mode makes a silent fallback to PyTorch an error, so the
    # kernels really ran.
    monkeypatch.setenv("HF_FLASH_STRICT", "1")
    small = ["--max-steps", "2", "--seq-len", "32", "--batch-size", "1", "--no-save-adapter"]
    if torch.cuda.is_available():  # with a GPU the kernels run there (the interpreter is off)
        small += ["--device", "cuda", "--dtype", "fp16"]
    code, out, err, flash_dir = run_finetune(*small, "--attn", "hf_flash", out=tmp_path / "flash")
    assert code == 0, err
    if not torch.cuda.is_available():  # the header says what runs
        assert "attn=hf_flash (Triton interpreter), dtype=float16" in out
    assert run_finetune(*small, "--attn", "sdpa", "--dtype", "fp16", out=tmp_path / "sdpa")[0] == 0
    flash = [s["loss"] for s in read_steps(flash_dir)]
    assert flash == pytest.approx([s["loss"] for s in read_steps(tmp_path / "sdpa")], abs=2e-3)


def test_header_says_when_hf_flash_falls_back(run_finetune):
    code, out, err, _ = run_finetune("--attn", "hf_flash", "--dtype", "fp32", "--max-steps", "1", "--no-save-adapter")
    assert code == 0, err
    assert "attn=hf_flash (falls back to SDPA: float32), dtype=float32" in out


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    out = tmp_path / "interrupted"
    cmd = [sys.executable, str(SCRIPTS / "finetune_lora.py"), *TINY, "--max-steps", "500", "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    deadline = time.time() + 45
    while not read_steps(out) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=45)
    assert proc.returncode == 0, output
    assert "Ctrl-C: saving a checkpoint" in output and "--resume" in output
    done = len(read_steps(out))
    assert 1 <= done < 500 and (out / f"checkpoint-{done}").is_dir()
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
