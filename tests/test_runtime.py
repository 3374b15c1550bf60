"""Process-wide runtime helpers: the memory measurement the run tables report."""
import torch

from manip.runtime import PeakMemory


def test_peak_memory_counts_allocations_that_reuse_freed_heap():
    """Work that ran before the block freed heap pages the block then reuses; a resident-set
    measurement must still see what the block allocates (it read 0.7 MB of 188 here before
    the free pages were handed back on entry)."""
    chunk = 16 * 1024  # 64 KB float32 tensors: served from the heap, not mmap
    earlier = [torch.ones(chunk) for _ in range(1500)]
    pinned = torch.ones(chunk)  # keeps the freed pages below the top of the heap
    del earlier
    with PeakMemory() as peak:
        held = [torch.ones(chunk) for _ in range(1500)]
    expected = 1500 * chunk * 4 / 2**20
    assert peak.megabytes >= 0.9 * expected, (peak.megabytes, expected)
    assert len(held) == 1500 and pinned.numel() == chunk
