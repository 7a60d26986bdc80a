"""Reusable shared-memory batch buffers for DataLoader workers.

A batch built in a DataLoader worker lives in shared memory, so that sending it
to the trainer costs a file descriptor, not a copy.  A fresh segment per batch
costs the worker a zero-filled page fault for every 4 KiB it writes (6,144 per
25 MB batch; ~9% of the CPU in ``benchmarks/bench_loader.py``).  This module
keeps a small pool of segments per worker process and reuses a segment once
nothing uses it any more:

* in the worker: nothing but the pool references the segment's storage (torch's
  storage use count), and
* if it was sent to the trainer: the trainer has let go of it.  Each segment has
  a state byte in a small shared ``flags`` tensor: 1 = in use by the worker,
  2 = sent, 0 = free.  While this process pickles a pooled tensor for another
  process (``ForkingPickler``, which is what the DataLoader's queues use), the
  state becomes 2 and the receiving side gets a rebuild function that puts a
  ``weakref.finalize`` on the storage it maps; the finalizer writes 0 when that
  storage dies there, i.e. when the last tensor or view of the batch is gone.

A segment is reused for a request of ``need`` bytes when it holds at least
``need`` and at most 1.3x as many; new segments are sized up to 1/8-octave
classes so nearby bucket sizes share them.  When a new segment is needed, a free
one that does not fit is released first, so the pool holds no more segments
than were ever in use at once, never more than ``LIMIT`` and never more than
``max_bytes`` (the loader's ``shared_pool_bytes``, default 256 MiB per worker);
past that, requests get unpooled segments (the behaviour without a pool: freed
once sent and dropped by the trainer).  Batches that
were never sent (an abandoned epoch) become free once the worker drops them.
"""

from __future__ import annotations

import os
import threading
import weakref
from multiprocessing.reduction import ForkingPickler
from typing import List, Optional, Tuple

import torch

from datago.errors import SharedMemoryError

LIMIT = 32                  # segments per worker process
DEFAULT_MAX_BYTES = 256 << 20   # bytes of segments kept per worker (``shared_pool_bytes``)
_SLACK = 1.3                # a segment serves requests down to 1/1.3 of its size

FREE, WORKER, SENT = 0, 1, 2


def _use_count(storage: torch.UntypedStorage) -> int:
    return torch._C._storage_Use_Count(storage._cdata)


def _size_class(n: int) -> int:
    """``n`` rounded up to m * 2**k with 8 <= m < 16 (at most 12.5% more)."""
    if n <= 4096:
        return 4096
    k = n.bit_length() - 4
    m = -(-n >> k) if n & ((1 << k) - 1) else n >> k
    return m << k


_SHM_FULL = ("No space left on device", "Cannot allocate memory", "unable to allocate shared memory",
             "unable to write to file", "unable to resize file", "unable to mmap",
             "unable to open shared memory")


def _describe_shm() -> str:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return "/dev/shm cannot be read"
    mib = 1 << 20
    return (f"/dev/shm has {st.f_bavail * st.f_frsize / mib:.0f} MiB free of "
            f"{st.f_blocks * st.f_frsize / mib:.0f} MiB")


def _new_shared(nbytes: int, shape: Tuple[int, ...] = ()) -> torch.UntypedStorage:
    """``torch.UntypedStorage._new_shared``; a ``SharedMemoryError`` saying what to do
    when the shared memory is full (torch's own error is the cause)."""
    try:
        return torch.UntypedStorage._new_shared(nbytes)
    except (RuntimeError, OSError) as e:
        if not any(k in str(e) for k in _SHM_FULL):
            raise
        from torch.utils.data import get_worker_info
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        who = f"DataLoader worker {info.id} of {workers}" if info is not None else "this process"
        # each worker holds its own batches (datago's prefetch_batches, 2 by default,
        # plus the one being built) and DataLoader's prefetch_factor (2) waiting
        est = nbytes * workers * 5
        gib = max(1, -(-est // (1 << 30)))
        raise SharedMemoryError(
            f"datago: a batch tensor of shape {tuple(shape) or (nbytes,)} needs {nbytes:,} bytes "
            f"({nbytes / (1 << 20):.1f} MiB) of shared memory and {who} could not allocate it: "
            f"{_describe_shm()} (torch: {e}).  DataLoader workers hand their batches over in "
            f"/dev/shm; {workers} worker(s) with the default prefetching hold about "
            f"{est / (1 << 20):.0f} MiB of batches this size.  Fix: more shared memory for the "
            f"container (docker run --shm-size={gib}g or more; on Kubernetes a memory-backed "
            f"emptyDir at /dev/shm), a smaller batch_size or bucket size (or fewer workers, "
            f"a lower prefetch_batches / prefetch_factor), or num_workers=0 (which needs no "
            f"shared memory)") from e


class _Segment:
    __slots__ = ("index", "size", "flat", "ptr", "idle_uses")

    def __init__(self, index: int, size: int, shape: Tuple[int, ...] = ()):
        self.index = index
        self.size = size
        storage = _new_shared(size, shape)                      # fresh pages are zero
        self.flat = torch.empty(0, dtype=torch.uint8).set_(storage)
        self.ptr = storage.data_ptr()
        self.idle_uses = _use_count(self.flat.untyped_storage())


class Pool:
    """The segments of one process (see the module docstring)."""

    def __init__(self, limit: int = LIMIT, max_bytes: int = DEFAULT_MAX_BYTES):
        self.pid = os.getpid()
        self.limit = limit
        self.max_bytes = max_bytes
        self.flags = torch.zeros(limit, dtype=torch.uint8).share_memory_()
        self._flags = self.flags.numpy()
        self._slots: List[Optional[_Segment]] = [None] * limit
        self._by_ptr = {}
        self._lock = threading.Lock()

    def _is_free(self, seg: _Segment) -> bool:
        if _use_count(seg.flat.untyped_storage()) != seg.idle_uses:
            return False                            # a tensor in this process still uses it
        state = self._flags[seg.index]
        if state == WORKER:                         # never sent, and dropped here
            self._flags[seg.index] = FREE
            return True
        return state == FREE

    def take(self, shape: Tuple[int, ...], zero: bool) -> Tuple[torch.Tensor, str]:
        """A tensor of ``shape`` and how it was got: "reused", "created" or "unpooled"."""
        need = 1
        for d in shape:
            need *= d
        with self._lock:
            misfit = None
            for seg in self._slots:
                if seg is None or not self._is_free(seg):
                    continue
                if need <= seg.size <= max(need * _SLACK, 4096):
                    self._flags[seg.index] = WORKER
                    t = seg.flat[:need].view(*shape)
                    if zero:
                        t.zero_()
                    return t, "reused"
                misfit = seg
            if misfit is not None:                  # make room: drop a free misfit
                self._drop(misfit)
            size = _size_class(need)
            held = sum(x.size for x in self._slots if x is not None)
            index = next((i for i, s in enumerate(self._slots) if s is None), None)
            if index is None or held + size > self.max_bytes:   # full: not kept
                storage = _new_shared(need, shape)
                return torch.empty(0, dtype=torch.uint8).set_(storage).view(*shape), "unpooled"
            seg = _Segment(index, size, shape)
            self._slots[index] = seg
            self._by_ptr[seg.ptr] = seg
            self._flags[index] = WORKER
            return seg.flat[:need].view(*shape), "created"

    def _drop(self, seg: _Segment) -> None:
        self._slots[seg.index] = None
        del self._by_ptr[seg.ptr]

    def lookup(self, tensor: torch.Tensor) -> Optional[_Segment]:
        if not self._by_ptr or tensor.device.type != "cpu":
            return None
        return self._by_ptr.get(tensor.untyped_storage().data_ptr())


_POOL: Optional[Pool] = None
_POOL_LOCK = threading.Lock()
_torch_reduce = None


def pool() -> Pool:
    """This process's pool (a forked child gets its own)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _install_reducer()
            _POOL = Pool()
        return _POOL


_SUPPORTED = hasattr(torch._C, "_storage_Use_Count")      # else: no pool (torch-private API)


def alloc(shape: Tuple[int, ...], zero: bool = True,
          max_bytes: Optional[int] = None) -> Tuple[torch.Tensor, str]:
    """A uint8 tensor of ``shape`` in shared memory, from this process's pool, and
    how it was got ("reused", "created", "unpooled"); ``max_bytes`` (when given)
    bounds what the pool keeps from now on."""
    if not _SUPPORTED:
        n = 1
        for d in shape:
            n *= d
        storage = _new_shared(n, tuple(shape))
        return torch.empty(0, dtype=torch.uint8).set_(storage).view(*shape), "unpooled"
    p = pool()
    if max_bytes is not None:
        p.max_bytes = max_bytes
    return p.take(tuple(shape), zero)


def _install_reducer() -> None:
    """Route tensors pickled for other processes through ``_reduce`` (this process
    only; tensors not from the pool keep torch's own reduction)."""
    global _torch_reduce
    current = ForkingPickler._extra_reducers.get(torch.Tensor)
    if current is _reduce:
        return
    _torch_reduce = current
    ForkingPickler.register(torch.Tensor, _reduce)


def _reduce(tensor: torch.Tensor):
    p = _POOL
    seg = p.lookup(tensor) if p is not None and p.pid == os.getpid() else None
    rebuild, args = _torch_reduce(tensor)
    if seg is None:
        return rebuild, args
    p._flags[seg.index] = SENT
    return _rebuild, (rebuild, args, p.flags, seg.index)


def _rebuild(rebuild, args, flags: torch.Tensor, index: int) -> torch.Tensor:
    """In the receiving process: torch's tensor, and a finalizer that frees the
    segment in the sender's pool when this process's storage of it dies."""
    tensor = rebuild(*args)
    weakref.finalize(tensor.untyped_storage(), _release, flags.numpy(), index)
    return tensor


def _release(flags, index: int) -> None:
    flags[index] = FREE
