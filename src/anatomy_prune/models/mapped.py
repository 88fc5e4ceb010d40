"""Weights that map a checkpoint file: their pages can be given back to the system once read."""
from __future__ import annotations

# --- weights that map a checkpoint file ---------------------------------------------------------------

def release_mapped_pages(tensors) -> int:
    """Drop from this process the pages of `tensors` that map a checkpoint file (transformers maps safetensors
    files privately and its tensors are views into them), once the caller no longer needs their values: a
    layer-wise pass calls it on a block's replaced FFN weights, so pages it read do not stay resident for the
    rest of the run. The tensors must still be referenced (so the mapping cannot be gone and its addresses
    reused) and must never have been written (a private mapping's written pages would revert to the file; the
    layer-wise pass never writes them). Pages are released with madvise(MADV_DONTNEED): a later read maps the
    file's unchanged contents again. Linux only; elsewhere, and for tensors not backed by such a file, nothing
    happens. Returns the bytes released."""
    import ctypes
    import mmap

    spans = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[1].endswith("p") and parts[-1].endswith(".safetensors"):
                    a, b = (int(x, 16) for x in parts[0].split("-"))
                    spans.append((a, b))
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    page = mmap.PAGESIZE
    released = 0
    for t in tensors:
        if t is None or t.device.type != "cpu" or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        lo, hi = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        if not any(a <= lo and hi <= b for a, b in spans):
            continue
        start, end = -(-lo // page) * page, hi // page * page   # whole pages inside the tensor only
        if end > start and libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4) == 0:  # DONTNEED
            released += end - start
    return released
