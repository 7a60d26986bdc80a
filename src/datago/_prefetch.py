"""A thread that runs an iterator ahead of its consumer (a WebDataset shard read as
a stream, an API's pages), bounded, its exceptions raised at the consumer."""

from __future__ import annotations

from typing import Optional

__all__ = ["prefetched"]


class prefetched:
    """Iterate ``items`` in a thread of its own (started by the first ``next``), at
    most ``maxsize`` ahead; its exceptions are raised here, in order; ``close()``
    stops it.  Once the end or an exception has been handed over, ``next`` raises
    StopIteration (as a generator does after it ended).  ``poll(timeout)`` is a
    ``next`` that gives up after ``timeout`` seconds."""

    _END = object()
    EMPTY = object()                               # poll(): nothing arrived in time

    def __init__(self, items, maxsize: int, name: str = "datago-stream"):
        import queue
        import threading
        self._q: "queue.Queue" = queue.Queue(max(1, maxsize))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(items),),
                                        name=name, daemon=True)
        self._started = False                      # the thread starts on the first next()
        self._finished = False                     # the end or an error was handed over

    def _put(self, item) -> bool:
        import queue
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it) -> None:
        try:
            for item in it:
                if not self._put((True, item)):
                    return
            self._put((True, self._END))
        except BaseException as e:                 # handed to the consumer
            self._put((False, e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def __iter__(self):
        return self

    def __next__(self):
        return self._take(self._get(None))

    def poll(self, timeout: float):
        """The next item, or ``EMPTY`` when none arrives within ``timeout`` seconds
        (the end and exceptions as ``next``)."""
        got = self._get(timeout)
        return self.EMPTY if got is None else self._take(got)

    def _get(self, timeout: Optional[float]):
        import queue
        if self._finished:                         # (its thread is gone: get() would hang)
            raise StopIteration
        if not self._started:
            self._started = True
            self._thread.start()
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None

    def _take(self, got):
        ok, item = got
        if not ok:
            self._stop.set()
            self._finished = True
            raise item
        if item is self._END:
            self._stop.set()
            self._finished = True
            raise StopIteration
        return item

    def close(self) -> None:
        # the thread stops at its next hand-over (it may be inside a network read,
        # bounded by timeout_s): wait a little, never the whole timeout
        self._stop.set()
        if self._started:
            self._thread.join(timeout=2.0)
