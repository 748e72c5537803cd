"""KV-cache strategies behind one protocol, their configuration, and the factory the engine uses.

A scenario lists strategies either as shorthand strings or as mappings:

    strategies:
      - contiguous-pow2
      - paged+prefix
      - {kind: contiguous, reservation: pow2, fit: buddy, name: "Orca (Pow2)"}
      - {kind: radix, eviction: lfu, page_size: 16}

Every manager gets its capacity from bytes: the KV budget of one replica (per TP rank) divided by
the model's KV bytes per token (per rank).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any, Literal

from kvsim.errors import UserError
from kvsim.kvcache.base import (
    BREAKDOWN_FIELDS,
    KVCacheManager,
    MemoryBreakdown,
    PrefixCacheStats,
    Sequence,
)
from kvsim.kvcache.contiguous import ContiguousKVCacheManager
from kvsim.kvcache.paged import PagedKVCacheManager
from kvsim.kvcache.radix import RadixKVCacheManager

__all__ = [
    "BREAKDOWN_FIELDS",
    "ContiguousKVCacheManager",
    "KVCacheManager",
    "MemoryBreakdown",
    "PagedKVCacheManager",
    "PrefixCacheStats",
    "RadixKVCacheManager",
    "STRATEGY_SHORTHANDS",
    "Sequence",
    "StrategyConfig",
    "make_manager",
    "parse_strategy",
]

logger = logging.getLogger(__name__)

StrategyKind = Literal["contiguous", "paged", "radix"]

_ALLOWED_VALUES: dict[str, tuple[Any, ...]] = {
    "kind": ("contiguous", "paged", "radix"),
    "reservation": ("max", "pow2", "oracle"),
    "fit": ("first", "best", "buddy"),
    "eviction": ("lru", "lfu"),
}

# Settings that only one kind reads. Giving one to another kind is an error, not a silent no-op.
_KIND_OF_SETTING = {
    "reservation": "contiguous",
    "fit": "contiguous",
    "enable_prefix_caching": "paged",
    "eviction": "radix",
    "page_size": "radix",
}


@dataclass(frozen=True, kw_only=True)
class StrategyConfig:
    """One KV-cache strategy to simulate."""

    kind: StrategyKind
    """contiguous (one reserved range per sequence), paged (vLLM blocks) or radix (SGLang tree)."""
    name: str = ""
    """Label shown in reports, derived from the settings when empty."""
    reservation: Literal["max", "pow2", "oracle"] = "max"
    """Contiguous only: reserve max_model_len slots, the prompt plus the next power of two of the output, or
    exactly the final length."""
    fit: Literal["first", "best", "buddy"] = "first"
    """Contiguous only: take the lowest-addressed hole that fits or the smallest one, or round the reservation up to
    an aligned power-of-two block of a buddy allocator."""
    enable_prefix_caching: bool = False
    """Paged only: share full blocks of equal prefixes across requests (vLLM automatic prefix caching)."""
    eviction: Literal["lru", "lfu"] = "lru"
    """Radix only: evict the least recently or the least frequently used unlocked leaf first."""
    page_size: int = 1
    """Radix only: tokens per tree page (SGLang --page-size); 1 matches tokens exactly."""

    def __post_init__(self) -> None:
        for key, allowed in _ALLOWED_VALUES.items():
            value = getattr(self, key)
            if value not in allowed:
                raise UserError(f"strategy {key}: invalid value {value!r}; use one of {', '.join(allowed)}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise UserError(f"strategy enable_prefix_caching: invalid value {self.enable_prefix_caching!r}; "
                            f"use true or false")
        if isinstance(self.page_size, bool) or not isinstance(self.page_size, int) or self.page_size < 1:
            raise UserError(f"strategy page_size: invalid value {self.page_size!r}; use a whole number >= 1")
        if not isinstance(self.name, str):
            raise UserError(f"strategy name: invalid value {self.name!r}; use a string")
        if not self.name:
            # Frozen: the derived default is set once here, never changed afterwards.
            object.__setattr__(self, "name", self.default_name())

    def default_name(self) -> str:
        """Return a label that distinguishes these settings, equal to the shorthand where one exists."""
        if self.kind == "contiguous":
            label = "contiguous" if self.reservation == "max" else f"contiguous-{self.reservation}"
            return label + {"first": "", "best": "-best-fit", "buddy": "-buddy"}[self.fit]
        if self.kind == "paged":
            return "paged+prefix" if self.enable_prefix_caching else "paged"
        label = "radix" if self.eviction == "lru" else "radix-lfu"
        return label if self.page_size == 1 else f"{label}-page{self.page_size}"


STRATEGY_SHORTHANDS: dict[str, StrategyConfig] = {
    "contiguous": StrategyConfig(kind="contiguous", name="contiguous", reservation="max"),
    "contiguous-pow2": StrategyConfig(kind="contiguous", name="contiguous-pow2", reservation="pow2"),
    "contiguous-oracle": StrategyConfig(kind="contiguous", name="contiguous-oracle", reservation="oracle"),
    "paged": StrategyConfig(kind="paged", name="paged"),
    "paged+prefix": StrategyConfig(kind="paged", name="paged+prefix", enable_prefix_caching=True),
    "radix": StrategyConfig(kind="radix", name="radix"),
    "radix-lfu": StrategyConfig(kind="radix", name="radix-lfu", eviction="lfu"),
}


def parse_strategy(value: str | dict[str, Any] | StrategyConfig) -> StrategyConfig:
    """Build a StrategyConfig from a shorthand string or a mapping of its fields.

    Raises UserError naming the key, the invalid value and the allowed values.
    """
    if isinstance(value, StrategyConfig):
        return value
    if isinstance(value, str):
        config = STRATEGY_SHORTHANDS.get(value.strip())
        if config is None:
            raise UserError(f"strategy: unknown shorthand {value!r}; use one of {', '.join(STRATEGY_SHORTHANDS)} "
                            f"or a mapping with a 'kind' key")
        return config
    if not isinstance(value, dict):
        raise UserError(f"strategy: invalid value {value!r}; use a shorthand string or a mapping")

    allowed_keys = [f.name for f in fields(StrategyConfig)]
    for key in value:
        if key not in allowed_keys:
            raise UserError(f"strategy: unknown key {key!r}; allowed keys are {', '.join(allowed_keys)}")
    if "kind" not in value:
        raise UserError(f"strategy: missing key 'kind' in {value!r}; use one of {', '.join(_ALLOWED_VALUES['kind'])}")
    kind = value["kind"]
    if kind not in _ALLOWED_VALUES["kind"]:
        raise UserError(f"strategy kind: invalid value {kind!r}; use one of {', '.join(_ALLOWED_VALUES['kind'])}")
    for key, owner_kind in _KIND_OF_SETTING.items():
        if key in value and owner_kind != kind:
            raise UserError(f"strategy {key}: applies only to kind {owner_kind}, not to kind {kind}; "
                            f"remove it or change kind")
    return StrategyConfig(**value)


def make_manager(config: StrategyConfig, *, kv_budget_bytes: int, kv_bytes_per_token: int, block_size: int,
                 max_model_len: int) -> KVCacheManager:
    """Create the manager `config` describes, sized from the KV budget in bytes.

    Paged gets `kv_budget_bytes // (block_size * kv_bytes_per_token)` blocks; contiguous gets
    `kv_budget_bytes // kv_bytes_per_token` token slots; radix gets whole pages of `page_size` slots.
    Raises UserError when the budget has room for fewer than `max_model_len` tokens, as vLLM does at startup.
    """
    if kv_bytes_per_token < 1:
        raise ValueError(f"kv_bytes_per_token must be >= 1, got {kv_bytes_per_token}")
    if block_size < 1:
        raise UserError(f"block_size: invalid value {block_size}; use a whole number >= 1 (vLLM uses 16)")
    if max_model_len < 1:
        raise UserError(f"max_model_len: invalid value {max_model_len}; use a whole number >= 1")

    if config.kind == "paged":
        unit_tokens = block_size
    elif config.kind == "radix":
        unit_tokens = config.page_size
    else:
        unit_tokens = 1
    num_units = max(kv_budget_bytes, 0) // (unit_tokens * kv_bytes_per_token)
    if num_units < 1:
        raise UserError(f"strategy {config.name}: the KV budget of {kv_budget_bytes} bytes is smaller than one "
                        f"{unit_tokens}-token unit of {unit_tokens * kv_bytes_per_token} bytes; free memory for the "
                        f"KV cache (higher tp, smaller weight dtype) or raise gpu_memory_utilization")

    capacity_tokens = num_units * unit_tokens
    if capacity_tokens < max_model_len:
        # vLLM also fails at startup here, because a request of max_model_len tokens could never run.
        raise UserError(f"strategy {config.name}: max_model_len {max_model_len} needs more KV cache than the "
                        f"{capacity_tokens} tokens ({kv_budget_bytes} bytes) available; lower max_model_len "
                        f"to at most {capacity_tokens} or give the KV cache more memory")

    manager: KVCacheManager
    if config.kind == "paged":
        manager = PagedKVCacheManager(name=config.name, num_blocks=num_units, block_size=block_size,
                                      enable_prefix_caching=config.enable_prefix_caching)
    elif config.kind == "radix":
        manager = RadixKVCacheManager(name=config.name, capacity_pages=num_units, page_size=config.page_size,
                                      eviction=config.eviction)
    else:
        manager = ContiguousKVCacheManager(name=config.name, capacity_tokens=num_units,
                                           max_model_len=max_model_len, reservation=config.reservation,
                                           fit=config.fit)
    logger.info("KV cache for %s: %d tokens (%d units of %d tokens)", config.name, manager.capacity_tokens,
                num_units, unit_tokens)
    return manager
