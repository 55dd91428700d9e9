"""Data loading for every format, field detection, chat templates, blocks and packed bins."""

import json

import pytest
from conftest import needs_datasets

from hf_flash.training.data import (
    IGNORE_INDEX,
    BlockCollator,
    PackedCollator,
    PaddedCollator,
    build_train_dataset,
    load_records,
    parse_lengths,
    resolve_fields,
    synthetic_sequences,
)  # fmt: skip
from hf_flash.training.models import UsageError, load_tokenizer, resolve_model

TEXTS = [f"Document {i}: attention weighs the values by how well each key matches the query." for i in range(30)]
QA = [{"instruction": f"Question {i}: what does a causal mask do?", "response": "It hides later tokens."}
      for i in range(12)]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model())


def _write(tmp_path, fmt: str, rows: list[dict]):
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "txt":
        path.write_text("".join(r["text"] + "\n" for r in rows))
    else:
        import pandas as pd

        frame = pd.DataFrame(rows)
        frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "txt"])
@needs_datasets
def test_each_format_loads_and_trains_on_text(tmp_path, tokenizer, fmt):
    path = _write(tmp_path, fmt, [{"text": t} for t in TEXTS])
    records = load_records(str(path))
    assert len(records) == len(TEXTS) and resolve_fields(records) == ("text", "text")
    dataset, collator, n_tokens = build_train_dataset(tokenizer, str(path), seq_len=32)
    assert len(dataset) == n_tokens // 32 and isinstance(collator, BlockCollator)
    batch = collator([dataset[0], dataset[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 32)


@needs_datasets
def test_folder_of_files(tmp_path, tokenizer):
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(3):
        (folder / f"part{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[i::3]))
    assert len(load_records(str(folder))) == len(TEXTS)
    (folder / "extra.csv").write_text("text\nhello\n")
    with pytest.raises(UsageError, match="mixes csv and json"):
        load_records(str(folder))


@needs_datasets
def test_instruction_data_uses_the_chat_template_and_masks_the_prompt(tmp_path, tokenizer):
    path = _write(tmp_path, "jsonl", QA)
    dataset, _, _ = build_train_dataset(tokenizer, str(path), seq_len=64, packing=True)
    doc = dataset[0]["docs"][0]
    text = tokenizer.decode(doc["input_ids"])
    assert text.startswith("<s><|user|>\nQuestion 0") and "<|assistant|>\nIt hides later tokens.</s>" in text
    answer = tokenizer.decode([t for t, lab in zip(doc["input_ids"], doc["labels"]) if lab != IGNORE_INDEX])
    assert answer.strip().startswith("It hides later tokens.")  # only the answer is scored
    assert "Question" not in answer


@needs_datasets
def test_messages_column_and_explicit_fields(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]}] * 4
    records = load_records(str(_write(tmp_path, "jsonl", rows)))
    assert resolve_fields(records) == ("messages", "messages")
    odd = [{"q": "Why tiles?", "a": "Fast memory."}] * 3
    records = load_records(str(_write(tmp_path, "json", odd)))
    assert resolve_fields(records, prompt_field="q", response_field="a") == ("pair", "q", "a")
    with pytest.raises(UsageError, match="--response-field 'answer' is not a column"):
        resolve_fields(records, prompt_field="q", response_field="answer")


def test_packing_bins_and_flattening_collator(tokenizer):
    dataset, collator, _ = build_train_dataset(tokenizer, None, seq_len=128, packing=True, max_docs=20)
    assert isinstance(collator, PackedCollator)
    assert all(sum(len(d["input_ids"]) for d in row["docs"]) <= 128 for row in dataset.rows)
    batch = collator([dataset[0], dataset[1]])
    docs = dataset[0]["docs"] + dataset[1]["docs"]
    lengths = [len(d["input_ids"]) for d in docs]
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert batch["cu_seq_lens_q"].tolist()[-1] == sum(lengths) and batch["max_length_q"] == max(lengths)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    assert all(batch["position_ids"][0, s] == 0 for s in starts)  # positions restart per document
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts)  # no loss across a boundary


def test_default_data_is_the_standard_library_docstrings(tokenizer):
    records = load_records(None)
    assert len(records) > 500 and records == load_records(None)  # same documents, same order, every time
    assert records[0]["text"].startswith("builtins")


@needs_datasets
def test_too_little_data_for_one_block(tmp_path, tokenizer):
    path = _write(tmp_path, "jsonl", [{"text": "short"}])
    with pytest.raises(UsageError, match="fewer than one --seq-len row of 512"):
        build_train_dataset(tokenizer, str(path), seq_len=512)
    dataset, _, _ = build_train_dataset(tokenizer, str(path), seq_len=512, packing=True)
    assert len(dataset) == 1  # packing takes documents of any length


def test_lognormal_lengths_are_long_tailed_clipped_and_seeded(tokenizer):
    docs = synthetic_sequences("lognormal:40:1.0:400", max_len=300, vocab_size=1000, seed=5)
    lengths = sorted(len(ids) for ids, _ in docs)
    assert len(docs) == 400 and 2 <= lengths[0] and lengths[-1] == 300  # clipped: some would be longer
    assert 30 <= lengths[200] <= 55 and lengths[360] > 2 * lengths[200]  # median ~40, a long tail
    assert all(ids == labels and max(ids) < 1000 for ids, labels in docs)
    assert docs == synthetic_sequences("lognormal:40:1.0:400", max_len=300, vocab_size=1000, seed=5)
    assert [len(i) for i, _ in synthetic_sequences("lognormal:64:0:3", 64, 10)] == [64, 64, 64]  # sigma 0: exact


@pytest.mark.parametrize("spec", ["lognormal:600:1.0", "normal:600:1:10", "lognormal:1:1:10", "lognormal:6:x:10"])
def test_bad_lengths_name_the_accepted_form(spec):
    with pytest.raises(UsageError, match=r"--lengths .*expected lognormal:MEDIAN:SIGMA:N"):
        parse_lengths(spec)


def test_padded_and_packed_layouts_hold_the_same_documents(tokenizer):
    kwargs = dict(seq_len=64, lengths="lognormal:20:0.8:9", vocab_size=len(tokenizer), max_doc_len=40)
    padded, pad_collator, n_padded = build_train_dataset(tokenizer, layout="padded", **kwargs)
    packed, _, n_packed = build_train_dataset(tokenizer, layout="packed", **kwargs)
    assert isinstance(pad_collator, PaddedCollator) and n_padded == n_packed
    docs = [row["input_ids"] for row in padded.rows]
    assert docs == [d["input_ids"] for row in packed.rows for d in row["docs"]] and len(docs) == 9
    assert max(len(d) for d in docs) <= 40
    batch = pad_collator([padded[0], padded[1], padded[2]])
    lengths = [len(d) for d in docs[:3]]
    assert batch["input_ids"].shape == (3, max(lengths)) and batch["attention_mask"].sum(1).tolist() == lengths
    for row, n in enumerate(lengths):  # right padding, and no loss on a pad
        assert batch["labels"][row, n:].eq(IGNORE_INDEX).all() and batch["labels"][row, :n].tolist() == docs[row]
    with pytest.raises(UsageError, match="--max-doc-len 100 is above --seq-len 64"):
        build_train_dataset(tokenizer, layout="packed", **{**kwargs, "max_doc_len": 100})
