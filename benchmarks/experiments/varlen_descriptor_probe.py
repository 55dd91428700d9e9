"""Compile probe (no GPU): a Gluon program builds TMA descriptors over its own packed sequence on the device
(``tma.make_tensor_descriptor``: ``[H, len, D]`` of ``[total, H, D]`` from ``cu_seqlens``), so a box past the
sequence's end is zero-filled and a store past it dropped: the varlen form of the Hopper kernels' 4D boxes
(PLAN). Prints the Triton version and the program's global scratch (the descriptors' 128 bytes each: at run time
``triton.set_allocator`` must provide it).

    python benchmarks/experiments/varlen_descriptor_probe.py   # Triton 3.6 and 3.9: "ok", 256 bytes
"""
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon._runtime import GluonASTSource

tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global


@gluon.jit
def _copy(desc, o_desc, h, row, bar, buf):
    mbarrier.expect(bar, desc.block_type.nbytes)
    tma_load(desc, [h, row, 0], bar, buf)
    mbarrier.wait(bar, 0)
    fence_async_shared()
    tma_store(o_desc, [h, row, 0], buf)
    tma.store_wait(0)


@gluon.jit
def probe(q_ptr, o_ptr, cu_ptr, n_heads, D: gl.constexpr):
    seq = gl.program_id(0)
    h = gl.program_id(1)
    start = gl.load(cu_ptr + seq)
    end = gl.load(cu_ptr + seq + 1)
    layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, 64, D], gl.bfloat16)
    # this sequence's tokens as [H, len, D]: a box past its end is zero-filled, a store past it dropped
    q_desc = tma.make_tensor_descriptor(q_ptr + start.to(gl.int64) * n_heads * D, [n_heads, end - start, D],
                                        [D, n_heads * D, 1], [1, 64, D], layout)
    o_desc = tma.make_tensor_descriptor(o_ptr + start.to(gl.int64) * n_heads * D, [n_heads, end - start, D],
                                        [D, n_heads * D, 1], [1, 64, D], layout)
    buf = gl.allocate_shared_memory(gl.bfloat16, [1, 64, D], layout)
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    _copy(q_desc, o_desc, h, 0, bar, buf)


sig = {"q_ptr": "*bf16", "o_ptr": "*bf16", "cu_ptr": "*i32", "n_heads": "i32", "D": "constexpr"}
aligned = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}
src = GluonASTSource(probe, sig, constexprs={"D": 128}, attrs=aligned)
c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print("ok", triton.__version__, "global scratch", getattr(c.metadata, "global_scratch_size", "?"), "bytes")
