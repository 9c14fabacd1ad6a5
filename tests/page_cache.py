"""What the page cache holds of a file (``mincore``), and taking a file out of it."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]  # fmt: skip
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident(path, begin: int, end: int) -> int:
    """Bytes of ``path[begin:end]`` (whole pages inside it) in the page cache."""
    page = mmap.PAGESIZE
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            pages = (size + page - 1) // page
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
            first, last = -(-begin // page), end // page
            return sum(vec.raw[i] & 1 for i in range(first, last)) * page
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
