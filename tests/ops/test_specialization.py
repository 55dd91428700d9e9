"""No compile stalls in steady training: a pass over batches of any lengths compiles each kernel once per
(dtype, head dim, flags), plus a small finite set of length-derived constexprs.

Triton compiles a kernel once per *specialization key*: its constexprs, the launch options, and for every
other argument its type plus, unless the argument is in ``do_not_specialize``, whether an integer is 1 or a
multiple of 16 and whether a pointer is 16-byte aligned. A length among those (or a stride made of one, as
the LSE's ``[H, total_q]`` is) makes every new batch a chance to compile again (2-4 s on an H100).

On the CPU nothing is compiled, so the test computes the key itself: the launchers run with every kernel
replaced by a recorder, and each recorded launch goes through Triton's own argument binder
(``create_function_from_signature``, what ``JITFunction.run`` calls before it looks up its cache) for an sm90
target. The keys may differ only in these length-derived constexprs, a finite set each:

* the forward's tiles: ``ChipTable.fwd_short`` up to ``SHORT_SEQLEN`` queries, ``fwd`` above (2 configs);
* ``DIAG_IN_LOOP`` of the forward, dK/dV and dQ: dense causal lengths that are multiples of the blocks (2 values);
* ``TMA_HEAD_MAJOR`` on TMA chips: a ``[B, H, L, D]`` KV cache read head-major, except at L = 1 where its
  heads sit side by side in a row (2 values; not on the CPU, which has no TMA).

On a GPU, ``test_no_recompile_over_lengths_gpu`` counts the entries of the kernels' real caches instead.
"""

import pytest
import torch

from hf_flash import flash_attn_func, flash_attn_varlen_func
from hf_flash.ops import backward, config, forward
from hf_flash.ops.common import UNSPECIALIZED

KERNELS = {"fwd": (forward, "_fwd_kernel"), "delta": (backward, "_bwd_delta"), "dkdv": (backward, "_bwd_dkdv"),
           "dq": (backward, "_bwd_dq")}  # fmt: skip
ORIGINALS = {name: getattr(module, attr) for name, (module, attr) in KERNELS.items()}  # before any recorder
H, HK, D = 4, 2, 64  # H * D % 16 == 0, as for every real model: dense batch strides keep their class

# (lengths_q, lengths_k) of varlen batches: lengths and totals 1, multiples of 16 and odd, max_seqlen too
VARLEN_BATCHES = [([5, 17], [5, 17]), ([16, 16], [16, 16]), ([1], [1]), ([32], [32]), ([48, 3, 13], [48, 3, 13]),
                  ([100, 28], [100, 28]), ([7, 0, 9], [7, 4, 9]), ([1, 1, 1], [64, 80, 15]), ([31, 33], [31, 33])]
DENSE_LENGTHS = [1, 15, 16, 17, 32, 33, 64, 100, 128, 129]


def _binder(kernel, do_not_specialize=None):
    """Triton's argument binder of ``kernel`` for an sm90 target: ``binder(*args, **kwargs)`` returns
    ``(bound, specialization, options)``. Under the interpreter the kernel is an InterpretedFunction; the
    JITFunction ``@triton.jit`` would have built is made from its function and decorator arguments."""
    from triton.runtime.jit import JITFunction

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError as err:
        pytest.skip(f"this Triton has no create_function_from_signature / make_backend: {err}")
    if isinstance(kernel, JITFunction):
        options = {"do_not_specialize": kernel.do_not_specialize}
    else:
        options = {k: v for k, v in kernel.kwargs.items() if k in ("do_not_specialize", "do_not_specialize_on_alignment")}
    if do_not_specialize is not None:
        options["do_not_specialize"] = do_not_specialize
    jit = JITFunction(kernel.fn, **options)
    return create_function_from_signature(jit.signature, jit.params, make_backend(GPUTarget("cuda", 90, 32)))


@pytest.fixture
def launches(monkeypatch):
    """Replace the kernels by recorders and the CPU's interpreter tiles by the sm90 table; returns the list
    that receives ``(kernel name, args, kwargs)`` per launch."""
    if torch.cuda.is_available():  # the recorded calls use CPU tensors, which only the interpreter's path takes
        pytest.skip("records launches of CPU tensors; test_no_recompile_over_lengths_gpu is the GPU's check")
    log = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: log.append((self.name, args, kwargs))

    for name, (module, attr) in KERNELS.items():
        monkeypatch.setattr(module, attr, Recorder(name))
    monkeypatch.setattr(config, "_pick", lambda kernel, head_dim, device, max_seqlen_q=None, varlen=False:
                        config.SM90.config(kernel, head_dim, max_seqlen_q, varlen))  # fmt: skip
    return log


def _step(fn, *tensors):
    leaves = [t.requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(torch.zeros_like(out))


def _run_pass(part: str, causal: bool = True):
    """Forward and backward over batches of many lengths, of one kind (``part``): varlen batches of
    VARLEN_BATCHES, dense batches of DENSE_LENGTHS, or decoding steps over a growing ``[B, Hk, L, D]`` KV
    cache (Transformers' layout, transposed)."""
    if part == "varlen":
        for lengths_q, lengths_k in VARLEN_BATCHES:
            cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32)
                          for n in (lengths_q, lengths_k))  # fmt: skip
            q = torch.zeros(sum(lengths_q), H, D, dtype=torch.float16)
            k, v = (torch.zeros(sum(lengths_k), HK, D, dtype=torch.float16) for _ in range(2))
            max_q, max_k = max(lengths_q), max(lengths_k)
            _step(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal),  # noqa: B023
                  q, k, v)
    for length in DENSE_LENGTHS if part != "varlen" else ():
        if part == "dense":
            q, k, v = (torch.zeros(2, length, n, D, dtype=torch.float16) for n in (H, HK, HK))
            _step(lambda q, k, v: flash_attn_func(q, k, v, causal=causal), q, k, v)
        else:
            q = torch.zeros(2, 1, H, D, dtype=torch.float16)
            k, v = (torch.zeros(2, HK, length, D, dtype=torch.float16) for _ in range(2))
            _step(lambda q, k, v: flash_attn_func(q, k.transpose(1, 2), v.transpose(1, 2), causal=causal), q, k, v)


def _keys(log, binders):
    """Per kernel: {specialization key: its constexprs and options}, and {argument: the classes it took}
    for the non-constexpr arguments (type and 1 / multiple of 16 / 16-byte alignment)."""
    keys, runtime = {}, {}
    for name, args, kwargs in log:
        bound, spec, options = binders[name](*args, **kwargs)
        spec = [tuple(s) for s in spec]
        constexprs = tuple(s for s in spec if s[0] == "constexpr")
        keys.setdefault(name, {})[(repr(spec), repr(sorted(options.items())))] = (constexprs, repr(options))
        classes = runtime.setdefault(name, {})
        for arg, s in zip(bound, spec):
            if s[0] != "constexpr":
                classes.setdefault(arg, set()).add(s)
    return keys, runtime


def _varying(classes: dict) -> dict:
    return {arg: sorted(map(repr, c)) for arg, c in classes.items() if len(c) > 1}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("part", ["varlen", "dense", "decode"])
def test_lengths_do_not_reach_the_specialization(launches, part, causal, monkeypatch):
    binders = {name: _binder(kernel) for name, kernel in ORIGINALS.items()}
    _run_pass(part, causal)
    keys, runtime = _keys(launches, binders)
    # the delta kernel runs only with atomic dQ (else the dQ kernel computes delta): a second pass on that
    # path, of which only the delta kernel's launches are counted (its dK/dV has ATOMIC_DQ on, another key)
    launches.clear()
    monkeypatch.setattr("hf_flash.ops.function.ATOMIC_DQ_MIN_HEAD_DIM", 1)
    _run_pass(part, causal)
    atomic_keys, atomic_runtime = _keys([launch for launch in launches if launch[0] == "delta"], binders)
    assert "delta" not in keys and set(atomic_keys) == {"delta"}, f"kernels launched: {sorted(keys)}, {sorted(atomic_keys)}"
    keys.update(atomic_keys)
    runtime.update(atomic_runtime)
    assert set(keys) == set(KERNELS), f"kernels launched: {sorted(keys)}"
    for name in KERNELS:
        assert not _varying(runtime[name]), (
            f"{name}: arguments specialized differently as the lengths changed (missing from UNSPECIALIZED?): "
            f"{_varying(runtime[name])}"
        )
        # every key is a distinct set of constexprs / launch options: the finite length-derived ones above
        assert len({v for v in keys[name].values()}) == len(keys[name])
    # the finite sets: the forward's short/long tiles (all lengths here are short), DIAG_IN_LOOP (dense
    # causal lengths that are multiples of the blocks: 64 and 128 here)
    assert len(keys["delta"]) == 1
    diag = part == "dense" and causal
    assert len(keys["fwd"]) == len(keys["dkdv"]) == len(keys["dq"]) == (2 if diag else 1), {
        n: len(k) for n, k in keys.items()}


def test_long_queries_add_one_forward_config(launches):
    """Above SHORT_SEQLEN queries the forward takes the table's long-sequence tiles: one more key, and no
    more however long the sequences get."""
    binder = _binder(ORIGINALS["fwd"])
    for total in (config.SHORT_SEQLEN - 1, config.SHORT_SEQLEN + 1, config.SHORT_SEQLEN + 16, 3 * 1024):
        cu = torch.tensor([0, total], dtype=torch.int32)
        q, kv = torch.zeros(total, H, D, dtype=torch.float16), torch.zeros(total, HK, D, dtype=torch.float16)
        flash_attn_varlen_func(q, kv, kv, cu, cu, total, total, causal=True)
    specs = {repr(binder(*args, **kwargs)[1:]) for _, args, kwargs in launches}
    assert len(specs) == 2


def test_the_check_sees_length_specialization(launches, monkeypatch):
    """The same pass with only the dropout seed unspecialized (before UNSPECIALIZED): the check must see
    the lengths, or it proves nothing. Twice, the second time with atomic dQ (the delta kernel's path)."""
    binders = {name: _binder(kernel, do_not_specialize=["seed"]) for name, kernel in ORIGINALS.items()}
    _run_pass("varlen")
    monkeypatch.setattr("hf_flash.ops.function.ATOMIC_DQ_MIN_HEAD_DIM", 1)
    _run_pass("varlen")
    _, runtime = _keys(launches, binders)
    assert all(_varying(runtime[name]) for name in KERNELS), {name: _varying(c) for name, c in runtime.items()}


def test_unspecialized_names_are_kernel_arguments():
    """A misspelt name in UNSPECIALIZED would be ignored by Triton without a word."""
    import inspect

    names = set().union(*(inspect.signature(kernel.fn).parameters for kernel in ORIGINALS.values()))
    assert set(UNSPECIALIZED) <= names, set(UNSPECIALIZED) - names


@pytest.mark.gpu
def test_no_recompile_over_lengths_gpu(device):
    """On a GPU: after one varlen and one dense forward + backward, batches of other lengths (1, multiples
    of 16, odd; totals alike) add nothing to the kernels' caches."""
    kernels = {name: getattr(module, attr) for name, (module, attr) in KERNELS.items()}

    def entries():
        return {name: sum(len(e[0]) for e in k.device_caches.values()) for name, k in kernels.items()}

    def varlen(lengths):
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        q = torch.randn(sum(lengths), H, D, device=device, dtype=torch.bfloat16, requires_grad=True)
        kv = torch.randn(sum(lengths), HK, D, device=device, dtype=torch.bfloat16, requires_grad=True)
        flash_attn_varlen_func(q, kv, kv, cu, cu, max(lengths), max(lengths), causal=True).sum().backward()

    def dense(length):
        q = torch.randn(2, length, H, D, device=device, dtype=torch.bfloat16, requires_grad=True)
        kv = torch.randn(2, length + 3, HK, D, device=device, dtype=torch.bfloat16, requires_grad=True)
        flash_attn_func(q, kv, kv, causal=True).sum().backward()  # Lk = Lq + 3: never DIAG_IN_LOOP

    varlen([37, 5])
    dense(37)
    before = entries()
    for lengths in ([16], [1], [32, 16], [100, 28], [7, 9, 1], [48, 3, 13], [255, 257], [64, 64, 64]):
        varlen(lengths)
    for length in (1, 16, 17, 32, 100, 128, 255):
        dense(length)
    assert entries() == before, f"compiled again: {before} -> {entries()}"


def test_recorder_covers_the_launchers():
    """The kernels the test replaces are the ones the launchers call (a renamed kernel would escape it)."""
    import inspect

    source = "".join(inspect.getsource(f) for f in (forward.flash_fwd, backward.flash_bwd, backward.flash_delta))
    for _module, attr in KERNELS.values():
        assert f"{attr}[" in source, attr
