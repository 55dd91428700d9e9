"""Padding / packing helpers and the SDPA fallback functions, without Transformers or kernels."""

import warnings

import pytest
import torch

from hf_flash import fallback
from hf_flash.integrations.padding import mask_to_varlen, pad, sequence_starts, unpad, varlen_from_position_ids
from hf_flash.ops.reference import attention_ref, attention_ref_varlen


def test_unpad_pad_round_trip_left_and_right_padding():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    packed, indices, cu, max_len = unpad(x, mask)
    assert packed.shape == (7, 3)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 7]
    assert max_len == 4 and isinstance(max_len, int)
    assert torch.equal(packed, x[mask.bool()])
    back = pad(packed, indices, 2, 5)
    assert torch.equal(back, x * mask[..., None])


def test_unpad_names_the_mask_on_shape_mismatch():
    with pytest.raises(ValueError, match="mask must have shape"):
        unpad(torch.zeros(2, 5, 3), torch.ones(2, 4))


def test_pad_keeps_gradients_of_real_tokens_only():
    x = torch.randn(2, 4, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    packed, indices, _, _ = unpad(x, mask)
    pad(packed * 2, indices, 2, 4).sum().backward()
    assert torch.equal(x.grad, 2 * mask[..., None].float().expand(2, 4, 3))


def test_mask_to_varlen_counts_all_padding_rows():
    indices, cu, max_len = mask_to_varlen(torch.tensor([[0, 0, 0], [1, 1, 0]]))
    assert cu.tolist() == [0, 0, 2] and indices.tolist() == [3, 4] and max_len == 2


def test_sequence_starts_splits_where_positions_do_not_grow_by_one():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 5, 6, 7, 3]])
    starts = sequence_starts(position_ids)
    assert starts.int().tolist() == [[1, 0, 0, 1, 0, 1, 0, 0, 1]]


def test_varlen_from_position_ids():
    packed = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, max_len = varlen_from_position_ids(packed)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 9] and max_len == 4
    # rows of one sequence each (any offset, e.g. a chunk after a cache) are not packed
    assert varlen_from_position_ids(torch.arange(4, 10).expand(2, -1)) is None
    # two rows, the second packed: rows are laid one after the other
    cu, max_len = varlen_from_position_ids(torch.tensor([[0, 1, 2, 3], [0, 1, 0, 1]]))
    assert cu.tolist() == [0, 4, 6, 8] and max_len == 4


CASES = [
    # (Lq, Lk, causal, window, softcap, groups)
    (7, 7, True, (-1, -1), 0.0, 1),
    (3, 9, True, (-1, -1), 0.0, 2),
    (9, 9, True, (3, 0), 0.0, 2),
    (9, 9, False, (2, 2), 0.0, 1),
    (5, 5, True, (-1, -1), 2.0, 2),
    (6, 4, True, (-1, -1), 0.0, 1),  # Lq > Lk: the first rows see no key and output 0
]


@pytest.mark.parametrize("lq,lk,causal,window,softcap,groups", CASES)
def test_sdpa_fallback_matches_reference(lq, lk, causal, window, softcap, groups):
    torch.manual_seed(0)
    q = torch.randn(2, lq, 4, 8)
    k, v = torch.randn(2, lk, 4 // groups, 8), torch.randn(2, lk, 4 // groups, 8)
    options = {"softmax_scale": 0.3, "causal": causal, "window_size": window, "softcap": softcap}
    out = fallback.sdpa_flash_attn_func(q, k, v, **options)
    torch.testing.assert_close(out, attention_ref(q, k, v, **options), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal,window,softcap", [(True, (-1, -1), 0.0), (True, (2, 0), 0.0), (False, (-1, -1), 1.5)])
def test_sdpa_varlen_fallback_matches_reference(causal, window, softcap):
    torch.manual_seed(0)
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32)  # an empty sequence in the middle
    cu_k = torch.tensor([0, 5, 7, 12], dtype=torch.int32)
    q, k, v = torch.randn(8, 4, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    options = {"causal": causal, "window_size": window, "softcap": softcap}
    out = fallback.sdpa_flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 5, **options)
    expected = attention_ref_varlen(q, k, v, cu_q, cu_k, 5, 5, **options)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_report_fallback_warns_once_per_reason(monkeypatch):
    monkeypatch.delenv("HF_FLASH_STRICT", raising=False)
    fallback.reset_warnings()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            fallback.report_fallback("reason A")
        fallback.report_fallback("reason B")
    messages = [str(w.message) for w in record if w.category is fallback.FallbackWarning]
    assert len(messages) == 2 and "reason A" in messages[0] and "reason B" in messages[1]
    fallback.reset_warnings()


def test_strict_mode_raises(monkeypatch):
    monkeypatch.setenv("HF_FLASH_STRICT", "1")
    with pytest.raises(fallback.FallbackError, match="HF_FLASH_STRICT=1"):
        fallback.report_fallback("reason C")


def test_kernel_unavailable_reason(monkeypatch):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU, the interpreter stands in for a GPU
    q16 = torch.zeros(1, 2, 2, 16, dtype=torch.float16, device=device)
    assert "float32" in fallback.kernel_unavailable_reason(q16.float())
    wide = torch.zeros(1, 1, 1, 512, dtype=torch.float16, device=device)
    assert "head dim" in (fallback.kernel_unavailable_reason(wide) or "")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "TRITON_INTERPRET" in fallback.kernel_unavailable_reason(q16)
