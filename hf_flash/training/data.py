"""Training data: load records, turn them into token sequences, and batch them.

Two batch layouts, both without padding:
- blocks (default): all documents joined with EOS and cut into rows of exactly ``seq_len`` tokens, so
  every step sees the same number of tokens (what a speed comparison needs);
- packing: whole documents (cut at ``seq_len``) grouped into bins of at most ``seq_len`` tokens and
  flattened by Transformers' ``DataCollatorWithFlattening``: one row per batch, sequence boundaries
  passed to attention so no document attends to another.
"""

from __future__ import annotations

from pathlib import Path

from . import INSTALL_HINT
from .models import ASSETS, UsageError

IGNORE_INDEX = -100  # label value the loss skips (prompt tokens, sequence starts)
FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
PROMPT_FIELDS = ("instruction", "prompt", "question", "input")
RESPONSE_FIELDS = ("response", "output", "answer", "completion")
QA_DATA = ASSETS / "data" / "attention_qa.jsonl"


def _data_files(path: Path) -> tuple[str, list[str]]:
    """The `datasets` builder name and the files for a file or a folder."""
    if path.is_file():
        files = [path]
    elif not path.is_dir():
        raise UsageError(f"--data {path}: not a regular file or folder")
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS)
        if not files:
            raise UsageError(f"--data {path}: the folder has no {'/'.join(sorted(FORMATS))} files")
    if all(p.stat().st_size == 0 for p in files):
        raise UsageError(f"--data {path} is empty; pass a file with at least one row")
    kinds = {FORMATS.get(p.suffix.lower()) for p in files}
    if None in kinds:
        raise UsageError(f"--data {path}: unsupported file type; use one of {', '.join(sorted(FORMATS))}")
    if len(kinds) > 1:
        raise UsageError(f"--data {path}: the folder mixes {' and '.join(sorted(kinds))} files; keep one kind")
    return kinds.pop(), [str(p) for p in files]


def load_records(data: str | None, max_docs: int | None = None):
    """Rows as a sequence of dicts (a ``datasets.Dataset`` for files, a list for the default)."""
    if data is None:
        from .corpus import stdlib_documents

        return stdlib_documents(max_docs)
    path = Path(data).expanduser()
    if not path.exists():
        raise UsageError(f"--data {data}: no such file or folder")
    builder, files = _data_files(path)
    try:
        import datasets
    except ImportError:
        raise UsageError(f"--data {data}: reading files needs the `datasets` package: {INSTALL_HINT}") from None
    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its "Failed to load JSON" line would be a second
    try:
        rows = datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as exc:  # datasets raises many types; all mean the file could not be parsed
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "corresponds to no data" in first:  # datasets' words for a file with a header and no rows
            raise UsageError(f"--data {data} is empty; pass a file with at least one row") from None
        bad = next(filter(None, map(_json_error, files)), None) if builder == "json" else None
        raise UsageError(f"--data {bad or f'{data}: could not read it as {builder}: {first}'}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    if max_docs is not None:
        rows = rows.select(range(min(max_docs, len(rows))))
    return rows


def _json_error(file: str) -> str | None:
    """Where a JSON or JSON Lines file stops being valid, as "FILE: line N is not valid JSON: ..." with 1-based
    lines and columns (datasets counts rows from 0, and pyarrow's words can mislead), or None."""
    import json

    text = Path(file).read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    try:  # JSON Lines: a .jsonl file, or a .json file whose first line is a whole value
        json_lines = file.lower().endswith(".jsonl") or json.loads(first) is not None
    except json.JSONDecodeError:
        json_lines = False
    try:
        for number, line in enumerate(lines if json_lines else [text], 1):
            if line.strip():
                json.loads(line)
    except json.JSONDecodeError as exc:
        what = exc.msg.removesuffix(" starting at").removesuffix(" at").lower()  # "Unterminated string starting at"
        return f"{file}: line {number if json_lines else exc.lineno} is not valid JSON: {what} at column {exc.colno}"
    return None


def _columns(records) -> list[str]:
    names = getattr(records, "column_names", None)
    return list(names) if names is not None else (list(records[0]) if len(records) else [])


def resolve_fields(records, text_field=None, prompt_field=None, response_field=None, source="the data"):
    """Decide how rows become text: ("text", field) | ("messages", field) | ("pair", prompt, response)."""
    columns = _columns(records)
    if not columns:
        raise UsageError(f"{source} is empty; pass a file with at least one row")

    def need(flag, name):
        if name not in columns:
            raise UsageError(f"{flag} {name!r} is not a column of {source} (columns: {', '.join(columns)})")
        return name

    if text_field:
        return ("text", need("--text-field", text_field))
    if prompt_field or response_field:
        prompt = need("--prompt-field", prompt_field or next((c for c in PROMPT_FIELDS if c in columns), "prompt"))
        response = need(
            "--response-field", response_field or next((c for c in RESPONSE_FIELDS if c in columns), "response")
        )
        return ("pair", prompt, response)
    if "text" in columns:
        return ("text", "text")
    if "messages" in columns:
        return ("messages", "messages")
    prompt = next((c for c in PROMPT_FIELDS if c in columns), None)
    response = next((c for c in RESPONSE_FIELDS if c in columns), None)
    if prompt and response:
        return ("pair", prompt, response)
    raise UsageError(
        f"no text column in {source} (columns: {', '.join(columns)}); pass --text-field NAME, "
        "or --prompt-field/--response-field for instruction data"
    )


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Tokens of the whole conversation; labels hide everything before the last answer."""
    if tokenizer.chat_template:
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        ids = _encode(tokenizer, full, special=False)  # the template writes its own BOS
    else:  # a tokenizer without a template: plain "prompt, blank line, answer"
        prompt = "\n\n".join(m["content"] for m in messages[:-1]) + "\n\n"
        full = prompt + messages[-1]["content"]
        ids = _encode(tokenizer, full, special=True)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    n_prompt = len(_encode(tokenizer, prompt, special=not tokenizer.chat_template)) if full.startswith(prompt) else 0
    return ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:]


def tokenize_records(records, tokenizer, fields) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row; rows of fewer than two tokens teach nothing and are dropped."""
    kind = fields[0]
    sequences = []
    for row in records:
        if kind == "text":
            text = row[fields[1]]
            if not isinstance(text, str) or not text.strip():
                continue
            ids = _encode(tokenizer, text, special=True)
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
            labels = list(ids)
        else:
            if kind == "messages":
                messages = row[fields[1]]
            else:
                messages = [
                    {"role": "user", "content": str(row[fields[1]])},
                    {"role": "assistant", "content": str(row[fields[2]])},
                ]
            if not messages:
                continue
            ids, labels = _encode_chat(tokenizer, messages)
        if len(ids) >= 2 and any(label != IGNORE_INDEX for label in labels[1:]):
            sequences.append((ids, labels))
    return sequences


def make_blocks(sequences, seq_len: int) -> list[dict]:
    """Join all sequences and cut rows of exactly ``seq_len`` tokens (the remainder is dropped)."""
    ids = [t for seq, _ in sequences for t in seq]
    labels = [t for _, lab in sequences for t in lab]
    if len(ids) < seq_len:
        raise UsageError(
            f"the data has {len(ids)} tokens, fewer than one --seq-len row of {seq_len}; "
            "use a smaller --seq-len, more data, or --packing"
        )
    return [
        {"input_ids": ids[i : i + seq_len], "labels": labels[i : i + seq_len]}
        for i in range(0, len(ids) - seq_len + 1, seq_len)
    ]


def make_bins(sequences, seq_len: int) -> list[dict]:
    """Group whole sequences, in order, into bins of at most ``seq_len`` tokens (longer ones are cut)."""
    bins, current, used = [], [], 0
    for ids, labels in sequences:
        ids, labels = ids[:seq_len], labels[:seq_len]
        if used + len(ids) > seq_len and current:
            bins.append({"docs": current})
            current, used = [], 0
        current.append({"input_ids": ids, "labels": labels})
        used += len(ids)
    if current:
        bins.append({"docs": current})
    return bins


class ListDataset:
    """A map-style dataset over a list of dicts (no `datasets` needed for the default data)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


class BlockCollator:
    """Stack equal-length rows: ``input_ids``/``labels`` ``[B, seq_len]``, no attention mask (no padding)."""

    def __call__(self, features: list[dict]) -> dict:
        import torch

        return {key: torch.tensor([f[key] for f in features], dtype=torch.long) for key in ("input_ids", "labels")}


class PackedCollator:
    """Flatten every document of every bin of the batch into one row of shape ``[1, total_tokens]``.

    Transformers' ``DataCollatorWithFlattening`` restarts ``position_ids`` at each document, puts -100
    at each document's first label and adds ``cu_seq_lens_q/k`` + ``max_length_q/k`` for varlen kernels.
    """

    def __init__(self):
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=True)

    def __call__(self, features: list[dict]) -> dict:
        return self.flatten([doc for feature in features for doc in feature["docs"]])


def build_train_dataset(tokenizer, data=None, seq_len=512, packing=False, text_field=None, prompt_field=None,
                        response_field=None, max_docs=None):  # fmt: skip
    """(dataset, collator, number of tokens) for the Trainer, or UsageError saying what to fix."""
    source = f"--data {data}" if data else "the default data"
    records = load_records(data, max_docs)
    if len(records) == 0:
        raise UsageError(f"{source} is empty; pass a file with at least one row")
    fields = resolve_fields(records, text_field, prompt_field, response_field, source)
    sequences = tokenize_records(records, tokenizer, fields)
    if not sequences:
        raise UsageError(f"{source} has no usable text in {fields[1:]} (every row is empty or too short)")
    rows = make_bins(sequences, seq_len) if packing else make_blocks(sequences, seq_len)
    n_tokens = sum(len(ids) for ids, _ in sequences)
    return ListDataset(rows), (PackedCollator() if packing else BlockCollator()), n_tokens
