#!/usr/bin/env python3
"""How a file's page cache is made up: 4 KiB pages, or large folios of how
many pages, and how much of it is physically contiguous. Maps the file,
touches every page (reads from the page cache, or fills it), and reads each
page's frame number from /proc/self/pagemap and its flags from
/proc/kpageflags (as root).

    python3 benches/page-folios.py FILE...

docs/tuning.md uses it to explain FUSE's cached reads next to ext4's.
"""
import collections
import ctypes
import os
import struct
import sys

PAGE = os.sysconf("SC_PAGE_SIZE")
KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL = 15, 16

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]


def folios(path):
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    pages = size // PAGE
    addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), f"mmap {path}")
    view = (ctypes.c_char * size).from_address(addr)
    for i in range(pages):
        view[i * PAGE]  # fault the page in
    small, sizes, run = 0, collections.Counter(), 0
    # Physically contiguous runs: pages whose frame follows the previous one's.
    extents, prev_pfn = [], None
    with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
        for i in range(pages):
            pm.seek((addr // PAGE + i) * 8)
            entry = struct.unpack("Q", pm.read(8))[0]
            if not entry >> 63:
                continue  # not present
            pfn = entry & ((1 << 55) - 1)
            if prev_pfn is not None and pfn == prev_pfn + 1:
                extents[-1] += 1
            else:
                extents.append(1)
            prev_pfn = pfn
            kf.seek(pfn * 8)
            flags = struct.unpack("Q", kf.read(8))[0]
            if flags >> KPF_COMPOUND_TAIL & 1:
                run += 1
                continue
            if run:
                sizes[run] += 1
            run = 1 if flags >> KPF_COMPOUND_HEAD & 1 else 0
            small += run == 0
    if run:
        sizes[run] += 1
    os.close(fd)
    return pages, small, sorted(sizes.items()), extents


for p in sys.argv[1:]:
    pages, small, sizes, extents = folios(p)
    large = ", ".join(f"{n} of {k} pages" for k, n in sizes) or "none"
    print(f"{p}: {pages} pages; {small} in 4 KiB folios; large folios: {large}")
    if extents:
        extents.sort()
        mean = sum(extents) / len(extents)
        print(f"  physically contiguous runs: {len(extents)}, mean {mean:.1f} pages, "
              f"median {extents[len(extents) // 2]}, longest {extents[-1]}")
