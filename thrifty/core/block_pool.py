"""The fixed pool of KV blocks: reference counts, an LRU free queue, and the prefix-cache map.

A block whose ref count drops to zero goes to the back of the free queue but keeps its
hash, so a later request with the same prefix can take it back (a prefix-cache hit).
New blocks come from the front of the queue: the least recently freed block is evicted first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, NamedTuple


class BlockHash(NamedTuple):
    """Key of a full block. The token ids are kept so that a hash collision cannot alias two
    different blocks (the dict compares the whole tuple); the parent is chained through `value`."""

    value: int
    token_ids: tuple[int, ...]
    extra: str | None


def hash_block(parent: BlockHash | None, token_ids: Iterable[int], extra: str | None = None) -> BlockHash:
    tokens = tuple(token_ids)
    parent_value = parent.value if parent is not None else 0
    return BlockHash(hash((parent_value, tokens, extra)), tokens, extra)


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # block_id -> block, in eviction order (front = least recently freed).
        self._free: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        # hash -> {block_id: block}: two requests may compute the same block independently;
        # either copy serves a hit, and evicting one leaves the other findable.
        self._cached: dict[BlockHash, dict[int, KVCacheBlock]] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def usage(self) -> float:
        """Fraction of blocks held by live requests (cached free blocks count as free)."""
        return self.num_used_blocks / self.num_blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        copies = self._cached.get(block_hash)
        return next(iter(copies.values())) if copies else None

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks with only {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on blocks found in the prefix cache (reviving free ones)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop a reference; pass blocks in the order they should be evicted (first = soonest)."""
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} freed twice"
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def cache_block(self, block: KVCacheBlock, block_hash: BlockHash) -> bool:
        """Register a full block under its hash (a block's hash never changes); False if it
        already had one."""
        if block.block_hash is not None:
            return False
        block.block_hash = block_hash
        self._cached.setdefault(block_hash, {})[block.block_id] = block
        return True

    def uncache_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take blocks out of the prefix cache (their KV was never computed)."""
        for block in blocks:
            self._evict(block, counted=False)

    def _evict(self, block: KVCacheBlock, counted: bool = True) -> None:
        if block.block_hash is None:
            return
        copies = self._cached.get(block.block_hash)
        if copies is not None and copies.pop(block.block_id, None) is not None:
            self.num_evictions += counted
            if not copies:
                del self._cached[block.block_hash]
        block.block_hash = None

    def reset_prefix_cache(self) -> None:
        for block in self._free.values():
            self._evict(block)
