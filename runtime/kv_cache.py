"""Per-rank paged KV cache: block storage plus a free-list block allocator.

Each layer owns a k and a v tensor of shape [num_blocks, block_size, num_kv_heads,
head_dim]. A sequence owns a list of physical blocks (its block table); token i of
the sequence lives at flat slot ``table[i // block_size] * block_size + i % block_size``.
The allocator is host-side bookkeeping only; it never touches the tensors.
An fp8 cache (``dtype=torch.float8_e4m3fn``) also holds one fp32 K and one V scale per layer
(``k_scales`` / ``v_scales``, one-element tensors; docs/fp8.md, "FP8 KV cache").
See docs/kv_cache.md.
"""

from collections.abc import Hashable, Sequence

import torch

from adp_pass.errors import AdpError
from adp_pass.runtime.serving_config import check_kv_cache_scale


class OutOfBlocksError(AdpError, RuntimeError):
    """Raised when an allocation needs more blocks than are free."""


class KvCacheScaleError(AdpError, ValueError):
    """An fp8 cache without its scales, or scales given for another cache."""


FP8 = getattr(torch, "float8_e4m3fn", None)  # None on a torch without float8


def is_fp8(dtype: torch.dtype) -> bool:
    return FP8 is not None and dtype == FP8


def new_scales(num_layers: int, scale: float, device: torch.device | str) -> list[torch.Tensor]:
    """One fp32 one-element scale per layer: tensors, not floats, so the kernels read them on
    the device (a CUDA graph replays whatever they hold) and a checkpoint's scales can be
    copied in later."""
    check_kv_cache_scale(scale)
    return [torch.full((1,), float(scale), dtype=torch.float32, device=device) for _ in range(num_layers)]


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        kv_scale: float = 1.0,
    ) -> None:
        """``dtype`` torch.float8_e4m3fn: an fp8 cache whose layers' K and V scales all start at
        ``kv_scale`` (ignored for other dtypes)."""
        # The decode kernel feeds a block straight into tl.dot, which needs >= 16 rows.
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        if num_layers < 1 or num_blocks < 1 or num_kv_heads < 1 or head_dim < 1:
            raise ValueError("num_layers, num_blocks, num_kv_heads and head_dim must be >= 1")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        # Zero-filled so stale reads (a bug) give finite values rather than NaN garbage.
        self.k_caches = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v_caches = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.k_scales: list[torch.Tensor] | None = None
        self.v_scales: list[torch.Tensor] | None = None
        if is_fp8(dtype):
            self.k_scales = new_scales(num_layers, kv_scale, self.device)
            self.v_scales = new_scales(num_layers, kv_scale, self.device)
        self._reset_allocator()

    @classmethod
    def over(cls, k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor],
             k_scales: Sequence[torch.Tensor] | None = None,
             v_scales: Sequence[torch.Tensor] | None = None) -> "PagedKVCache":
        """An allocator over existing per-layer k/v tensors (a graph's own cache buffers), and
        for fp8 caches their per-layer scales (required then, refused otherwise)."""
        num_blocks, block_size, num_kv_heads, head_dim = k_caches[0].shape
        dtype = k_caches[0].dtype
        fp8 = is_fp8(dtype)
        if fp8 != (k_scales is not None) or fp8 != (v_scales is not None):
            raise KvCacheScaleError(
                f"a {dtype} cache needs k_scales and v_scales (one per layer)" if fp8 else
                f"k_scales/v_scales were given for a {dtype} cache; only fp8 caches are scaled")
        if fp8 and not (len(k_scales) == len(v_scales) == len(k_caches)):
            raise KvCacheScaleError(f"{len(k_caches)} layers but {len(k_scales)} k and "
                                    f"{len(v_scales)} v scales: give one per layer")
        cache = cls(1, 1, block_size, num_kv_heads, head_dim, dtype, "meta")
        cache.num_layers, cache.num_blocks = len(k_caches), num_blocks
        cache.device = k_caches[0].device
        cache.k_caches, cache.v_caches = list(k_caches), list(v_caches)
        cache.k_scales = list(k_scales) if fp8 else None
        cache.v_scales = list(v_scales) if fp8 else None
        cache._reset_allocator()
        return cache

    def _reset_allocator(self) -> None:
        # Stack: pop() hands out low block ids first, and freed blocks are reused first.
        self._free: list[int] = list(range(self.num_blocks - 1, -1, -1))
        self._tables: dict[Hashable, list[int]] = {}
        self._lens: dict[Hashable, int] = {}

    @staticmethod
    def bytes_needed(
        num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes of the k and v tensors of all layers (what the constructor allocates; an fp8
        cache's per-layer fp32 scales included)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        scales = 2 * num_layers * 4 if is_fp8(dtype) else 0
        return 2 * num_layers * num_blocks * block_size * num_kv_heads * head_dim * itemsize + scales

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_caches[index], self.v_caches[index]

    @property
    def fp8(self) -> bool:
        return self.k_scales is not None

    def layer_scales(self, index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Layer ``index``'s (k_scale, v_scale) for the cache ops: fp32 ``[1]`` tensors for an fp8
        cache, (None, None) otherwise."""
        if self.k_scales is None:
            return None, None
        return self.k_scales[index], self.v_scales[index]

    def context_len(self, seq_id: Hashable) -> int:
        return self._lens[self._known(seq_id)]

    def holds(self, seq_id: Hashable) -> bool:
        """``seq_id`` is allocated (has slots, possibly none yet used)."""
        return seq_id in self._tables

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._tables[self._known(seq_id)])

    def allocate(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        """Register a new sequence holding num_tokens tokens; returns their slots."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} is already allocated")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        self._tables[seq_id] = self._take(seq_id, self.blocks_for(num_tokens))
        self._lens[seq_id] = num_tokens
        return self._slots(seq_id, 0, num_tokens)

    def append(self, seq_id: Hashable, num_tokens: int = 1) -> list[int]:
        """Grow a sequence by num_tokens (new blocks only at boundaries); returns the new slots."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        old = self._lens[self._known(seq_id)]
        table = self._tables[seq_id]
        table.extend(self._take(seq_id, self.blocks_for(old + num_tokens) - len(table)))
        self._lens[seq_id] = old + num_tokens
        return self._slots(seq_id, old, num_tokens)

    def free(self, seq_id: Hashable) -> None:
        """Return a sequence's blocks to the free list (block contents are left as is)."""
        self._free.extend(reversed(self._tables.pop(self._known(seq_id))))
        del self._lens[seq_id]

    def block_tables(self, seq_ids: Sequence[Hashable], max_blocks: int | None = None) -> torch.Tensor:
        """int32 [len(seq_ids), max_blocks] on the cache device, padded with block 0.

        Padding is never read (the kernel stops at context_len) but stays a valid
        index. A fixed max_blocks keeps the shape static for CUDA graphs.
        """
        tables = [self._tables[self._known(s)] for s in seq_ids]
        width = max((len(t) for t in tables), default=0)
        if max_blocks is None:
            max_blocks = width
        elif max_blocks < width:
            raise ValueError(f"max_blocks={max_blocks} but a sequence holds {width} blocks")
        rows = [t + [0] * (max_blocks - len(t)) for t in tables]
        return torch.tensor(rows, dtype=torch.int32).view(len(seq_ids), max_blocks).to(self.device)

    def context_lens(self, seq_ids: Sequence[Hashable]) -> torch.Tensor:
        """int32 [len(seq_ids)] on the cache device."""
        return torch.tensor([self._lens[self._known(s)] for s in seq_ids], dtype=torch.int32).to(self.device)

    def slot_mapping(self, slots: Sequence[int], pad_to: int | None = None) -> torch.Tensor:
        """int64 [pad_to or len(slots)] on the cache device; padding is -1 (skipped by reshape_and_cache)."""
        pad_to = len(slots) if pad_to is None else pad_to
        if pad_to < len(slots):
            raise ValueError(f"pad_to={pad_to} is shorter than {len(slots)} slots")
        return torch.tensor(list(slots) + [-1] * (pad_to - len(slots)), dtype=torch.int64).to(self.device)

    def _known(self, seq_id: Hashable) -> Hashable:
        if seq_id not in self._tables:
            raise KeyError(f"unknown sequence {seq_id!r}")
        return seq_id

    def _take(self, seq_id: Hashable, count: int) -> list[int]:
        # Check before popping so a failed request leaves the allocator unchanged.
        if count > len(self._free):
            raise OutOfBlocksError(
                f"KV cache out of blocks for sequence {seq_id!r}: needs {count} blocks, "
                f"{len(self._free)} free of {self.num_blocks} (block_size={self.block_size})"
            )
        return [self._free.pop() for _ in range(count)]

    def _slots(self, seq_id: Hashable, start: int, count: int) -> list[int]:
        table = self._tables[seq_id]
        bs = self.block_size
        return [table[i // bs] * bs + i % bs for i in range(start, start + count)]
