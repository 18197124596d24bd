"""Host memory for what waits off the GPU (audit B1): tensors carved from power-of-two slabs, so
torch's pinned allocator rounds nothing, and the plan counts what the slabs hold."""

from __future__ import annotations

import torch

from wan_tune.memory.host_arena import ALIGN, HostArena, packed_bytes

MIB, GIB = 2**20, 2**30


def test_tensors_are_disjoint_aligned_views_of_power_of_two_slabs():
    arena = HostArena(pin=False, expected=[3 * MIB, 5 * MIB + 7, 1000, 2 * MIB])
    shapes = [((3 * MIB // 2,), torch.bfloat16), ((5 * MIB + 7,), torch.uint8), ((250,), torch.float32), ((MIB // 2,), torch.float32)]
    taken = [arena.take(shape, dtype) for shape, dtype in shapes]
    bases = [s.data_ptr() for s in arena.slabs]
    for t, (shape, dtype) in zip(taken, shapes):
        offset = t.data_ptr() - max(b for b in bases if b <= t.data_ptr())  # pinned slabs start on a page
        assert t.shape == shape and t.dtype == dtype and offset % ALIGN == 0
        t.fill_(1)
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in taken)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no two overlap
    assert all(s.numel() & (s.numel() - 1) == 0 for s in arena.slabs)  # powers of two: nothing to round
    assert arena.reserved_bytes == packed_bytes([3 * MIB, 5 * MIB + 7, 1000, 2 * MIB])  # the plan's count


def test_a_14b_s_block_inputs_pin_a_little_over_their_bytes():
    """40 block inputs of the 14B: 320 MiB at 480p, 738 MiB at 720p. One pinned allocation each
    rounds to 512 MiB and 1 GiB (20 and 40 GiB); in slabs, 14 and 32 GiB."""
    for each, slabs in ((320 * MIB, 14 * GIB), (738 * MIB, 32 * GIB)):
        assert packed_bytes([each] * 40) == slabs
        assert slabs < 1.15 * 40 * each


def test_the_activation_stash_reuses_its_regions_across_buckets():
    """A smaller bucket's input goes into the region a larger one left; a larger one gets a new region."""
    from wan_tune.memory.activation_offload import HostStash

    stash = HostStash(slots=2)
    big, small = torch.randn(1, 64, 8), torch.randn(1, 16, 8)
    stash.put(0, big)
    region = stash.regions[0]
    stash.put(0, small)
    assert stash.regions[0] is region and torch.equal(stash.buffers[0], small)
    stash.put(0, torch.randn(1, 128, 8))
    assert stash.regions[0] is not region and stash.regions[0].numel() == 128 * 8 * 4
    assert torch.equal(stash.take(0, torch.device("cpu")), stash.buffers[0])
