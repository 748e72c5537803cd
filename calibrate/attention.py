"""Attention kernels the calibration pass times, and the float64 references they are checked against.

Layouts (those of vLLM's FlashAttention backend):

- contiguous cache: keys and values `[batch, kv_heads, seq, head_dim]`, every sequence attending to
  all `seq` positions;
- block pool: keys and values `[num_blocks, block_size, kv_heads, head_dim]`, a block table
  `[batch, max_blocks]` of block ids and `context_lens [batch]`. Table entries past a sequence's last
  block must still be valid block ids (0 will do), as in vLLM v1, whose block table starts zeroed;
- decode queries `[batch, num_heads, head_dim]`, one new token per sequence. MHA, GQA and MQA differ
  only in `kv_heads`; query head h reads KV head h // (num_heads / kv_heads).

Paths that copy the whole context out of the pool before attending are marked `gathers_first`.
The others read the pool through the block table, a chunk at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

@dataclass(frozen=True)
class PathInfo:
    """A kernel path: what it computes, how, and on which device types it runs."""

    name: str
    op: str
    description: str
    gathers_first: bool = False
    device_types: tuple[str, ...] = ("cpu", "cuda")


# ------------------------------------------------------------------------------------- contiguous


def _scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def contiguous_decode_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Decode through `scaled_dot_product_attention`, which picks the device's fused kernel."""
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=k.shape[1] != q.shape[1])
    return out.squeeze(2)


def contiguous_decode_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Decode as two batched matmuls per KV head, with the query heads of a group as the matmul's N.

    Scores are computed as K·qᵀ ([seq, head_dim] × [head_dim, group]) rather than q·Kᵀ: a BLAS GEMM
    then streams the cache in its stored row order, which measured twice as fast on a 2-core AMD
    EPYC VM (torch 2.13, fp32).
    """
    batch, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(batch, kv_heads, num_heads // kv_heads, head_dim) * _scale(head_dim)
    scores = torch.matmul(k, grouped.transpose(-1, -2)).transpose(-1, -2)
    probs = torch.softmax(scores.contiguous(), dim=-1)
    return torch.matmul(probs, v).reshape(batch, num_heads, head_dim)


def _probs_contiguous(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmaxed scores `[batch, kv_heads, seq, group]` of scaled queries, written for torch.compile."""
    batch, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(batch, kv_heads, 1, num_heads // kv_heads, head_dim)
    scores = (grouped * k.unsqueeze(3)).sum(-1)
    return torch.softmax(scores, dim=2)


def _probs_through_table(q: torch.Tensor, k_pool: torch.Tensor, block_table: torch.Tensor,
                         context_lens: torch.Tensor) -> torch.Tensor:
    """Softmaxed scores `[batch, tokens, kv_heads, group]` of every table position, written for torch.compile.

    Run eagerly, `k_pool[block_table]` would copy the whole context. Compiled by inductor, the
    lookup becomes an indirect load inside the dot-product loop, so keys go straight from the pool
    into registers (checked in the generated C++ with torch 2.13). Positions past a sequence's
    context length get probability 0.
    """
    batch, num_heads, head_dim = q.shape
    kv_heads = k_pool.shape[2]
    keys = k_pool[block_table].reshape(batch, -1, kv_heads, 1, head_dim)
    scores = (q.reshape(batch, 1, kv_heads, num_heads // kv_heads, head_dim) * keys).sum(-1)
    positions = torch.arange(scores.shape[1], device=q.device)
    valid = positions[None, :] < context_lens[:, None]
    scores = scores.masked_fill(~valid[:, :, None, None], float("-inf"))
    return torch.softmax(scores, dim=1)


_compiled: dict[str, Callable[..., torch.Tensor]] = {}

# Graphs one process may compile per function: one per (query heads, KV heads, head_dim), plus the
# separate graphs dynamo makes for batch 1.
_RECOMPILE_LIMIT = 32


def compiled(name: str) -> Callable[..., torch.Tensor]:
    """Return the torch.compile'd form of a probabilities function, created on first use.

    Inductor's CPU backend needs a C++ compiler at run time; without one the first call raises.
    """
    if name not in _compiled:
        import torch._dynamo
        import torch._inductor.config

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
        # Compile in this process rather than in a worker pool, so that the pass's own CPU time
        # (which it subtracts to measure other processes' load) includes the compiler's.
        torch._inductor.config.compile_threads = 1
        functions = {"contiguous": _probs_contiguous, "through_table": _probs_through_table}
        _compiled[name] = torch.compile(functions[name], dynamic=None, fullgraph=True)
    return _compiled[name]


def _call_compiled(name: str, *tensors: torch.Tensor, dynamic_dims: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """Call a compiled function with only batch and token dimensions symbolic.

    Head counts and head_dim stay static, because a graph with every dimension symbolic ran about
    2x slower on a 2-core AMD EPYC VM (torch 2.13, timed interleaved with the static graph).
    Automatic dynamic shapes are switched off for the call, so a new head count compiles a new
    static graph instead of making that dimension symbolic too.
    """
    import torch._dynamo

    for tensor, dims in zip(tensors, dynamic_dims):
        for dim in dims:
            if tensor.shape[dim] > 1:  # dynamo always specialises size-1 dimensions
                torch._dynamo.mark_dynamic(tensor, dim)
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        return compiled(name)(*tensors)


def contiguous_decode_compiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Decode with compiled scores and softmax and a BLAS matmul for P·V: the contiguous twin of `paged_fused`."""
    batch, num_heads, head_dim = q.shape
    probs = _call_compiled("contiguous", q * _scale(head_dim), k, dynamic_dims=((0,), (0, 2)))
    out = torch.matmul(probs.transpose(-1, -2), v)
    return out.reshape(batch, num_heads, head_dim)


# ----------------------------------------------------------------------------------------- paged


def _valid_tokens(context_lens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    positions = torch.arange(num_tokens, device=context_lens.device)
    return positions[None, :] < context_lens[:, None]


def _gather(pool: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Copy every sequence's whole context out of the pool, as [batch, kv_heads, tokens, head_dim]."""
    batch = block_table.shape[0]
    gathered = pool[block_table]
    return gathered.reshape(batch, -1, pool.shape[2], pool.shape[3]).transpose(1, 2)


def paged_decode_gather_sdpa(q, k_pool, v_pool, block_table, context_lens) -> torch.Tensor:
    keys, values = _gather(k_pool, block_table), _gather(v_pool, block_table)
    mask = _valid_tokens(context_lens, keys.shape[2])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask,
                                         enable_gqa=keys.shape[1] != q.shape[1])
    return out.squeeze(2)


def paged_decode_gather_matmul(q, k_pool, v_pool, block_table, context_lens) -> torch.Tensor:
    keys, values = _gather(k_pool, block_table), _gather(v_pool, block_table)
    batch, num_heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.reshape(batch, kv_heads, num_heads // kv_heads, head_dim) * _scale(head_dim)
    scores = torch.matmul(keys, grouped.transpose(-1, -2)).transpose(-1, -2)
    valid = _valid_tokens(context_lens, keys.shape[2])[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    return torch.matmul(probs, values).reshape(batch, num_heads, head_dim)


class PagedChunkedDecode:
    """Paged decode that reads the pool through the block table, a chunk of one sequence's blocks at a time.

    Each step copies `chunk_blocks` blocks of one sequence (index_select into a preallocated buffer
    of about `scratch_bytes`) and runs a BLAS matmul on them while they are still in cache, the way
    a GPU paged kernel stages blocks in shared memory. The whole context is never materialised. The
    scores of all chunks are kept, softmaxed once, and a second pass accumulates P·V. vLLM's CUDA
    paged-attention kernel (csrc/attention/attention_kernels.cu) likewise writes all of a sequence's
    QKᵀ logits to shared memory before its P·V loop.

    Chunks hold one sequence so that the staged `[tokens, kv_heads, head_dim]` rows can be read as
    `kv_heads` matrices with a common stride. A chunk spanning several sequences would make
    torch.matmul copy it into head-major order first, which cost as much as the matmul itself.

    With `fused_scores`, the QKᵀ pass and the softmax are instead one compiled graph that reads keys
    through the table (see `_probs_through_table`), and only the P·V pass uses chunks.

    NOTE: in the fused QKᵀ pass, sequences shorter than the longest in the batch still pay for the
    longest one's table columns, whose scores are then masked. The chunked passes stop at each
    sequence's own last block.
    """

    def __init__(self, scratch_bytes: int = 4 << 20, fused_scores: bool = False) -> None:
        if scratch_bytes <= 0:
            raise ValueError(f"scratch_bytes must be positive, got {scratch_bytes}")
        self.scratch_bytes = scratch_bytes
        self.fused_scores = fused_scores
        self._buffers: dict[tuple, torch.Tensor] = {}

    def _buffer(self, role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        # Reused between calls: on the CPU, fresh allocations of tens of MB cost page faults that
        # take longer than the copy into them.
        key = (role, shape, like.dtype, like.device)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return self._buffers[key]

    def chunk_blocks(self, k_pool: torch.Tensor) -> int:
        block_bytes = k_pool[0].numel() * k_pool.element_size()
        return max(1, self.scratch_bytes // block_bytes)

    def __call__(self, q, k_pool, v_pool, block_table, context_lens) -> torch.Tensor:
        batch, num_heads, head_dim = q.shape
        _, block_size, kv_heads, _ = k_pool.shape
        groups = num_heads // kv_heads
        num_tokens = block_table.shape[1] * block_size
        chunk = min(self.chunk_blocks(k_pool), block_table.shape[1])
        scratch = self._buffer("scratch", (chunk, block_size, kv_heads, head_dim), k_pool)
        q_scaled = q * _scale(head_dim)
        # One host sync per call, so that each sequence's loop stops at its own last block.
        lengths = [int(n) for n in context_lens.tolist()]
        used_blocks = [-(-length // block_size) for length in lengths]

        # Pass 1: probabilities of every context position, [batch, kv_heads, group, tokens].
        if self.fused_scores:
            probs = _call_compiled("through_table", q_scaled, k_pool, block_table, context_lens,
                                   dynamic_dims=((0,), (0,), (0, 1), (0,))).permute(0, 2, 3, 1)
        else:
            scores = self._buffer("scores", (batch, kv_heads, groups, num_tokens), q)
            scores.fill_(float("-inf"))
            grouped = q_scaled.reshape(batch, kv_heads, groups, head_dim)
            for b in range(batch):
                for start in range(0, used_blocks[b], chunk):
                    keys = self._stage(k_pool, block_table[b, start : min(start + chunk, used_blocks[b])], scratch)
                    first = start * block_size
                    torch.matmul(grouped[b], keys.transpose(-1, -2),
                                 out=scores[b, :, :, first : first + keys.shape[1]])
            valid = _valid_tokens(context_lens, num_tokens)[:, None, None, :]
            probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)

        # Pass 2: P·V accumulated chunk by chunk into [batch, kv_heads, group, head_dim].
        out = torch.zeros(batch, kv_heads, groups, head_dim, dtype=q.dtype, device=q.device)
        for b in range(batch):
            for start in range(0, used_blocks[b], chunk):
                values = self._stage(v_pool, block_table[b, start : min(start + chunk, used_blocks[b])], scratch)
                first = start * block_size
                out[b].baddbmm_(probs[b, :, :, first : first + values.shape[1]], values)
        return out.reshape(batch, num_heads, head_dim)

    @staticmethod
    def _stage(pool: torch.Tensor, block_ids: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        """Copy the blocks `block_ids` into the scratch buffer and return them as [kv_heads, tokens, head_dim].

        The result is a strided view (row stride kv_heads·head_dim) that BLAS reads without a copy.
        """
        staged = scratch[: block_ids.shape[0]]
        torch.index_select(pool, 0, block_ids, out=staged)
        return staged.view(-1, pool.shape[2], pool.shape[3]).transpose(0, 1)


# --------------------------------------------------------------------------------- prefill and MLA


def prefill_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of n new tokens `q [batch, heads, n, dim]` over `k, v [batch, kv_heads, seq, dim]`.

    The new tokens are the last n of the `seq` positions, so new token i attends to positions
    ≤ seq − n + i. This lower-right aligned causal mask is what chunked prefill over a cached prefix needs.

    NOTE: with a prefix (n < seq), torch 2.13's CPU kernel computes the whole n × seq rectangle and
    masks it, several times slower per attended pair than its `is_causal` path; GPU FlashAttention
    skips the masked tiles. A CPU profile's prefill fit therefore mixes two kernels.
    """
    num_new, seq = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]
    if num_new == seq:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(num_new, seq), enable_gqa=gqa)


def mla_decode_absorbed(q: torch.Tensor, latent: torch.Tensor, kv_lora_rank: int, scale: float) -> torch.Tensor:
    """Absorbed MLA decode: `q [batch, heads, rank + rope]` over the latent cache `[batch, seq, rank + rope]`.

    The query's no-rope part is already multiplied by W_UK (absorbed), so keys are the latent itself
    and values its first `kv_lora_rank` columns. Returns `[batch, heads, kv_lora_rank]`, still to be
    multiplied by W_UV.

    NOTE: the two matmuls read the latent twice. Once it outgrows the last-level cache both reads
    go to memory, so the time per cached byte grows with the context, unlike a fused kernel that
    reads it once.
    """
    scores = torch.matmul(q, latent.transpose(1, 2)) * scale
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, latent[:, :, :kv_lora_rank])


# ----------------------------------------------------------------------------------- references


def decode_reference(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """Decode attention in float64, one sequence and one head at a time.

    `keys[b]` and `values[b]` are sequence b's context as `[tokens, kv_heads, head_dim]`.
    """
    batch, num_heads, head_dim = q.shape
    out = torch.empty(batch, num_heads, values[0].shape[-1], dtype=torch.float64)
    for b in range(batch):
        kv_heads = keys[b].shape[1]
        for h in range(num_heads):
            kv_head = h // (num_heads // kv_heads)
            key = keys[b][:, kv_head].double()
            scores = key @ q[b, h].double() / math.sqrt(head_dim)
            weights = torch.exp(scores - scores.max())
            out[b, h] = (weights / weights.sum()) @ values[b][:, kv_head].double()
    return out


def contiguous_context(k: torch.Tensor) -> list[torch.Tensor]:
    """Per-sequence `[tokens, kv_heads, head_dim]` views of a contiguous cache."""
    return [k[b].transpose(0, 1) for b in range(k.shape[0])]


def paged_context(pool: torch.Tensor, block_table: torch.Tensor, context_lens: torch.Tensor) -> list[torch.Tensor]:
    """Per-sequence `[tokens, kv_heads, head_dim]` contexts read token by token through the block table."""
    block_size = pool.shape[1]
    contexts = []
    for b in range(block_table.shape[0]):
        length = int(context_lens[b])
        rows = [pool[int(block_table[b, t // block_size]), t % block_size] for t in range(length)]
        contexts.append(torch.stack(rows))
    return contexts


def prefill_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal prefill in float64, query position by query position."""
    batch, num_heads, num_new, head_dim = q.shape
    seq = k.shape[2]
    out = torch.empty(batch, num_heads, num_new, v.shape[-1], dtype=torch.float64)
    for i in range(num_new):
        visible = seq - num_new + i + 1
        keys = [k[b, :, :visible].transpose(0, 1) for b in range(batch)]
        values = [v[b, :, :visible].transpose(0, 1) for b in range(batch)]
        out[:, :, i] = decode_reference(q[:, :, i], keys, values)
    return out


def mla_reference(q: torch.Tensor, latent: torch.Tensor, kv_lora_rank: int, scale: float) -> torch.Tensor:
    q64, latent64 = q.double(), latent.double()
    out = torch.empty(q.shape[0], q.shape[1], kv_lora_rank, dtype=torch.float64)
    for b in range(q.shape[0]):
        scores = q64[b] @ latent64[b].T * scale
        weights = torch.softmax(scores, dim=-1)
        out[b] = weights @ latent64[b, :, :kv_lora_rank]
    return out


def tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    """Allowed max absolute error against a float64 reference: an absolute floor plus a share of its range."""
    relative, absolute = {
        torch.float32: (1e-4, 1e-5),
        torch.float16: (1e-2, 2e-3),
        torch.bfloat16: (3e-2, 1e-2),
    }[dtype]
    return absolute + relative * float(reference.abs().max())


# ------------------------------------------------------------------------------------- test cases


@dataclass
class DecodeCase:
    """One decode batch as a contiguous cache, a shuffled block pool, or both (then with the same content)."""

    q: torch.Tensor
    context_lens: torch.Tensor
    kv_heads: int
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    k_pool: torch.Tensor | None = None
    v_pool: torch.Tensor | None = None
    block_table: torch.Tensor | None = None

    @property
    def kv_bytes(self) -> int:
        """Bytes of keys and values the sequences attend to, each over its own context length."""
        per_token = 2 * self.kv_heads * self.q.shape[-1] * self.q.element_size()
        return int(self.context_lens.sum()) * per_token


def make_decode_case(*, batch: int, num_heads: int, kv_heads: int, head_dim: int, context_lens: list[int],
                     block_size: int, dtype: torch.dtype, device: torch.device, seed: int = 0,
                     layouts: tuple[str, ...] = ("contiguous", "paged"), exact_random: bool = True) -> DecodeCase:
    """Random queries and cache; pool blocks are assigned in a random order, as after many allocations and frees.

    With `exact_random=False` (for timing only) the cache repeats one random tile of
    `block_size × head_dim` values, which fills hundreds of MB at copy speed instead of at the
    speed of the random number generator.
    """
    generator = torch.Generator().manual_seed(seed)
    max_context = max(context_lens)
    max_blocks = -(-max_context // block_size)
    padded = max_blocks * block_size
    num_blocks = batch * max_blocks
    tile_elements = block_size * head_dim

    def filled(*shape: int) -> torch.Tensor:
        if exact_random:
            return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)
        out = torch.empty(shape, dtype=dtype, device=device)
        tile = torch.randn(tile_elements, generator=generator).to(dtype=dtype, device=device)
        out.view(-1, tile_elements).copy_(tile)
        return out

    q = torch.randn(batch, num_heads, head_dim, generator=generator).to(dtype=dtype, device=device)
    lens = torch.tensor(context_lens, dtype=torch.int64, device=device)
    case = DecodeCase(q=q, context_lens=lens, kv_heads=kv_heads)
    block_table = torch.randperm(num_blocks, generator=generator).reshape(batch, max_blocks).to(device)

    if "contiguous" in layouts:
        k = filled(batch, kv_heads, padded, head_dim)
        v = filled(batch, kv_heads, padded, head_dim)
        if "paged" in layouts:
            # Zero-filled first, as vLLM allocates its cache, so that memory pages are first touched in
            # address order rather than in the block table's shuffled order.
            case.k_pool = torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)
            case.v_pool = torch.zeros_like(case.k_pool)
            case.k_pool[block_table] = k.transpose(1, 2).reshape(batch, max_blocks, block_size, kv_heads, head_dim)
            case.v_pool[block_table] = v.transpose(1, 2).reshape(batch, max_blocks, block_size, kv_heads, head_dim)
            case.block_table = block_table
        # Contiguous paths attend to every position, so they only see uniform-length batches.
        case.k, case.v = k[:, :, :max_context], v[:, :, :max_context]
    elif "paged" in layouts:
        case.k_pool = filled(num_blocks, block_size, kv_heads, head_dim)
        case.v_pool = filled(num_blocks, block_size, kv_heads, head_dim)
        case.block_table = block_table
    return case
