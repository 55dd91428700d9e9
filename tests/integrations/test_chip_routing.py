"""The per-chip choice between hf_flash's kernels and PyTorch SDPA (hf_flash/dispatch.py), on CPU.

A T4 (sm75) is simulated: ``dispatch.chip_of`` answers with the sm75 table for CPU tensors (the kernels
still run in Triton's interpreter), and ``torch.nn.attention.sdpa_kernel`` is replaced by a recorder so
that the SDPA path runs on CPU while the test sees which backends it was restricted to.
"""

import contextlib
import io
import itertools
import warnings

import pytest
import torch
from _tiny import DEVICE, make_model, pad_batch, positions, tokens
from conftest import assert_close_rel

from hf_flash import dispatch, fallback
from hf_flash.integrations import transformers as integration
from hf_flash.ops import config
from hf_flash.ops.reference import attention_ref

T4 = "Tesla T4"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("HF_FLASH_STRICT", raising=False)
    monkeypatch.delenv(dispatch.SM75_PATH_ENV, raising=False)
    fallback.reset_warnings()
    yield
    fallback.reset_warnings()


def dense(**overrides) -> dispatch.Call:
    """A causal self-attention call of 64 tokens, fp16, head dim 64, changed by ``overrides``."""
    return dispatch.Call(**{"dtype": torch.float16, "head_dim": 64, "value_dim": 64, "len_q": 64, "len_k": 64,
                            "causal": True, **overrides})  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The decision as a pure function of chip table, dtype and call options
# ------------------------------------------------------------------------------------------------

SDPA_CALLS = {  # id -> a call SDPA's memory-efficient kernel serves with no mask on a T4
    "causal": dense(),
    "bidirectional-Lq<Lk": dense(causal=False, len_q=17, len_k=80),
    "decode-Lq1": dense(len_q=1, len_k=300),
    "window-wider-than-keys": dense(window=(4095, 0)),
}
KERNEL_CALLS = {  # id -> (call, words the reason must contain)
    "padded-or-packed": (dense(masked=True), "O(L^2) mask"),
    "sliding-window": (dense(window=(15, 0)), "sliding window"),
    "bidirectional-window": (dense(causal=False, window=(8, 8)), "sliding window"),
    "causal-chunk-Lq<Lk": (dense(len_q=16, len_k=80), "bottom-right"),
    "softcap": (dense(softcap=30.0), "softcap"),
    "deterministic": (dense(deterministic=True), "deterministic"),
    "head-dim-59": (dense(head_dim=59, value_dim=59), "multiple of 8"),
    "value-dim-60": (dense(value_dim=60), "multiple of 8"),
    "bf16": (dense(dtype=torch.bfloat16), "bfloat16"),
    "empty": (dense(len_q=0, len_k=0), "empty"),
}


@pytest.mark.parametrize("call", SDPA_CALLS.values(), ids=SDPA_CALLS.keys())
def test_sm75_sends_calls_that_need_no_mask_to_sdpa(call):
    path, why = dispatch.choose(config.SM75, call)
    assert path == dispatch.SDPA and "tensor cores" in why


@pytest.mark.parametrize("call, words", KERNEL_CALLS.values(), ids=KERNEL_CALLS.keys())
def test_sm75_keeps_calls_sdpa_cannot_serve_in_o_l_on_the_kernels(call, words):
    path, why = dispatch.choose(config.SM75, call)
    assert path == dispatch.KERNELS and words in why, why


@pytest.mark.parametrize("table", [config.SM80, config.SM86, config.SM90], ids=lambda t: t.name)
@pytest.mark.parametrize("mode", dispatch.SM75_PATHS)
def test_chips_with_tensor_cores_always_run_the_kernels(table, mode):
    for call in SDPA_CALLS.values():
        assert dispatch.choose(table, call, mode)[0] == dispatch.KERNELS


def test_modes_kernels_and_sdpa():
    assert dispatch.choose(config.SM75, dense(), "kernels") == (dispatch.KERNELS, "HF_FLASH_SM75_PATH=kernels")
    for call, _ in KERNEL_CALLS.values():
        expected = dispatch.KERNELS if dispatch._sdpa_cannot(call) else dispatch.SDPA
        assert dispatch.choose(config.SM75, call, "sdpa")[0] == expected
    assert dispatch.choose(config.SM75, dense(masked=True, window=(3, 0)), "sdpa")[0] == dispatch.SDPA
    assert dispatch.choose(config.SM75, dense(softcap=5.0), "sdpa")[0] == dispatch.KERNELS


@pytest.mark.parametrize("len_q, len_k", [(1, 1), (1, 9), (5, 5), (4, 9), (9, 4)])
def test_simplify_mask_keeps_exactly_the_same_visible_keys(len_q, len_k):
    """Every (causal, window) on small shapes: the simplified pattern shows the same keys to every query."""

    def pattern(causal, window):
        visible = fallback.dense_visibility(1, len_q, len_k, causal, window, "cpu")
        return torch.ones(1, 1, len_q, len_k, dtype=torch.bool) if visible is None else visible

    for causal, left, right in itertools.product((False, True), range(-1, 11), range(-1, 11)):
        simple_causal, simple_window = dispatch.simplify_mask(causal, (left, right), len_q, len_k)
        assert torch.equal(pattern(causal, (left, right)), pattern(simple_causal, simple_window)), (
            causal, left, right, simple_causal, simple_window)
    assert dispatch.simplify_mask(True, (-1, -1), 1, 9) == (False, (-1, -1))  # decoding needs no causal mask
    assert dispatch.simplify_mask(True, (99, 0), len_k, len_k) == (len_k > 1, (-1, -1))


@pytest.mark.parametrize("value, expected", [(None, "auto"), ("", "auto"), ("kernels", "kernels"),
                                             (" SDPA ", "sdpa"), ("auto", "auto")])
def test_sm75_path_setting(value, expected, monkeypatch):
    if value is not None:
        monkeypatch.setenv(dispatch.SM75_PATH_ENV, value)
    assert dispatch.sm75_path() == expected


def test_bad_sm75_path_names_the_variable_and_the_values(monkeypatch):
    monkeypatch.setenv(dispatch.SM75_PATH_ENV, "cuda-cores")
    with pytest.raises(ValueError, match=r"HF_FLASH_SM75_PATH must be one of auto, kernels, sdpa.*'cuda-cores'"):
        dispatch.sm75_path()


@pytest.mark.parametrize("capability, table", [((7, 5), "sm75"), ((8, 0), "sm80"), ((8, 9), "sm86"),
                                              ((9, 0), "sm90")])
def test_chip_of_follows_the_capability_and_a_forced_arch(capability, table, fake_gpu):
    device = fake_gpu(capability, name=T4)
    assert dispatch.chip_of(device).name == table
    assert dispatch.chip_of(torch.device("cpu")) is None
    config.force_arch("sm75")  # the fixture restores it
    assert dispatch.chip_of(device) is config.SM75


# ------------------------------------------------------------------------------------------------
# The Transformers integration on a simulated T4
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def t4(monkeypatch):
    """CPU tensors are routed as on a T4; returns the backends of every SDPA call recorded from now on."""
    monkeypatch.setattr(dispatch, "chip_of", lambda device: config.SM75)
    monkeypatch.setattr(dispatch, "device_name", lambda device: T4)
    sdpa_calls = []

    @contextlib.contextmanager
    def recording_sdpa_kernel(backends, *args, **kwargs):
        sdpa_calls.append(list(backends) if isinstance(backends, (list, tuple)) else [backends])
        yield  # no restriction: the CPU has no memory-efficient backend

    monkeypatch.setattr(torch.nn.attention, "sdpa_kernel", recording_sdpa_kernel)
    return sdpa_calls


def record_kernels(monkeypatch) -> list[str]:
    """Record "dense" / "varlen" for each call the integration makes to the kernels from now on.

    Call it after building models: Transformers 5.x caches the functions its flash loader got at load
    time, and a recorder must not end up there (other tests check that it holds hf_flash's own)."""
    calls = []

    def recording(name, func):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return func(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(integration, "flash_attn_func", recording("dense", integration.flash_attn_func))
    monkeypatch.setattr(integration, "flash_attn_varlen_func", recording("varlen", integration.flash_attn_varlen_func))
    return calls


def _layer():
    layer = torch.nn.Module()
    layer.is_causal, layer.training = True, False
    return layer


def _notices(record):
    return [str(w.message) for w in record if issubclass(w.category, dispatch.PathNotice)]


def _qkv(batch=2, length=24, heads=4, kv_heads=2, head_dim=16, seed=0):
    """``[B, H, L, D]`` query and ``[B, Hk, L, D]`` key/value in fp16, as Transformers passes them."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, head_dim, generator=generator)
    k, v = (torch.randn(batch, kv_heads, length, head_dim, generator=generator) for _ in range(2))
    return (t.to(DEVICE, torch.float16) for t in (q, k, v))


def test_dense_call_goes_to_sdpa_efficient_and_a_padded_one_to_the_kernels(t4, monkeypatch):
    from torch.nn.attention import SDPBackend

    sdpa_calls, kernel_calls = t4, record_kernels(monkeypatch)
    q, k, v = _qkv()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out, _ = integration.hf_flash_attention_forward(_layer(), q, k, v, None)
        assert (sdpa_calls, kernel_calls) == ([[SDPBackend.EFFICIENT_ATTENTION]], [])
        mask = torch.ones(2, 24, dtype=torch.bool, device=DEVICE)
        mask[0, :5] = False
        integration.hf_flash_attention_forward(_layer(), q, k, v, mask)
        assert len(sdpa_calls) == 1 and kernel_calls == ["varlen"]
        integration.hf_flash_attention_forward(_layer(), q, k, v, None, sliding_window=6)
        integration.hf_flash_attention_forward(_layer(), q, k, v, None, softcap=20.0)
        assert len(sdpa_calls) == 1 and kernel_calls == ["varlen", "dense", "dense"]
        training = _layer()
        training.training = True
        integration.hf_flash_attention_forward(training, q, k, v, None, dropout=0.1)  # dropout: SDPA has it
        assert len(sdpa_calls) == 2 and len(kernel_calls) == 3
    notices = _notices(record)
    assert len(notices) == 1, notices
    for words in (T4, "sm75", "memory-efficient", "padded/packed", "softcap", "HF_FLASH_SM75_PATH=kernels"):
        assert words in notices[0], (words, notices[0])
    assert not [w for w in record if issubclass(w.category, fallback.FallbackWarning)]
    expected = attention_ref(*(t.transpose(1, 2) for t in (q, k, v)), causal=True)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-3, rtol=2e-3)


def test_strict_mode_does_not_turn_the_chosen_path_into_an_error(t4, monkeypatch):
    monkeypatch.setenv("HF_FLASH_STRICT", "1")
    q, k, v = _qkv()
    with pytest.warns(dispatch.PathNotice):
        integration.hf_flash_attention_forward(_layer(), q, k, v, None)
    assert len(t4) == 1
    with pytest.raises(fallback.FallbackError, match="float32"):  # a real fallback still raises
        integration.hf_flash_attention_forward(_layer(), *(t.float() for t in (q, k, v)), None)


def test_sm75_path_kernels_keeps_dense_calls_on_the_kernels(t4, monkeypatch):
    monkeypatch.setenv(dispatch.SM75_PATH_ENV, "kernels")
    kernel_calls = record_kernels(monkeypatch)
    q, k, v = _qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("error", dispatch.PathNotice)
        integration.hf_flash_attention_forward(_layer(), q, k, v, None)
    assert (t4, kernel_calls) == ([], ["dense"])
    monkeypatch.setenv(dispatch.SM75_PATH_ENV, "fast")
    with pytest.raises(ValueError, match="HF_FLASH_SM75_PATH"):
        integration.hf_flash_attention_forward(_layer(), q, k, v, None)


def test_sm75_path_sdpa_runs_padded_batches_through_sdpa_with_a_mask(t4, monkeypatch):
    monkeypatch.setenv(dispatch.SM75_PATH_ENV, "sdpa")
    kernel_calls = record_kernels(monkeypatch)
    q, k, v = _qkv(seed=3)
    mask = torch.ones(2, 24, dtype=torch.bool, device=DEVICE)
    mask[1, :7] = False  # left padding
    with pytest.warns(dispatch.PathNotice, match="O\\(L\\^2\\) mask"):
        out, _ = integration.hf_flash_attention_forward(_layer(), q, k, v, mask, sliding_window=9)
    assert len(t4) == 1 and kernel_calls == []
    integration.hf_flash_attention_forward(_layer(), q, k, v, mask, softcap=30.0)
    assert kernel_calls == ["varlen"]  # softcap stays on the kernels even so
    for row in range(2):  # each row alone, without its pads: sliding_window=9 is flash-attn's (8, 0)
        real = [t[row : row + 1, :, mask[row]].transpose(1, 2) for t in (q, k, v)]
        expected = attention_ref(*real, causal=True, window_size=(8, 0))[0]
        torch.testing.assert_close(out[row, mask[row]].float(), expected.float(), atol=2e-3, rtol=2e-3)
    assert (out[~mask] == 0).all()


def test_rows_that_are_not_contiguous_stay_on_the_kernels(t4):
    """SDPA's memory-efficient kernel refuses a last dim with stride != 1, and only it is allowed."""
    q, k, v = (t.transpose(1, 2) for t in _qkv())  # [B, L, H, D]
    options = {"causal": True, "window_size": (-1, -1)}
    with pytest.warns(dispatch.PathNotice):
        assert dispatch.integration_path(q, k, v, False, options) == dispatch.SDPA
    strided = torch.empty(*q.shape[:-1], 2 * q.shape[-1], dtype=q.dtype, device=q.device)[..., ::2].copy_(q)
    assert dispatch.integration_path(strided, k, v, False, options) == dispatch.KERNELS


def test_the_chosen_path_compiles_without_graph_breaks(t4, monkeypatch):
    """Under torch.compile the notice waits for an eager call (a warning would break the graph)."""
    kernel_calls = record_kernels(monkeypatch)
    q, k, v = _qkv(seed=5)
    torch._dynamo.reset()
    compiled = torch.compile(integration.hf_flash_attention_forward, fullgraph=True, backend="eager")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out, _ = compiled(_layer(), q, k, v, None)
    torch._dynamo.reset()
    assert kernel_calls == [] and not _notices(record)
    expected = attention_ref(*(t.transpose(1, 2) for t in (q, k, v)), causal=True)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-3, rtol=2e-3)


def test_the_direct_api_always_runs_the_kernels(t4):
    from hf_flash import flash_attn_func

    q, k, v = (t.transpose(1, 2) for t in _qkv())
    flash_attn_func(q, k, v, causal=True)
    assert t4 == []


def test_tiny_llama_on_a_t4_matches_eager_through_both_paths(t4, monkeypatch):
    """A whole model: dense batches through SDPA, padded ones through the kernels, both as accurate as eager.
    float16, as a T4 user runs it (bf16 on sm75 is a fallback, whatever the test machine's default dtype)."""
    ours = make_model("llama", "hf_flash", dtype=torch.float16)
    eager, ref = make_model("llama", "eager", dtype=torch.float16), make_model("llama", "eager", dtype=torch.float32)
    ids = tokens(2, 20)
    padded, mask = pad_batch([tokens(1, 20, seed=4)[0], tokens(1, 11, seed=5)[0]], "left")
    kw = {"attention_mask": mask, "position_ids": positions(mask)}
    real = mask.bool()
    kernel_calls = record_kernels(monkeypatch)
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dense_out = ours(ids).logits
        assert (len(t4), kernel_calls) == (2, [])  # one SDPA call per layer
        padded_out = ours(padded, **kw).logits
        assert (len(t4), kernel_calls) == (2, ["varlen", "varlen"])
        assert_close_rel("dense via SDPA", dense_out, ref(ids).logits, eager(ids).logits, 2, eps=1e-3)
        assert_close_rel("padded via kernels", padded_out[real], ref(padded, **kw).logits[real],
                         eager(padded, **kw).logits[real], 2, eps=1e-3)  # fmt: skip
    assert len(_notices(record)) == 1


# ------------------------------------------------------------------------------------------------
# hf_flash.info / python -m hf_flash
# ------------------------------------------------------------------------------------------------


def test_info_on_a_t4_says_which_path_the_integration_takes_per_dtype(fake_gpu):
    from hf_flash.info import info, report

    fake_gpu((7, 5), name=T4)
    paths = report()["gpus"][0]["paths"]
    fp16, bf16 = paths["float16"]["transformers"], paths["bfloat16"]["transformers"]
    assert fp16["path"] == "sdpa-efficient+kernels"
    assert fp16["summary"] == (
        "SDPA memory-efficient for dense batches; hf_flash kernels for padded/packed/window/softcap")
    assert T4 in fp16["why"] and "tensor-core" in fp16["why"]
    assert bf16["path"] == "fallback" and "bfloat16" in bf16["why"]
    assert paths["float16"]["path"] == "kernels"  # the direct API: the kernels, on CUDA cores
    out = io.StringIO()
    info(file=out)
    text = out.getvalue()
    assert 'attn_implementation="hf_flash": SDPA memory-efficient for dense batches' in text, text
    assert "HF_FLASH_SM75_PATH auto" in text


def test_info_follows_hf_flash_sm75_path(fake_gpu, monkeypatch):
    from hf_flash.info import info, report

    fake_gpu((7, 5), name=T4)
    monkeypatch.setenv(dispatch.SM75_PATH_ENV, "kernels")
    assert report()["gpus"][0]["paths"]["float16"]["transformers"]["path"] == "kernels"
    monkeypatch.setenv(dispatch.SM75_PATH_ENV, "sideways")
    fp16 = report()["gpus"][0]["paths"]["float16"]["transformers"]
    assert fp16["path"] == "error" and "auto, kernels, sdpa" in fp16["why"]
    info(file=io.StringIO())  # a bad setting is reported, not raised


def test_info_on_an_a100_says_kernels_everywhere(fake_gpu):
    from hf_flash.info import report

    fake_gpu((8, 0), name="NVIDIA A100")
    paths = report()["gpus"][0]["paths"]
    assert paths["float16"]["transformers"]["path"] == paths["bfloat16"]["transformers"]["path"] == "kernels"
