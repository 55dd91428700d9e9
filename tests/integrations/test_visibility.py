"""One visibility rule (hf_flash.ops.visibility) and its users agree, and agree with the tests' own oracle.

Users: the PyTorch reference's ``visible_mask``, the SDPA fallback's dense and varlen masks, the sm75 path's
``simplify_mask`` and the integration's padded masks (built from its routing plan). The oracle
(``tests/ops/flash_oracle.py``) is written from the API contract and shares no code with them.
"""

import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import torch

from hf_flash import dispatch, fallback
from hf_flash.integrations import transformers as integration
from hf_flash.ops import reference


def _load_oracle():
    """tests/ops/flash_oracle.py (the kernel tests' directory is not on this one's import path)."""
    if "flash_oracle" not in sys.modules:
        path = Path(__file__).parents[1] / "ops" / "flash_oracle.py"
        spec = importlib.util.spec_from_file_location("flash_oracle", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["flash_oracle"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["flash_oracle"]


flash_oracle = _load_oracle()

CAUSAL = (False, True)
WINDOWS = ((-1, -1), (0, 0), (2, 0), (0, 2), (3, 1), (1, 4), (2, -1), (-1, 1))
LENGTHS = ((5, 5), (3, 7), (7, 3), (1, 6), (6, 1), (4, 0), (0, 4))  # (Lq, Lk): Lq != Lk, decode, empty
GRID = list(itertools.product(CAUSAL, WINDOWS))


def ids(causal, window):
    return f"{'causal' if causal else 'full'}-win{window[0]},{window[1]}"


def dense(len_q, len_k, causal, window):
    """The rule's dense form (reference.visible_mask), None spelled out as all True."""
    visible = reference.visible_mask(len_q, len_k, causal, window)
    return torch.ones(len_q, len_k, dtype=torch.bool) if visible is None else visible


@pytest.mark.parametrize("causal, window", GRID, ids=[ids(*case) for case in GRID])
def test_dense_users_agree_with_the_oracle(causal, window):
    for len_q, len_k in LENGTHS:
        expected = flash_oracle.visible_mask(len_q, len_k, causal, window)
        name = (len_q, len_k, causal, window)
        assert torch.equal(dense(len_q, len_k, causal, window), expected), name
        sdpa = fallback.dense_visibility(2, len_q, len_k, causal, window, "cpu")
        assert torch.equal(expected.expand(2, 1, len_q, len_k) if sdpa is None else sdpa, expected.expand(2, 1, -1, -1))
        # the sm75 path's simplification shows the same keys
        simple_causal, simple_window = dispatch.simplify_mask(causal, window, len_q, len_k)
        assert torch.equal(flash_oracle.visible_mask(len_q, len_k, simple_causal, simple_window), expected), name


def _cu(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


@pytest.mark.parametrize("causal, window", GRID, ids=[ids(*case) for case in GRID])
def test_varlen_mask_is_each_sequence_alone_on_the_diagonal(causal, window):
    lens_q, lens_k = (3, 0, 5, 1, 4), (5, 2, 5, 4, 2)  # Lq < Lk, an empty sequence, Lq > Lk
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    got = fallback.varlen_visibility(cu_q, cu_k, sum(lens_q), sum(lens_k), causal, window)[0, 0]
    expected = torch.block_diag(*(flash_oracle.visible_mask(lq, lk, causal, window) for lq, lk in zip(lens_q, lens_k)))
    assert torch.equal(got, expected)


def _padded_cases():
    """(name, len_q, key mask [B, Lk]): training batches (Lq = Lk, left/right padding), a decode step, a chunk of
    new tokens after a cache (left padding)."""
    lengths = (6, 4, 1)
    left = torch.tensor([[i >= 6 - n for i in range(6)] for n in lengths])
    right = torch.tensor([[i < n for i in range(6)] for n in lengths])
    chunk = torch.tensor([[i >= 6 - n for i in range(6)] for n in (6, 4, 3)])
    return [("left", 6, left), ("right", 6, right), ("decode", 1, left), ("chunk", 3, chunk)]


@pytest.mark.parametrize("case", _padded_cases(), ids=lambda case: case[0])
@pytest.mark.parametrize("causal, window", GRID, ids=[ids(*case) for case in GRID])
def test_padded_mask_is_each_row_alone_on_its_real_tokens(case, causal, window):
    """The integration's padded mask (eager fallback, sm75 SDPA path) from its routing plan: in each row the
    real queries see the row's real keys by the rule, and nothing else is visible."""
    _, len_q, key_mask = case
    batch, len_k = key_mask.shape
    used_k, plan = integration._route(batch, len_q, len_k, key_mask, {})
    assert used_k == len_k and plan is not None
    got = integration._padded_visibility(plan, batch, len_q, len_k, causal, window, "cpu")[:, 0]
    for row in range(batch):
        real_k = key_mask[row].nonzero().flatten()
        real_q = torch.arange(len_q) if len_q == 1 else key_mask[row, -len_q:].nonzero().flatten()
        expected = torch.zeros(len_q, len_k, dtype=torch.bool)
        if len(real_k):
            expected[real_q[:, None], real_k] = flash_oracle.visible_mask(len(real_q), len(real_k), causal, window)
        assert torch.equal(got[row], expected), (row, got[row].int(), expected.int())
