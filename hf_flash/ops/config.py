"""Where the kernels can run, and with which tile sizes on each chip.

The kernels run on CUDA GPUs of compute capability 7.5 (T4) and newer through Triton, or on CPU tensors
through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before ``hf_flash`` was imported (slow:
for tests and debugging).

Tiles come from one :class:`ChipTable` per chip family, picked from the GPU's compute capability and its
shared memory per block (:func:`table_for`): a table is used only where its tiles fit. What differs:

* sm75 (T4, 64 KB): Triton lowers ``tl.dot`` to FMA on CUDA cores below sm80 (no ``mma.sync``), and
  an FMA dot holds whole operand rows in registers, so the tiles are small (at most 8 outputs per
  thread); only the backward at head dim 256 still spills (~2 KB per thread). There is no ``cp.async``
  either, so nothing to pipeline (one stage). No bfloat16.
* sm80 (A100, 163 KB) and sm86/sm89 (RTX 30/40, A10, L4, 99 KB): tensor cores with ``cp.async``
  pipelining; the 99 KB chips get fewer stages or narrower blocks.
* sm90 (H100/H200, 227 KB): the fastest tiles of a timed sweep on an H100. The other tables were fitted
  by cross-compiling (shared memory, registers) and checked for correctness on an H100, not timed.

``HF_FLASH_ARCH=sm75`` (or :func:`force_arch`) makes hf_flash treat the GPU as that chip: its tile table
and its dtype rules (never enabling what the real GPU lacks). It exists to run each chip's tiles on the
GPU at hand in tests; forcing a bigger chip's table than the GPU's shared memory allows fails at launch.
``tests/ops/test_chips.py`` cross-compiles every table for its chip and checks shared memory and spills.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
ARCH_ENV = "HF_FLASH_ARCH"
KB = 1024
SHORT_SEQLEN = 2048  # up to this many queries the forward may use ChipTable.fwd_short's tiles


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def explain_launch_error(exc: Exception, device: torch.device) -> None:
    """Given the error of a failed kernel launch, raise a one-line error in its place when the cause is known.
    Called only after a launch has failed, so it costs the hot path nothing."""
    if device.type == "cpu" and ("active drivers" in str(exc) or "cannot be accessed from Triton" in str(exc)):
        # Triton picks the interpreter when a kernel is decorated, at import: set later, the variable makes
        # hf_flash send CPU tensors to kernels built for a GPU, and Triton finds no GPU driver (or, on a
        # machine with a GPU, refuses the CPU pointers)
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after hf_flash (and Triton) were imported; set it before importing "
            "them, e.g. `TRITON_INTERPRET=1 python ...` or os.environ['TRITON_INTERPRET'] = '1' first thing"
        ) from None


# ------------------------------------------------------------------------------------------------
# Which chip: the GPU's own capability, or the one forced by HF_FLASH_ARCH / force_arch
# ------------------------------------------------------------------------------------------------


def parse_arch(arch: str) -> tuple[int, int]:
    """``"sm75"``, ``"sm_75"``, ``"75"`` or ``"7.5"`` -> ``(7, 5)``; ``"sm120"`` -> ``(12, 0)``."""
    text = str(arch).strip().lower()
    dotted = re.fullmatch(r"(\d+)\.(\d)", text)
    plain = re.fullmatch(r"(?:sm_?)?(\d+)(\d)", text)
    match = dotted or plain
    if match is None:
        raise ValueError(
            f"{ARCH_ENV} / arch must name a compute capability like 'sm75', 'sm_80', '86' or '9.0', got {arch!r}"
        )
    return int(match.group(1)), int(match.group(2))


def _forced_from(arch: str | None) -> tuple[str, tuple[int, int]] | None:
    return None if not arch else (arch, parse_arch(arch))


# (name, capability), parsed once: the attention path reads it on every call, also inside torch.compile
_forced = _forced_from(os.environ.get(ARCH_ENV))


def force_arch(arch: str | None) -> str | None:
    """Treat every CUDA GPU as ``arch`` (e.g. ``"sm75"``) from now on, or stop with None. Returns the
    previous setting, so a caller can restore it. Starts from ``$HF_FLASH_ARCH`` (read at import)."""
    global _forced
    previous = forced_arch_name()
    _forced = _forced_from(arch)  # a bad name raises here, not at the next attention call
    return previous


def forced_arch() -> tuple[int, int] | None:
    """The capability forced by :func:`force_arch` / ``$HF_FLASH_ARCH``, or None."""
    return None if _forced is None else _forced[1]


def forced_arch_name() -> str | None:
    return None if _forced is None else _forced[0]


# opt-in shared memory per block, the most one program may use (CUDA's occupancy tables);
# used where torch does not report it and for a forced arch
_SMEM_PER_BLOCK = {
    (7, 5): 64 * KB, (8, 0): 163 * KB, (8, 6): 99 * KB, (8, 7): 163 * KB, (8, 9): 99 * KB,
    (9, 0): 227 * KB, (10, 0): 227 * KB, (12, 0): 99 * KB,
}


def default_smem_per_block(capability: tuple[int, int]) -> int:
    """Known shared memory per block of ``capability``, else that of the nearest older known chip."""
    older = [c for c in _SMEM_PER_BLOCK if c <= tuple(capability)]
    return _SMEM_PER_BLOCK[max(older)] if older else 48 * KB


@functools.cache
def _device_facts(index: int) -> tuple[tuple[int, int], int, str]:
    props = torch.cuda.get_device_properties(index)
    capability = (props.major, props.minor)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or default_smem_per_block(capability)
    return capability, int(smem), props.name


@functools.cache
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index``."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def cuda_index(device: torch.device) -> int:
    """The index of a CUDA ``device``; the current device for a bare ``cuda``."""
    return device.index if device.index is not None else torch.cuda.current_device()


def device_facts(device: torch.device | str | int | None = None) -> tuple[tuple[int, int], int, str]:
    """(compute capability, shared memory per block in bytes, name) of a CUDA device, as the kernels see
    it: a forced arch replaces the capability and takes that chip's shared memory."""
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    capability, smem, name = _device_facts(cuda_index(device))
    forced = forced_arch()
    if forced is not None:
        return forced, default_smem_per_block(forced), name
    return capability, smem, name


def own_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of the CUDA ``device`` itself (cached), whatever :func:`force_arch` says."""
    return _device_facts(cuda_index(device))[0]


def kernels_unavailable_reason(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """None when the kernels can run on tensors of ``device``/``dtype``, else a one-line reason."""
    device = torch.device(device)
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} is not supported by the hf_flash kernels: torch.float16 and torch.bfloat16 are"
    if device.type == "cuda":
        # per-call path: the capability comes from the cached device facts (no device query each call)
        major, minor = _device_facts(cuda_index(device))[0]
        forced = forced_arch()
        if forced is not None and forced < (major, minor):
            major, minor = forced  # a forced older chip brings its limits; a newer one brings none
        if (major, minor) >= (8, 0) or ((major, minor) >= (7, 5) and dtype == torch.float16):
            return None
        where = f"this GPU is {major}.{minor}" + (f" ({ARCH_ENV}={forced_arch_name()})" if forced else "")
        if (major, minor) < (7, 5):
            return f"GPU compute capability {major}.{minor} is below 7.5 (T4), the oldest the kernels target; {where}"
        return f"bfloat16 needs compute capability 8.0 or newer (float16 runs on the kernels); {where}"
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return "tensors are on the CPU and TRITON_INTERPRET=1 is not set (the kernels need a CUDA GPU)"
    return f"device type {device.type!r} is not supported: the kernels run on CUDA GPUs"


# ------------------------------------------------------------------------------------------------
# Tile tables
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 2
    tma: bool = False  # read the streamed tiles through TMA descriptors where the tensors allow (sm90+)
    maxnreg: int | None = None  # registers per thread the compiler may use (None: its own choice, <= 255)

    def launch_options(self) -> dict:
        """The launch keywords of this config: warps, stages, and the register cap where one is set."""
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg:
            options["maxnreg"] = self.maxnreg
        return options


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints. Host code uses this rather than ``triton.cdiv``: from Triton 3.5 on that
    is a constexpr function whose every call wraps and unwraps its arguments (microseconds a launch)."""
    return -(-a // b)


def block_d_for(head_dim: int) -> int:
    # tl.dot needs every dimension >= 16; the padding columns are masked on load and store
    return max(16, 1 << (head_dim - 1).bit_length())


Tiles = dict  # head-dim class (padded head dim 64 / 128 / 256) -> (block_m, block_n, num_warps, num_stages)


@dataclass(frozen=True)
class ChipTable:
    """Tiles of the three attention kernels for one chip family.

    ``fwd``: query blocks of ``block_m`` walking key blocks of ``block_n``; ``dkdv``: key blocks of
    ``block_n`` walking query blocks of ``block_m``; ``dq``: like the forward. A head dim uses the
    smallest class >= its padded size (D = 80 pads to 128)."""

    name: str
    chips: str
    min_capability: tuple[int, int]
    smem_per_block: int  # bytes: every tile below fits (tests/ops/test_chips.py compiles and checks)
    tensor_cores: bool  # whether Triton lowers tl.dot to mma here (sm80+) or to FMA on CUDA cores
    fwd: Tiles
    dkdv: Tiles
    dq: Tiles
    source: str  # how the tiles were chosen
    # forward tiles for short queries (max_seqlen_q <= SHORT_SEQLEN), where smaller query blocks give the
    # grid more programs than big ones; a class missing here uses ``fwd``
    fwd_short: Tiles = field(default_factory=dict)
    # dK/dV tiles of varlen calls (segment bounds read from cu_seqlens take registers the dense kernel does
    # not need); a class missing here uses ``dkdv``
    dkdv_varlen: Tiles = field(default_factory=dict)

    def config(self, kernel: str, head_dim: int, max_seqlen_q: int | None = None, varlen: bool = False) -> KernelConfig:
        """``kernel``: "fwd", "dkdv" or "dq". A tile is (block_m, block_n, num_warps, num_stages) with two
        optional entries: read the streamed tiles through TMA (default False), and a register cap per thread
        (default none: the compiler's choice). ``varlen``: the call has cu_seqlens."""
        tiles = getattr(self, kernel)
        block_d = block_d_for(head_dim)
        head_class = min(c for c in tiles if c >= block_d)
        tile = tiles[head_class]
        if kernel == "fwd" and max_seqlen_q is not None and max_seqlen_q <= SHORT_SEQLEN:
            tile = self.fwd_short.get(head_class, tile)
        if kernel == "dkdv" and varlen:
            tile = self.dkdv_varlen.get(head_class, tile)
        block_m, block_n, num_warps, num_stages, *extra = tile
        tma, maxnreg = extra + [False, None][len(extra):]
        return KernelConfig(block_m, block_n, block_d, num_warps, num_stages, bool(tma), maxnreg)


TMA = True  # the fifth entry of a tile: stream K/V (forward, dQ) or Q/dO (dK/dV) through TMA descriptors

SM90 = ChipTable(
    "sm90", "H100, H200 (and newer GPUs with >= 227 KB shared memory per block)", (9, 0), 227 * KB, True,
    # measured on an H100 (bf16, L = 4k, 16k tokens, torch 2.11 + Triton 3.6), best of a sweep per
    # head-dim class (benchmarks/sweep_tiles.py, docs/DESIGN.md). TMA only applies to power-of-two
    # head dims; others read through pointers with the same tiles.
    fwd={64: (128, 64, 8, 3, TMA), 128: (128, 128, 8, 3, TMA), 256: (64, 64, 4, 3)},
    fwd_short={64: (64, 64, 4, 3, TMA), 128: (64, 64, 4, 3, TMA)},
    # D64 dK/dV, dense: 64 query rows a step (203-217 registers, 2 programs per SM, no spills on Triton 3.6)
    # beat 32 rows by 3-7% (H100, LOG 2026-12-06 fifth session: MHA and GQA 32/8, 4k and 16k)
    dkdv={64: (64, 64, 4, 3, TMA), 128: (64, 128, 8, 3, TMA), 256: (32, 32, 4, 2)},
    dq={64: (128, 64, 8, 3, TMA), 128: (128, 64, 8, 3, TMA), 256: (64, 32, 4, 3)},
    source="swept on an H100",
    # D64 dK/dV, varlen: 32 rows capped at 168 registers, 3 programs per SM with spill-free loops (uncapped
    # 176-198, 2 per SM), measured +5-13% on GQA 32/8 (docs/DESIGN.md); 64 rows take 237-250 there, untimed
    dkdv_varlen={64: (32, 64, 4, 3, TMA, 168)},
)

SM80 = ChipTable(
    "sm80", "A100, A30, Jetson Orin (163 KB shared memory per block)", (8, 0), 163 * KB, True,
    # the H100 tiles where they fit 163 KB without spilling; smaller key blocks / fewer stages where not
    fwd={64: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (64, 32, 4, 3)},
    dkdv={64: (32, 64, 4, 3), 128: (64, 64, 8, 3), 256: (16, 32, 4, 2)},
    dq={64: (64, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)},
    source="fitted to 163 KB and the register file by cross-compiling; not timed on an A100",
)

SM86 = ChipTable(
    "sm86", "RTX 30xx/40xx, A10, A40, L4, L40 (sm86/sm89, 99 KB shared memory per block)", (8, 6), 99 * KB, True,
    # 99 KB: two stages, and narrower blocks from head dim 128 on
    fwd={64: (128, 64, 8, 3), 128: (128, 64, 8, 2), 256: (64, 32, 4, 2)},
    dkdv={64: (32, 64, 4, 2), 128: (32, 64, 8, 2), 256: (16, 32, 4, 2)},
    dq={64: (64, 64, 4, 2), 128: (64, 32, 4, 2), 256: (32, 32, 4, 2)},
    source="fitted to 99 KB and the register file by cross-compiling; not timed on an sm86/sm89 GPU",
)

SM75 = ChipTable(
    "sm75", "T4, RTX 20xx, Quadro RTX (64 KB shared memory per block; float16 only)", (7, 5), 64 * KB, False,
    # FMA dots keep whole operand rows in registers: at most ~8 outputs per thread, fewer as D grows;
    # one stage, since without cp.async there is nothing to overlap
    fwd={64: (64, 32, 8, 1), 128: (32, 32, 8, 1), 256: (32, 16, 8, 1)},
    dkdv={64: (16, 64, 8, 1), 128: (16, 16, 8, 1), 256: (16, 16, 8, 1)},
    dq={64: (32, 32, 8, 1), 128: (16, 16, 8, 1), 256: (16, 16, 8, 1)},
    source="fitted to 64 KB and the register file by cross-compiling; not timed on a T4",
)

TABLES = {t.name: t for t in (SM75, SM80, SM86, SM90)}


def table_for(capability: tuple[int, int], smem_per_block: int | None = None) -> ChipTable:
    """The fastest table this chip can run: its capability reaches the table's and its shared memory
    holds the table's tiles. E.g. sm87 (Orin, 163 KB) -> sm80, sm120 (99 KB) -> sm86, sm100 -> sm90."""
    capability = tuple(capability)
    smem = smem_per_block if smem_per_block is not None else default_smem_per_block(capability)
    for table in (SM90, SM80, SM86):
        if capability >= table.min_capability and smem >= table.smem_per_block:
            return table
    return SM75


def chip_table(device: torch.device | str | None = None) -> ChipTable:
    """The table the kernels use on a CUDA device (honouring a forced arch)."""
    capability, smem, _ = device_facts(device)
    return table_for(capability, smem)


# the interpreter's cost grows with the tile; small tiles also exercise the block loops in CPU tests
_INTERPRETER = (16, 16, 4, 1)


def _pick(kernel: str, head_dim: int, device: torch.device, max_seqlen_q: int | None = None,
          varlen: bool = False) -> KernelConfig:
    if device.type != "cuda":
        block_m, block_n, num_warps, num_stages = _INTERPRETER
        return KernelConfig(block_m, block_n, block_d_for(head_dim), num_warps, num_stages)
    capability, smem, _ = device_facts(device)
    # only whether the queries are short changes the answer, so that is all the cache key holds of them
    short = max_seqlen_q is not None and max_seqlen_q <= SHORT_SEQLEN
    return _config_cached(kernel, head_dim, capability, smem, short, varlen)


@functools.lru_cache(maxsize=256)
def _config_cached(kernel: str, head_dim: int, capability: tuple[int, int], smem: int, short: bool,
                   varlen: bool) -> KernelConfig:
    # asked on every launch: the table walk and the dataclass construction, microseconds each, which
    # short sequences feel, are done once per (kernel, head dim, chip, short, varlen)
    return table_for(capability, smem).config(kernel, head_dim, SHORT_SEQLEN if short else None, varlen)


def forward_config(head_dim: int, device: torch.device, max_seqlen_q: int | None = None) -> KernelConfig:
    return _pick("fwd", head_dim, device, max_seqlen_q)


def backward_config(head_dim: int, device: torch.device, varlen: bool = False) -> tuple[KernelConfig, KernelConfig]:
    """Configs of the two backward kernels: dK/dV (key blocks of ``block_n`` walking query blocks of
    ``block_m``) and dQ (query blocks of ``block_m`` walking key blocks of ``block_n``). ``varlen``: the call
    has cu_seqlens."""
    return _pick("dkdv", head_dim, device, varlen=varlen), _pick("dq", head_dim, device)
