"""Under activation offload and block offload (`train.activation_offload`, `train.offload=blocks`).

Host buffers for what waits off the GPU (offloaded block inputs, streamed and idle weights),
carved out of a few large allocations.

Why: torch's pinned-memory allocator rounds every allocation up to the next power of two (its
CachingHostAllocator), and pinned memory cannot be swapped. One pinned tensor per block input or
per weight pinned 512 MiB for a 320 MiB 14B block input at 480p and 1 GiB for 738 MiB at 720p (40
of them: 20 and 40 GiB instead of 12.5 and 28.8), 128 MiB for a 67.5 MiB fp8 FFN weight
(../shared/audits/gpu-paths-2026-12-04.md, B1). Here each allocation ("slab") is a power of two
already, so nothing is rounded, and tensors are views into slabs. What is lost is the tail of a
slab that the next tensor does not fit, and the last slab's rounding: `reserved_bytes` counts both,
and `wan-tune plan` counts the same packing (plan/memory.py).

On a CPU the slabs are ordinary memory (nothing to pin): the same code path, which the tests check.
"""

from __future__ import annotations

import torch

ALIGN = 4096  # every tensor starts on a page: any dtype's alignment, and the copy engines' liking
MIN_SLAB = 2**21  # 2 MiB
MAX_SLAB = 2**32  # 4 GiB
SLABS_AIMED_AT = 8  # slabs per arena when the total is known: big enough for few tails, small enough to round little


def _pow2_ceil(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def slab_size(size: int, remaining: int, largest: int) -> int:
    """The size of the next slab for a tensor of `size` bytes, with `remaining` bytes still to come
    (this one included) of which the largest is `largest`: a power of two, at least `size`, no
    bigger than the arena's share (total / SLABS_AIMED_AT, 4x the largest tensor at least), nor than
    what remains, rounded up."""
    share = min(MAX_SLAB, max(MIN_SLAB, _pow2_ceil(4 * largest), _pow2_ceil(remaining // SLABS_AIMED_AT)))
    return max(_pow2_ceil(size), min(share, _pow2_ceil(remaining)))


def packed_bytes(sizes: list[int]) -> int:
    """Bytes the slabs of an arena holding tensors of `sizes` bytes (taken in this order) reserve:
    what `HostArena` allocates for them, computed without allocating (the plan's host RAM)."""
    arena = HostArena(pin=False, expected=sizes, dry=True)
    for n in sizes:
        arena.take_bytes(n)
    return arena.reserved_bytes


class HostArena:
    """Tensors in host memory (pinned with `pin`), views into power-of-two slabs. `expected`: the
    sizes in bytes of the tensors to come, when known (the slabs are sized for them; without it
    each slab is 4x the tensor that opens it). `dry`: count, allocate nothing."""

    def __init__(self, pin: bool, expected: list[int] | None = None, dry: bool = False):
        self.pin, self.dry = pin, dry
        self.remaining = sum(_aligned(n) for n in expected or [])
        self.largest = max(expected or [0])
        self.slabs: list[int | torch.Tensor] = []
        self.used = 0  # bytes taken from the last slab

    @property
    def reserved_bytes(self) -> int:
        return sum(s if isinstance(s, int) else s.numel() for s in self.slabs)

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised host tensor of `shape` and `dtype`."""
        n = torch.Size(shape).numel() * dtype.itemsize
        slab, offset = self.take_bytes(n)
        return slab[offset:offset + n].view(dtype).view(shape)

    def take_bytes(self, n: int):
        """(slab, offset) of `n` bytes."""
        size = _aligned(n)
        capacity = self.slabs[-1] if self.slabs and isinstance(self.slabs[-1], int) else (
            self.slabs[-1].numel() if self.slabs else 0)
        if not self.slabs or self.used + size > capacity:
            new = slab_size(size, max(self.remaining, size), max(self.largest, n))
            self.slabs.append(new if self.dry else torch.empty(new, dtype=torch.uint8, pin_memory=self.pin))
            self.used = 0
        offset, self.used = self.used, self.used + size
        self.remaining = max(0, self.remaining - size)
        return self.slabs[-1], offset
