"""Per-request KV blocks: prefix-cache lookup, slot allocation, freeing.

A token at position p of a request lives in slot `block_ids[p // block_size] * block_size
+ p % block_size` of every layer's cache.
"""

from __future__ import annotations

from thrifty.core.block_pool import BlockHash, BlockPool, KVCacheBlock, hash_block
from thrifty.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self._req_to_hashes: dict[str, list[BlockHash]] = {}
        # Leading blocks of each request already registered in the prefix cache: each step
        # registers only the blocks it fills, never rewalking a request's whole list.
        self._num_cached_blocks: dict[str, int] = {}
        # Blocks registered by the step being scheduled, whose KV that step has yet to compute.
        self._step_cached_blocks: list[KVCacheBlock] = []
        # Prefix-cache statistics, in tokens (vLLM counts queries and hits in tokens).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def _hashing(self, request: Request) -> bool:
        # Siblings of an n > 1 request share prompt blocks even when caching is off.
        return self.enable_caching or request.cache_salt is not None

    def _block_hashes(self, request: Request) -> list[BlockHash]:
        """Hashes of the request's full blocks, extended as its tokens grow."""
        hashes = self._req_to_hashes.setdefault(request.request_id, [])
        bs = self.block_size
        num_full = request.num_tokens // bs
        if len(hashes) < num_full:
            tokens = request.all_token_ids
            for i in range(len(hashes), num_full):
                parent = hashes[-1] if hashes else None
                hashes.append(hash_block(parent, tokens[i * bs:(i + 1) * bs], request.cache_salt))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest run of cached full blocks at the start of the request, and their token count."""
        if not self._hashing(request) or request.sampling_params.prompt_logprobs is not None:
            return [], 0  # prompt logprobs need every prompt position computed
        hashes = self._block_hashes(request)
        # The last token must be computed to produce logits, so never hit on all of them.
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in hashes[:max_hit_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        num_hit_tokens = len(hits) * self.block_size
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_hit_tokens
        return hits, num_hit_tokens

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVCacheBlock] | None = None,
        num_reserved_tokens: int = 0,
    ) -> list[KVCacheBlock] | None:
        """Make room for `num_new_tokens` more tokens (plus an optional reservation beyond them).
        Returns the newly allocated blocks, or None (and changes nothing) if the pool is short."""
        new_computed_blocks = new_computed_blocks or []
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_needed = cdiv(num_computed + num_new_tokens + num_reserved_tokens, self.block_size)
        num_new_blocks = max(0, num_needed - len(blocks) - len(new_computed_blocks))
        num_revived = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + num_revived > self.pool.num_free_blocks:
            return None
        self.pool.touch(new_computed_blocks)
        blocks.extend(new_computed_blocks)
        new_blocks = self.pool.get_new_blocks(num_new_blocks)
        blocks.extend(new_blocks)
        if self._hashing(request):
            self._cache_full_blocks(request, blocks, num_computed + num_new_tokens)
        return new_blocks

    def _cache_full_blocks(self, request: Request, blocks: list[KVCacheBlock], num_tokens: int) -> None:
        # Blocks that will be full of computed KV once this step runs; their hash is final.
        # They are registered now, so that a request admitted later in the same step can hit
        # them (each layer writes the whole step's KV before any token attends); should the step
        # fail, uncache_step() takes the registrations back.
        hashes = self._block_hashes(request)
        start = self._num_cached_blocks.get(request.request_id, 0)
        end = min(num_tokens // self.block_size, len(hashes))
        for i in range(start, end):
            if self.pool.cache_block(blocks[i], hashes[i]):
                self._step_cached_blocks.append(blocks[i])
        self._num_cached_blocks[request.request_id] = max(start, end)

    def begin_step(self) -> None:
        """Called as a step is scheduled: the previous step's registrations are computed KV now."""
        self._step_cached_blocks.clear()

    def uncache_step(self) -> None:
        """The step failed: no block it registered holds computed KV, so none may be hit."""
        self.pool.uncache_blocks(self._step_cached_blocks)
        self._step_cached_blocks.clear()

    def free(self, request: Request) -> None:
        blocks = self.req_to_blocks.pop(request.request_id, [])
        # Tail blocks are the least likely to be shared: evict them first.
        self.pool.free_blocks(reversed(blocks))
        self._req_to_hashes.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    def num_blocks_of(self, request_id: str) -> int:
        return len(self.req_to_blocks.get(request_id, ()))

    def num_allocated_slots(self) -> int:
        return sum(len(b) for b in self.req_to_blocks.values()) * self.block_size
