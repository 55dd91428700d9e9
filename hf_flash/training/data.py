"""Training data: load records, turn them into token sequences, and batch them.

Three batch layouts:
- blocks (default): all documents joined with EOS and cut into rows of exactly ``seq_len`` tokens, so
  every step sees the same number of tokens (what a speed comparison of one length needs);
- padded: one document per row (cut at ``max_doc_len``), a micro-batch padded to its longest row with an
  ``attention_mask`` and -100 labels on the pads (what most fine-tuning scripts do);
- packed: whole documents (cut at ``max_doc_len``) grouped into bins of at most ``seq_len`` tokens and
  flattened by Transformers' ``DataCollatorWithFlattening``: one row per batch, sequence boundaries
  passed to attention so no document attends to another.

The documents come from ``--data`` (or the default corpus), or, for speed work without a data set, from
``--lengths lognormal:MEDIAN:SIGMA:N``: N sequences of random token ids whose lengths follow a log-normal
distribution (long-tailed, as instruction and chat data are), the same for every backend of a seed.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from . import INSTALL_HINT
from .models import ASSETS, UsageError

IGNORE_INDEX = -100  # label value the loss skips (prompt tokens, sequence starts)
FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
PROMPT_FIELDS = ("instruction", "prompt", "question", "input")
RESPONSE_FIELDS = ("response", "output", "answer", "completion")
QA_DATA = ASSETS / "data" / "attention_qa.jsonl"
LAYOUTS = ("blocks", "padded", "packed")


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


def parse_lengths(spec: str) -> tuple[float, float, int]:
    """``lognormal:MEDIAN:SIGMA:N`` -> (median, sigma, n), or UsageError naming the accepted form."""
    parts = spec.split(":")
    try:
        if len(parts) != 4 or parts[0] != "lognormal":
            raise ValueError
        median, sigma, count = float(parts[1]), float(parts[2]), int(parts[3])
        if median < 2 or sigma < 0 or count < 1:
            raise ValueError
    except ValueError:
        raise UsageError(
            f"--lengths {spec!r}: expected lognormal:MEDIAN:SIGMA:N with MEDIAN >= 2, SIGMA >= 0 and N >= 1, "
            "e.g. lognormal:600:1.0:100"
        ) from None
    return median, sigma, count


def synthetic_sequences(spec: str, max_len: int, vocab_size: int, seed: int = 0):
    """(input_ids, labels) of random tokens with log-normal lengths clipped to [2, ``max_len``].

    Random ids make the loss meaningless as a model of language, but every backend of a run trains on the
    same tokens, so speed, memory and the agreement of the losses are what a comparison needs.
    """
    median, sigma, count = parse_lengths(spec)
    rng = random.Random(seed)
    sequences = []
    for _ in range(count):
        length = min(max_len, max(2, round(math.exp(rng.gauss(math.log(median), sigma)))))
        ids = [rng.randrange(vocab_size) for _ in range(length)]
        sequences.append((ids, list(ids)))
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


def make_rows(sequences) -> list[dict]:
    """One row per sequence (the padded layout pads them per micro-batch)."""
    return [{"input_ids": ids, "labels": labels} for ids, labels in sequences]


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


class PaddedCollator:
    """Pad a micro-batch of rows to its longest: ``input_ids``/``labels``/``attention_mask`` ``[B, longest]``.

    Transformers' ``DataCollatorForSeq2Seq`` does the work (pads on the tokenizer's side, -100 labels on
    the pads); training pads on the right, where a causal model's real tokens never see a pad.
    """

    def __init__(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        tokenizer.padding_side = "right"
        self.pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX,
                                          return_tensors="pt")  # fmt: skip

    def __call__(self, features: list[dict]) -> dict:
        return self.pad([{**f, "attention_mask": [1] * len(f["input_ids"])} for f in features])


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
                        response_field=None, max_docs=None, layout=None, max_doc_len=None, lengths=None,
                        vocab_size=None, seed=0):  # fmt: skip
    """(dataset, collator, number of tokens) for the Trainer, or UsageError saying what to fix.

    ``layout``: blocks | padded | packed (``packing=True`` is the older spelling of packed). Padded and
    packed rows hold documents cut at ``max_doc_len`` (default ``seq_len``); packed bins hold at most
    ``seq_len`` tokens. ``lengths`` (``lognormal:MEDIAN:SIGMA:N``) replaces the data with random tokens
    of ids below ``vocab_size``.
    """
    layout = layout or ("packed" if packing else "blocks")
    if layout not in LAYOUTS:
        raise UsageError(f"unknown --layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    max_doc_len = max_doc_len or seq_len
    if layout == "packed" and max_doc_len > seq_len:
        raise UsageError(f"--max-doc-len {max_doc_len} is above --seq-len {seq_len}, the size of a packed bin")
    if lengths is not None:
        if data is not None:
            raise UsageError("pass either --data or --lengths, not both")
        sequences = synthetic_sequences(lengths, max_doc_len, vocab_size or len(tokenizer), seed)
    else:
        source = f"--data {data}" if data else "the default data"
        records = load_records(data, max_docs)
        if len(records) == 0:
            raise UsageError(f"{source} is empty; pass a file with at least one row")
        fields = resolve_fields(records, text_field, prompt_field, response_field, source)
        sequences = tokenize_records(records, tokenizer, fields)
        if not sequences:
            raise UsageError(f"{source} has no usable text in {fields[1:]} (every row is empty or too short)")
    if layout == "blocks":
        rows, collator = make_blocks(sequences, seq_len), BlockCollator()
    else:  # both layouts see the same documents, cut at the same length
        sequences = [(ids[:max_doc_len], labels[:max_doc_len]) for ids, labels in sequences]
        if layout == "padded":
            rows, collator = make_rows(sequences), PaddedCollator(tokenizer)
        else:
            rows, collator = make_bins(sequences, seq_len), PackedCollator()
    n_tokens = sum(len(ids) for ids, _ in sequences)
    return ListDataset(rows), collator, n_tokens
