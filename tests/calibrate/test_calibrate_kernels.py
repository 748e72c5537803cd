"""Every kernel path against its float64 reference, on small shapes, before anything is timed."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from calibrate.attention import (  # noqa: E402
    PagedChunkedDecode,
    contiguous_context,
    decode_reference,
    make_decode_case,
    mla_decode_absorbed,
    mla_reference,
    paged_context,
    prefill_reference,
    prefill_sdpa,
    tolerance,
)
from calibrate.paths import PATHS, DecodeRunner, available_paths, decode_paths, is_paged  # noqa: E402

CPU = torch.device("cpu")
KINDS = {"MHA": 8, "GQA": 2, "MQA": 1}
EAGER_DECODE = [p for p in decode_paths(CPU) if p not in ("paged_fused", "contiguous_compiled")]
COMPILED_DECODE = ["paged_fused", "contiguous_compiled"]


def max_error(result, reference):
    return float((result.double() - reference).abs().max())


def paged_case(kv_heads, lens=(37, 64, 5, 50), seed=0, **changes):
    fields = dict(batch=len(lens), num_heads=8, kv_heads=kv_heads, head_dim=64, context_lens=list(lens),
                  block_size=16, dtype=torch.float32, device=CPU, seed=seed)
    fields.update(changes)
    return make_decode_case(**fields)


def reference_for(case, paged):
    if paged:
        keys = paged_context(case.k_pool, case.block_table, case.context_lens)
        values = paged_context(case.v_pool, case.block_table, case.context_lens)
    else:
        keys, values = contiguous_context(case.k), contiguous_context(case.v)
    return decode_reference(case.q, keys, values)


def check_path(path, kind):
    paged = is_paged(path)
    lens = (37, 64, 5, 50) if paged else (48, 48, 48)
    case = paged_case(KINDS[kind], lens=lens)
    reference = reference_for(case, paged)
    # A 40 KiB buffer holds 5 blocks of 8 KiB: several chunks per sequence, the last one partial.
    result = DecodeRunner(path, scratch_bytes=40 << 10)(case)
    assert result.shape == (len(lens), 8, 64)
    assert max_error(result, reference) <= tolerance(torch.float32, reference)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("path", EAGER_DECODE)
def test_decode_path_matches_reference(path, kind):
    check_path(path, kind)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("path", COMPILED_DECODE)
def test_compiled_decode_path_matches_reference(path, kind):
    check_path(path, kind)


def test_paged_and_contiguous_layouts_hold_same_cache():
    case = paged_case(2, lens=(48, 48))
    for b in range(2):
        logical = paged_context(case.k_pool, case.block_table, case.context_lens)[b]
        assert torch.equal(logical, case.k[b].transpose(0, 1))


def test_block_table_is_shuffled():
    case = paged_case(2, lens=(160, 160))
    table = case.block_table.flatten()
    assert sorted(table.tolist()) == list(range(20))
    assert table.tolist() != list(range(20))


def test_chunk_count_follows_scratch_size():
    case = paged_case(2)
    block_bytes = 16 * 2 * 64 * 4
    assert PagedChunkedDecode(scratch_bytes=3 * block_bytes).chunk_blocks(case.k_pool) == 3
    assert PagedChunkedDecode(scratch_bytes=1).chunk_blocks(case.k_pool) == 1


def test_timing_fill_is_deterministic():
    first = paged_case(2, exact_random=False)
    second = paged_case(2, exact_random=False)
    assert torch.equal(first.k_pool, second.k_pool)
    assert torch.isfinite(first.k_pool).all()


@pytest.mark.parametrize("num_new,seq", [(12, 30), (16, 16), (1, 9)])
def test_prefill_matches_reference(num_new, seq):
    generator = torch.Generator().manual_seed(seq)
    q = torch.randn(2, 8, num_new, 32, generator=generator)
    k = torch.randn(2, 2, seq, 32, generator=generator)
    v = torch.randn(2, 2, seq, 32, generator=generator)
    reference = prefill_reference(q, k, v)
    assert max_error(prefill_sdpa(q, k, v), reference) <= tolerance(torch.float32, reference)


def test_prefill_reference_sees_only_earlier_tokens():
    # Changing the last key must not change the output of any but the last new token.
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 4, 8, generator=generator)
    k = torch.randn(1, 2, 10, 8, generator=generator)
    v = torch.randn(1, 2, 10, 8, generator=generator)
    before = prefill_reference(q, k, v)
    k[:, :, -1] += 5.0
    after = prefill_reference(q, k, v)
    assert torch.equal(before[:, :, :3], after[:, :, :3])
    assert not torch.equal(before[:, :, 3], after[:, :, 3])


def test_mla_matches_reference():
    generator = torch.Generator().manual_seed(4)
    rank, rope = 32, 16
    q = torch.randn(3, 4, rank + rope, generator=generator)
    latent = torch.randn(3, 40, rank + rope, generator=generator)
    scale = 1.0 / (rank + rope) ** 0.5
    result = mla_decode_absorbed(q, latent, rank, scale)
    reference = mla_reference(q, latent, rank, scale)
    assert result.shape == (3, 4, rank)
    assert max_error(result, reference) <= tolerance(torch.float32, reference)


def test_mla_reference_equals_decode_reference():
    # Absorbed MLA is MQA over the latent: keys are the whole latent, values its first `rank` columns.
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 24, generator=generator)
    latent = torch.randn(2, 10, 24, generator=generator)
    keys = [latent[b, :, None, :] for b in range(2)]
    values = [latent[b, :, None, :16] for b in range(2)]
    # decode_reference scales by 1/sqrt(24), the width of the keys.
    expected = decode_reference(q, keys, values)
    assert torch.allclose(mla_reference(q, latent, 16, 1 / 24**0.5), expected)


def test_every_listed_path_is_known():
    for path in available_paths(CPU):
        assert PATHS[path].device_types
    assert "paged_triton" not in available_paths(CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", list(KINDS))
def test_triton_paged_matches_reference(kind):
    from calibrate.triton_paged import paged_decode_triton

    case = paged_case(KINDS[kind], device=torch.device("cuda"))
    reference = reference_for(
        make_decode_case(batch=4, num_heads=8, kv_heads=KINDS[kind], head_dim=64, context_lens=[37, 64, 5, 50],
                         block_size=16, dtype=torch.float32, device=CPU, seed=0), paged=True)
    result = paged_decode_triton(case.q, case.k_pool, case.v_pool, case.block_table, case.context_lens)
    assert max_error(result.cpu(), reference) <= tolerance(torch.float32, reference)
