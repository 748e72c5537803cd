"""The kernel paths of the calibration pass, and how to call each on a decode case."""

from __future__ import annotations

from collections.abc import Callable

import torch

from calibrate.attention import (
    DecodeCase,
    PagedChunkedDecode,
    PathInfo,
    contiguous_decode_compiled,
    contiguous_decode_matmul,
    contiguous_decode_sdpa,
    paged_decode_gather_matmul,
    paged_decode_gather_sdpa,
)
from calibrate.triton_paged import TRITON_AVAILABLE, paged_decode_triton

DECODE_CONTIGUOUS = "attention_decode_contiguous"
DECODE_PAGED = "attention_decode_paged"
PREFILL = "attention_prefill"
PREFILL_CACHED = "attention_prefill_cached"
MLA_DECODE = "mla_decode"
GEMM = "gemm"

PATHS: dict[str, PathInfo] = {
    info.name: info
    for info in (
        PathInfo("contiguous_sdpa", DECODE_CONTIGUOUS,
                 "torch scaled_dot_product_attention (enable_gqa) over [batch, kv_heads, seq, head_dim]"),
        PathInfo("contiguous_matmul", DECODE_CONTIGUOUS,
                 "per KV head, K·qᵀ and P·V as batched BLAS matmuls with the group's query heads as N"),
        PathInfo("contiguous_compiled", DECODE_CONTIGUOUS,
                 "scores by a torch.compile (inductor C++) kernel, P·V by a BLAS matmul: "
                 "the contiguous twin of paged_fused", device_types=("cpu",)),
        PathInfo("paged_gather_sdpa", DECODE_PAGED,
                 "copy every sequence's blocks out of the pool through the block table (fancy indexing), "
                 "then scaled_dot_product_attention", gathers_first=True),
        PathInfo("paged_gather_matmul", DECODE_PAGED,
                 "copy every sequence's blocks out of the pool, then the contiguous_matmul computation",
                 gathers_first=True),
        PathInfo("paged_chunked", DECODE_PAGED,
                 "two passes over the block table a chunk of blocks at a time: index_select of the chunk "
                 "into a cache-sized buffer, then BLAS matmuls (QKᵀ, then P·V after one softmax)"),
        PathInfo("paged_fused", DECODE_PAGED,
                 "QKᵀ by one torch.compile kernel that loads keys through the block table inside its "
                 "dot-product loop; P·V chunked as in paged_chunked", device_types=("cpu",)),
        PathInfo("paged_triton", DECODE_PAGED,
                 "Triton kernel: per (sequence, KV head, context split), tiles of tokens loaded through "
                 "the block table, online softmax, splits merged by log-sum-exp", device_types=("cuda",)),
        PathInfo("prefill_sdpa", PREFILL,
                 "causal scaled_dot_product_attention of the new tokens over a contiguous cache"),
        PathInfo("mla_absorbed", MLA_DECODE,
                 "absorbed MLA decode: two batched matmuls over the contiguous latent cache "
                 "[batch, seq, kv_lora_rank + rope]"),
        PathInfo("gemm_linear", GEMM, "torch.nn.functional.linear (torch.bmm for per-head batched products)"),
    )
}


def available_paths(device: torch.device) -> list[str]:
    names = [name for name, info in PATHS.items() if device.type in info.device_types]
    if not TRITON_AVAILABLE:
        names = [name for name in names if name != "paged_triton"]
    return names


def decode_paths(device: torch.device) -> list[str]:
    return [name for name in available_paths(device) if PATHS[name].op in (DECODE_CONTIGUOUS, DECODE_PAGED)]


def is_paged(name: str) -> bool:
    return PATHS[name].op == DECODE_PAGED


class DecodeRunner:
    """Callable running one decode path on a case. It keeps the chunked paths' scratch buffers between calls."""

    def __init__(self, name: str, scratch_bytes: int = 4 << 20) -> None:
        if name not in PATHS or PATHS[name].op not in (DECODE_CONTIGUOUS, DECODE_PAGED):
            raise ValueError(f"{name!r} is not a decode path")
        self.name = name
        self.scratch_bytes = scratch_bytes
        self._fn = self._build(name, scratch_bytes)

    @staticmethod
    def _build(name: str, scratch_bytes: int) -> Callable[[DecodeCase], torch.Tensor]:
        if name == "contiguous_sdpa":
            return lambda case: contiguous_decode_sdpa(case.q, case.k, case.v)
        if name == "contiguous_matmul":
            return lambda case: contiguous_decode_matmul(case.q, case.k, case.v)
        if name == "contiguous_compiled":
            return lambda case: contiguous_decode_compiled(case.q, case.k, case.v)
        paged_args = lambda case: (case.q, case.k_pool, case.v_pool, case.block_table, case.context_lens)  # noqa: E731
        if name == "paged_gather_sdpa":
            return lambda case: paged_decode_gather_sdpa(*paged_args(case))
        if name == "paged_gather_matmul":
            return lambda case: paged_decode_gather_matmul(*paged_args(case))
        if name == "paged_triton":
            return lambda case: paged_decode_triton(*paged_args(case))
        chunked = PagedChunkedDecode(scratch_bytes=scratch_bytes, fused_scores=name == "paged_fused")
        return lambda case: chunked(*paged_args(case))

    def __call__(self, case: DecodeCase) -> torch.Tensor:
        return self._fn(case)
