"""compare_backends: a 3-step CPU run end to end, and the rows for failures (OOM, bad input, timeout)."""

import json
import sys

import pytest

from hf_flash.training.compare import add_relative_columns, markdown_table, run_one


def test_three_step_cpu_comparison(compare_script, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = compare_script.main(["--backends", "eager,sdpa", "--seq-lens", "64", "--max-steps", "3", "--layout", "blocks",
                                "--dtype", "fp32", "--max-docs", "40", "--output-dir", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| eager | 64 | ok |" in printed and "| sdpa | 64 | ok |" in printed
    results = json.loads((out / "results.json").read_text())
    rows = {r["backend"]: r for r in results["rows"]}
    assert set(rows) == {"eager", "sdpa"} and all(r["status"] == "ok" and r["steps"] == 3 for r in rows.values())
    assert rows["sdpa"]["tokens_per_s_vs_sdpa"] == pytest.approx(1.0)
    assert rows["sdpa"]["max_abs_loss_diff_vs_eager"] < 1e-4  # same model, seed and data: same losses
    assert rows["eager"]["max_abs_loss_diff_vs_eager"] == 0
    for name in ("results.md", "loss_curves.png", "speed_memory.png"):
        assert (out / name).stat().st_size > 0
    assert "--max-docs 40" in rows["eager"]["command"]  # unknown options reach finetune_lora.py


def test_padded_and_packed_cpu_comparison(compare_script, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = compare_script.main(["--backends", "eager,sdpa", "--lengths", "lognormal:12:0.7:6", "--max-len", "24",
                                "--batch-size", "3", "--dtype", "fp32", "--output-dir", str(out)])  # fmt: skip
    assert code == 0
    rows = {(r["backend"], r["layout"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {(b, layout) for b in ("eager", "sdpa") for layout in ("padded", "packed")}
    padded, packed = rows["sdpa", "padded"], rows["sdpa", "packed"]
    bins = len(json.loads((out / "results.json").read_text())["rows"][2]["losses"]) // 2
    assert padded["steps"] == 4 and packed["steps"] == 2 * bins and bins >= 2  # two passes: 2 batches of 3 / bins of 48
    assert all(r["status"] == "ok" and r["first_pass_s"] > 0 and r["real_tokens_per_s"] > 0 for r in rows.values())
    # the same documents at learning rate 0: every row's loss per target agrees
    assert all(r["loss_per_token_rel_diff"] < 1e-5 for r in rows.values())
    assert padded["tokens_per_s_vs_sdpa"] == pytest.approx(1.0) and padded["tokens_per_s_vs_sdpa_padded"] == 1.0
    printed = capsys.readouterr().out
    assert "| sdpa | packed | ok |" in printed and "real tokens/s" in printed
    assert "--lr 0" in padded["command"] and "--layout padded" in padded["command"]


def test_summarize_splits_the_passes():
    from hf_flash.training.loop import summarize

    steps = [{"epoch": e, "loss": loss, "targets": n, "tokens": t, "step_time_s": s, "tokens_per_s": t / s}
             for e, loss, n, t, s in [(0.5, 2.0, 10, 12, 3.0), (1.0, 4.0, 30, 32, 1.0), (1.5, 2.0, 10, 12, 0.5),
                                      (2.0, 4.0, 30, 32, 0.5)]]  # fmt: skip
    summary = summarize(steps, warmup=1)
    assert summary["first_pass_s"] == 4.0 and summary["real_tokens_per_s"] == 44 / 1.0
    assert summary["loss_per_token"] == pytest.approx((2.0 * 10 + 4.0 * 30) / 40)


def _fake(tmp_path, code: int, text: str = "") -> list[str]:
    script = tmp_path / f"fake{code}.py"
    script.write_text(f"import sys\nprint({text!r}, file=sys.stderr)\nsys.exit({code})\n")
    return [sys.executable, str(script)]


@pytest.mark.parametrize("code, text, status", [
    (3, "out of memory at --seq-len 64", "oom"),
    (2, "error: --attn flash_attention_2 cannot run here: needs the flash-attn package", "unavailable"),
    (1, "RuntimeError: something broke", "error"),
])  # fmt: skip
def test_failed_runs_become_rows(tmp_path, code, text, status):
    row = run_one(_fake(tmp_path, code, text), "sdpa", 64, tmp_path / "run", [], timeout=30, warmup=1)
    assert row["status"] == status and row["steps"] == 0
    if status != "oom":
        assert row["error"] == text


def test_timeout_becomes_a_row(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text("import time\ntime.sleep(30)\n")
    row = run_one([sys.executable, str(script)], "eager", 64, tmp_path / "run", [], timeout=1, warmup=1)
    assert row["status"] == "timeout"


def test_relative_columns_and_table_with_an_oom_row():
    rows = [
        {"backend": "eager", "seq_len": 8, "status": "oom", "error": "CUDA out of memory", "losses": []},
        {"backend": "sdpa", "seq_len": 8, "status": "ok", "median_tokens_per_s": 100.0, "median_step_time_s": 2.0,
         "peak_mem_gib": 4.0, "final_loss": 2.0, "losses": [3.0, 2.0]},
        {"backend": "hf_flash", "seq_len": 8, "status": "ok", "median_tokens_per_s": 125.0,
         "median_step_time_s": 1.6, "peak_mem_gib": 3.0, "final_loss": 2.0, "losses": [3.0, 2.0]},
    ]  # fmt: skip
    add_relative_columns(rows)
    assert rows[2]["tokens_per_s_vs_sdpa"] == pytest.approx(1.25) and rows[2]["peak_mem_vs_sdpa"] == 0.75
    assert rows[2]["max_abs_loss_diff_vs_eager"] is None  # eager did not run: nothing to compare with
    table = markdown_table(rows)
    assert "| eager | 8 | OOM: CUDA out of memory | — |" in table and "| 1.25× |" in table
    cells = {line.count("|") - line.count("\\|") for line in table.splitlines()}
    assert cells == {11}  # ten columns on every line: escaped pipes in the header do not split cells


def test_reuse_reads_back_a_finished_run_with_the_same_arguments(tmp_path):
    counter = tmp_path / "calls"
    script = tmp_path / "count.py"
    script.write_text(f"open({str(counter)!r}, 'a').write('x')\nraise SystemExit(3)\n")  # an "OOM" run
    cmd = [sys.executable, str(script)]
    first = run_one(cmd, "eager", 64, tmp_path / "run", ["--max-steps", "3"], timeout=30, warmup=1, reuse=True)
    again = run_one(cmd, "eager", 64, tmp_path / "run", ["--max-steps", "3"], timeout=30, warmup=1, reuse=True)
    assert first["status"] == again["status"] == "oom" and again["reused"] and counter.read_text() == "x"
    changed = run_one(cmd, "eager", 64, tmp_path / "run", ["--max-steps", "4"], timeout=30, warmup=1, reuse=True)
    assert not changed.get("reused") and counter.read_text() == "xx"  # other arguments: run again
