"""Host memory for the VM model: anonymous mappings and pre-faulting.

Guest RAM and device memory both live in private anonymous mappings: pages are
zero on first touch (no memset pass as with ``bytearray(n)``), transparent huge
pages are requested where the kernel allows it, and a buffer that will be written
during a migration is pre-faulted first — on this machine writing into never-touched
memory runs at about a tenth of the speed of touched memory.
"""

from __future__ import annotations

import mmap

__all__ = ["allocate_anonymous", "prefault", "MADV_POPULATE_WRITE"]

#: ``MADV_POPULATE_WRITE`` (Linux 5.14): fault pages in writable in one call
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_CHUNK = 1 << 20


def allocate_anonymous(size: int) -> mmap.mmap:
    """A zeroed private anonymous mapping of ``size`` bytes (> 0), not yet touched."""
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # not permitted on this kernel: only slower faults
            pass
    return buf


def prefault(buf: mmap.mmap, view: memoryview) -> None:
    """Make every page of ``buf`` present and writable, so later writes never fault."""
    try:
        buf.madvise(MADV_POPULATE_WRITE)
        return
    except (OSError, ValueError):  # kernel < 5.14: touch the pages by writing zeros
        pass
    zeros = bytes(min(_CHUNK, len(view)))
    for offset in range(0, len(view), len(zeros)):
        n = min(len(zeros), len(view) - offset)
        view[offset : offset + n] = zeros[:n]
