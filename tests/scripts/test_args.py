"""Argument parsing of both scripts, and the one-line errors for bad input (nothing is trained)."""

import json

import pytest
from conftest import needs_datasets


def test_finetune_defaults(finetune_script):
    args = finetune_script.build_parser().parse_args([])
    assert args.attn == "hf_flash"
    assert (args.model, args.model_preset, args.data) == (None, None, None)
    assert (args.seq_len, args.batch_size, args.grad_accum, args.lora_r) == (512, 1, 1, 16)
    assert args.target_modules == "all-linear" and args.save_adapter and not args.packing and not args.resume


def test_finetune_options_reach_the_config(finetune_script):
    from hf_flash.training.loop import FinetuneConfig

    argv = [
        "--attn",
        "eager",
        "--packing",
        "--gradient-checkpointing",
        "--dtype",
        "fp32",
        "--lora-r",
        "4",
        "--target-modules",
        "q_proj,v_proj",
        "--max-steps",
        "7",
        "--resume",
        "--no-save-adapter",
    ]
    cfg = FinetuneConfig(**vars(finetune_script.build_parser().parse_args(argv)))
    assert (cfg.attn, cfg.packing, cfg.gradient_checkpointing, cfg.dtype) == ("eager", True, True, "fp32")
    assert (cfg.lora_r, cfg.target_modules, cfg.max_steps, cfg.resume, cfg.save_adapter) == (
        4,
        "q_proj,v_proj",
        7,
        True,
        False,
    )


def _option_help(parser, option: str) -> str:
    """The --help text of one option (its line and the lines under it)."""
    text = parser.format_help()
    start = text.index(f"  {option} ")
    following = [text.find("\n  -", start + 1), text.find("\n\n", start)]
    return " ".join(text[start : min(i for i in following if i > 0)].split())


@pytest.mark.parametrize("script, option, default", [
    ("finetune", "--max-steps", "default: as many as --epochs takes"),
    ("finetune", "--output-dir", "default: outputs/finetune"),
    ("finetune", "--batch-size", "default 1"),
    ("finetune", "--lr", "default 2e-4"),
    ("compare", "--max-steps", "default: 8 on a GPU, 3 on CPU"),
    ("compare", "--output-dir", "default: outputs/compare"),
    ("compare", "--batch-size", "default: 4 padded, 1 blocks"),
])  # fmt: skip
def test_help_shows_the_defaults(finetune_script, compare_script, script, option, default):
    module = finetune_script if script == "finetune" else compare_script
    assert default in _option_help(module.build_parser(), option)


def test_compare_help_says_where_the_fine_tune_options_are(compare_script):
    assert "--lr, --packing" in compare_script.build_parser().format_help()


def test_unknown_backend_is_rejected_by_the_parser(finetune_script, capsys):
    with pytest.raises(SystemExit) as exc:
        finetune_script.build_parser().parse_args(["--attn", "flash"])
    assert exc.value.code == 2
    assert "invalid choice: 'flash'" in capsys.readouterr().err


def test_compare_parser(compare_script):
    args, rest = compare_script.build_parser().parse_known_args(
        ["--seq-lens", "2048,8192", "--backends", "sdpa,hf_flash", "--packing", "--lora-r", "8"]
    )
    assert args.seq_lens == [2048, 8192] and args.backends == ["sdpa", "hf_flash"]
    assert rest == ["--packing", "--lora-r", "8"]  # passed through to finetune_lora.py
    defaults = compare_script.build_parser().parse_args([])
    assert defaults.backends is None and defaults.seq_lens is None  # chosen from the device at run time


@pytest.mark.parametrize("argv, message", [
    (["--seq-lens", "2k"], "expected comma-separated integers"),
    (["--seq-lens", "0"], "expected positive integers"),
    (["--backends", "sdpa,xformers"], "unknown backend(s) xformers"),
    (["--max-steps", "0"], "argument --max-steps: expected a positive integer, got '0'"),
    (["--max-steps", "-2"], "argument --max-steps: expected a positive integer, got '-2'"),
    (["--batch-size", "0"], "argument --batch-size: expected a positive integer, got '0'"),
])  # fmt: skip
def test_compare_parser_errors(compare_script, capsys, argv, message):
    with pytest.raises(SystemExit):
        compare_script.build_parser().parse_args(argv)
    assert message in capsys.readouterr().err


def _one_line_error(run_finetune, *argv):
    code, _, err, _ = run_finetune(*argv)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    return lines[0]


def test_missing_data_file(run_finetune, tmp_path):
    assert "no such file or folder" in _one_line_error(run_finetune, "--data", str(tmp_path / "nope.jsonl"))


def test_empty_dataset(run_finetune, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    line = _one_line_error(run_finetune, "--data", str(tmp_path / "empty.jsonl"))
    assert "empty" in line


@needs_datasets
def test_unknown_text_field(run_finetune, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "some words " * 20}) + "\n")
    line = _one_line_error(run_finetune, "--data", str(path), "--text-field", "content")
    assert "--text-field 'content' is not a column" in line and "body" in line
    assert "no text column" in _one_line_error(run_finetune, "--data", str(path))


def test_seq_len_above_model_limit(run_finetune):
    line = _one_line_error(run_finetune, "--seq-len", "100000")
    assert "above the model's max_position_embeddings (8192)" in line


def test_missing_model_says_nothing_can_be_downloaded(run_finetune, tmp_path):
    line = _one_line_error(run_finetune, "--model", "some-org/not-in-the-cache")
    assert "nothing can be downloaded here" in line
    assert "no such folder" in _one_line_error(run_finetune, "--model", str(tmp_path / "missing"))


def test_unknown_preset_and_bad_target_modules(run_finetune):
    assert "llama-3.2-1b" in _one_line_error(run_finetune, "--model-preset", "gpt-5")
    assert "--target-modules" in _one_line_error(run_finetune, "--target-modules", "no_such_proj", "--max-steps", "1")


def test_output_dir_that_is_a_file(run_finetune, compare_script, tmp_path, capsys, monkeypatch):
    from hf_flash.training import loop

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was being loaded")

    monkeypatch.setattr(loop, "resolve_model", no_loading)  # the check comes before anything loads
    taken = tmp_path / "notes.txt"
    taken.write_text("not a folder")
    for out in (taken, taken / "run"):
        code, stdout, err, _ = run_finetune(out=out)
        assert code == 2 and stdout == "" and err.splitlines() == [
            f"error: --output-dir {out} " + ("is a file" if out == taken else f"is inside {taken}, which is a file")
            + "; pass a folder (it is created if missing)"
        ]  # fmt: skip
    assert compare_script.main(["--output-dir", str(taken), "--backends", "sdpa"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --output-dir {taken} is a file; pass a folder (it is created if missing)"
    ]


@needs_datasets
@pytest.mark.parametrize("name, text, where", [
    ("bad.jsonl", '{"text": "fine"}\n{"text": "unterminated}\n{"text": "x"}\n', "line 2 is not valid JSON: unterminated string at column 10"),
    ("bad.jsonl", '{"text": "fine"}\n\n{"text": "a"} trailing\n', "line 3 is not valid JSON: extra data at column 15"),
    ("bad.json", '[{"text": "fine"},\n{"text": "b}\n]', "line 2 is not valid JSON: invalid control character at column 13"),
])  # fmt: skip
def test_malformed_json_names_the_file_and_line(run_finetune, tmp_path, name, text, where):
    path = tmp_path / name
    path.write_text(text)
    code, _, err, _ = run_finetune("--data", str(path))
    assert code == 2 and err.splitlines() == [f"error: --data {path}: {where}"]
