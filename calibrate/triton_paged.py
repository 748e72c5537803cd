"""Paged decode attention as a Triton kernel, for CUDA devices.

One program handles one (sequence, KV head, context split). It walks its share of the context
`TILE` tokens at a time and looks each token's block up in the block table. Keys and values are
loaded straight from the pool `[num_blocks, block_size, kv_heads, head_dim]`, and an online softmax
is kept for the query heads of the group. Splitting the context across programs (flash-decoding, as in
vLLM's second paged-attention kernel) keeps the GPU busy when batch × KV heads is small. A short
torch reduction then merges the splits by their log-sum-exp.

The CPU build of torch ships without triton, so `TRITON_AVAILABLE` is False there and the
calibration pass skips this path.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch has no triton
    triton = None
    tl = None

TRITON_AVAILABLE = triton is not None


if TRITON_AVAILABLE:

    @triton.jit
    def _paged_decode_split_kernel(
        q_ptr, k_pool_ptr, v_pool_ptr, block_table_ptr, context_lens_ptr,
        partial_out_ptr, partial_max_ptr, partial_sum_ptr,
        scale, tokens_per_split,
        stride_q_batch, stride_q_head,
        stride_pool_block, stride_pool_token, stride_pool_head,
        stride_table_batch,
        stride_out_batch, stride_out_head, stride_out_split,
        stride_stat_batch, stride_stat_head,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, IEEE_FP32: tl.constexpr,
    ):
        batch = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        context = tl.load(context_lens_ptr + batch).to(tl.int32)
        start = split * tokens_per_split
        end = tl.minimum(start + tokens_per_split, context)

        rows = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + rows
        row_ok = rows < GROUP
        q = tl.load(q_ptr + batch * stride_q_batch + heads[:, None] * stride_q_head + dims[None, :],
                    mask=row_ok[:, None], other=0.0)

        running_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        running_sum = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        offsets = tl.arange(0, TILE)
        for tile_start in range(start, end, TILE):
            tokens = tile_start + offsets
            ok = tokens < end
            blocks = tl.load(block_table_ptr + batch * stride_table_batch + tokens // BLOCK_SIZE, mask=ok, other=0)
            pool_rows = (blocks.to(tl.int64) * stride_pool_block + (tokens % BLOCK_SIZE) * stride_pool_token
                         + kv_head * stride_pool_head)
            k = tl.load(k_pool_ptr + pool_rows[:, None] + dims[None, :], mask=ok[:, None], other=0.0)
            if IEEE_FP32:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(ok[None, :], scores * scale, float("-inf"))

            new_max = tl.maximum(running_max, tl.max(scores, 1))
            alpha = tl.exp(running_max - new_max)
            p = tl.exp(scores - new_max[:, None])
            running_sum = running_sum * alpha + tl.sum(p, 1)
            v = tl.load(v_pool_ptr + pool_rows[:, None] + dims[None, :], mask=ok[:, None], other=0.0)
            if IEEE_FP32:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            running_max = new_max

        out_ptrs = (partial_out_ptr + batch * stride_out_batch + heads[:, None] * stride_out_head
                    + split * stride_out_split + dims[None, :])
        tl.store(out_ptrs, acc, mask=row_ok[:, None])
        stat_offsets = batch * stride_stat_batch + heads * stride_stat_head + split
        tl.store(partial_max_ptr + stat_offsets, running_max, mask=row_ok)
        tl.store(partial_sum_ptr + stat_offsets, running_sum, mask=row_ok)


def paged_decode_triton(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                        context_lens: torch.Tensor, *, tile_tokens: int = 64) -> torch.Tensor:
    """Decode attention `q [batch, heads, head_dim]` over a block pool; returns `[batch, heads, head_dim]`."""
    if not TRITON_AVAILABLE:
        raise RuntimeError("triton is not installed; the paged Triton kernel needs torch's CUDA build")
    if q.device.type != "cuda":
        raise RuntimeError(f"the paged Triton kernel runs on CUDA tensors, got {q.device}")
    batch, num_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_pool.shape
    if head_dim & (head_dim - 1):
        raise ValueError(f"the Triton kernel needs a power-of-two head_dim, got {head_dim}")
    if tile_tokens < 16 or tile_tokens & (tile_tokens - 1):
        raise ValueError(f"tile_tokens must be a power of two of at least 16 (tl.dot's minimum), got {tile_tokens}")
    q, k_pool, v_pool = q.contiguous(), k_pool.contiguous(), v_pool.contiguous()
    block_table = block_table.contiguous()
    group = num_heads // kv_heads
    group_pad = max(16, triton.next_power_of_2(group))

    # Enough splits for about two programs per SM; the table's width bounds every context, which
    # avoids reading context_lens back to the host.
    max_context = block_table.shape[1] * block_size
    programs = batch * kv_heads
    sm_count = torch.cuda.get_device_properties(q.device).multi_processor_count
    num_splits = max(1, min(math.ceil(max_context / tile_tokens), math.ceil(2 * sm_count / programs)))
    tokens_per_split = math.ceil(math.ceil(max_context / num_splits) / tile_tokens) * tile_tokens
    num_splits = math.ceil(max_context / tokens_per_split)

    partial_out = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    partial_max = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    partial_sum = torch.empty_like(partial_max)
    _paged_decode_split_kernel[(batch, kv_heads, num_splits)](
        q, k_pool, v_pool, block_table, context_lens,
        partial_out, partial_max, partial_sum,
        1.0 / math.sqrt(head_dim), tokens_per_split,
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        block_table.stride(0),
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
        partial_max.stride(0), partial_max.stride(1),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, TILE=tile_tokens,
        IEEE_FP32=q.dtype == torch.float32,
    )

    # Merge the splits. Each contains an unnormalised sum with its own running max.
    global_max = partial_max.amax(dim=-1, keepdim=True)
    weights = torch.exp(partial_max - global_max)
    total = (partial_sum * weights).sum(dim=-1)
    out = (partial_out * weights.unsqueeze(-1)).sum(dim=-2) / total.unsqueeze(-1)
    return out.to(q.dtype)
