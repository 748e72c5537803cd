"""Strategy configuration: shorthands, mappings, errors, and capacity from bytes."""

import pytest

from kvsim.errors import UserError
from kvsim.kvcache import (
    STRATEGY_SHORTHANDS,
    ContiguousKVCacheManager,
    KVCacheManager,
    PagedKVCacheManager,
    RadixKVCacheManager,
    StrategyConfig,
    make_manager,
    parse_strategy,
)


def test_shorthands():
    assert parse_strategy("contiguous") == StrategyConfig(kind="contiguous", name="contiguous", reservation="max")
    assert parse_strategy("contiguous-pow2").reservation == "pow2"
    assert parse_strategy("contiguous-oracle").reservation == "oracle"
    assert parse_strategy("paged").enable_prefix_caching is False
    assert parse_strategy("paged+prefix").enable_prefix_caching is True
    assert parse_strategy("radix").eviction == "lru"
    assert parse_strategy("radix-lfu").eviction == "lfu"
    assert set(STRATEGY_SHORTHANDS) == {"contiguous", "contiguous-pow2", "contiguous-oracle", "paged",
                                        "paged+prefix", "radix", "radix-lfu"}
    for name, config in STRATEGY_SHORTHANDS.items():
        assert config.name == name


def test_mapping_with_name():
    config = parse_strategy({"kind": "contiguous", "reservation": "pow2", "fit": "buddy", "name": "Orca (Pow2)"})
    assert (config.kind, config.reservation, config.fit, config.name) == ("contiguous", "pow2", "buddy", "Orca (Pow2)")


def test_default_names():
    for shorthand, config in STRATEGY_SHORTHANDS.items():
        assert config.default_name() == shorthand
    assert parse_strategy({"kind": "contiguous"}) == parse_strategy("contiguous")
    assert parse_strategy({"kind": "contiguous", "reservation": "oracle", "fit": "best"}).name == \
        "contiguous-oracle-best-fit"
    assert parse_strategy({"kind": "contiguous", "reservation": "pow2", "fit": "buddy"}).name == "contiguous-pow2-buddy"
    assert parse_strategy({"kind": "contiguous", "fit": "buddy"}).name == "contiguous-buddy"
    assert parse_strategy({"kind": "paged", "enable_prefix_caching": True}).name == "paged+prefix"
    assert parse_strategy({"kind": "radix", "eviction": "lfu", "page_size": 16}).name == "radix-lfu-page16"


@pytest.mark.parametrize("value, message", [
    ("pagd", r"unknown shorthand 'pagd'; use one of contiguous, .*radix-lfu"),
    ({"kind": "paged", "block": 16}, r"unknown key 'block'; allowed keys are kind, name, reservation"),
    ({"reservation": "max"}, r"missing key 'kind'"),
    ({"kind": "tree"}, r"kind: invalid value 'tree'; use one of contiguous, paged, radix"),
    ({"kind": "contiguous", "reservation": "half"}, r"reservation: invalid value 'half'; use one of max, pow2, oracle"),
    ({"kind": "contiguous", "fit": "worst"}, r"fit: invalid value 'worst'; use one of first, best, buddy$"),
    ({"kind": "paged", "fit": "buddy"}, r"fit: applies only to kind contiguous, not to kind paged"),
    ({"kind": "radix", "eviction": "fifo"}, r"eviction: invalid value 'fifo'; use one of lru, lfu"),
    ({"kind": "radix", "page_size": 0}, r"page_size: invalid value 0"),
    ({"kind": "paged", "enable_prefix_caching": "yes"}, r"enable_prefix_caching: invalid value 'yes'"),
    ({"kind": "paged", "reservation": "pow2"}, r"reservation: applies only to kind contiguous, not to kind paged"),
    ({"kind": "contiguous", "eviction": "lru"}, r"eviction: applies only to kind radix"),
    (42, r"invalid value 42; use a shorthand string or a mapping"),
])
def test_invalid_strategies(value, message):
    with pytest.raises(UserError, match=message):
        parse_strategy(value)


def test_capacity_from_bytes():
    # 1,000,000 bytes at 100 bytes per token: 10,000 slots, 625 blocks of 16, 1,250 pages of 8.
    sizes = dict(kv_budget_bytes=1_000_000 + 99, kv_bytes_per_token=100, block_size=16, max_model_len=4096)
    paged = make_manager(parse_strategy("paged"), **sizes)
    assert isinstance(paged, PagedKVCacheManager)
    assert (paged.num_blocks, paged.capacity_tokens, paged.block_size) == (625, 10_000, 16)

    contiguous = make_manager(parse_strategy("contiguous-pow2"), **sizes)
    assert isinstance(contiguous, ContiguousKVCacheManager)
    assert (contiguous.capacity_tokens, contiguous.block_size) == (10_000, 1)

    radix = make_manager(parse_strategy({"kind": "radix", "page_size": 8}), **sizes)
    assert isinstance(radix, RadixKVCacheManager)
    assert (radix.capacity_pages, radix.capacity_tokens, radix.block_size) == (1250, 10_000, 8)

    buddy = make_manager(parse_strategy({"kind": "contiguous", "fit": "buddy"}), **sizes)
    assert isinstance(buddy, ContiguousKVCacheManager)
    assert buddy.fit == "buddy"
    # 10,000 slots = 8,192 + 1,024 + 512 + 256 + 16 as top-level buddy blocks.
    assert [size for _, size in buddy.free_space.holes()] == [8192, 1024, 512, 256, 16]

    for manager in (paged, contiguous, radix, buddy):
        assert isinstance(manager, KVCacheManager)
        assert manager.num_free_tokens == 10_000
        assert manager.breakdown().free_tokens == 10_000


def test_capacity_errors():
    with pytest.raises(UserError, match="is smaller than one 16-token unit of 1600 bytes"):
        make_manager(parse_strategy("paged"), kv_budget_bytes=1000, kv_bytes_per_token=100, block_size=16,
                     max_model_len=1)
    with pytest.raises(UserError, match="max_model_len 4096 needs more KV cache than the 1600 tokens"):
        make_manager(parse_strategy("radix"), kv_budget_bytes=160_000, kv_bytes_per_token=100, block_size=16,
                     max_model_len=4096)
