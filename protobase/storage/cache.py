"""AtomBytesCache: pointer -> atom bytes, least-recently-used first out, bounded by bytes.

Atoms are immutable once written and a pointer names exactly one atom, so the cache never
needs invalidation, with one exception: a commit that fails (or is aborted) leaves
pointers that a later commit will reuse, and ``discard_from`` drops them.

Hits take no lock (a dict lookup and move_to_end are each atomic under the GIL; a
concurrent eviction shows up as a KeyError and is treated as a miss). Inserts and
evictions take a lock so the byte count stays exact.
"""
import threading
from collections import OrderedDict

__all__ = ["AtomBytesCache"]

ENTRY_OVERHEAD = 64  # rough per-entry cost of the key, the dict slot and the bytes header


class AtomBytesCache:
    """LRU cache of atom bytes bounded by ``max_bytes`` (payload + ENTRY_OVERHEAD each).

    The store's C read path (frame.AtomReader) serves hits and inserts misses itself,
    following ``get`` and ``put`` step for step on ``_d`` under ``_lock``."""

    ENTRY_OVERHEAD = ENTRY_OVERHEAD

    def __init__(self, max_bytes=64 << 20):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._d = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._d)

    def __contains__(self, ptr):
        return ptr in self._d

    def get(self, ptr):
        """The bytes at ``ptr``, or None (counted as a hit or a miss)."""
        d = self._d
        data = d.get(ptr)
        if data is None:
            self.misses += 1
            return None
        try:
            d.move_to_end(ptr)
        except KeyError:
            pass
        self.hits += 1
        return data

    def put(self, ptr, data):
        cost = len(data) + ENTRY_OVERHEAD
        with self._lock:
            old = self._d.pop(ptr, None)
            if old is not None:
                self.bytes -= len(old) + ENTRY_OVERHEAD
            if cost > self.max_bytes:
                return
            self._d[ptr] = data
            self.bytes += cost
            if self.bytes > self.max_bytes:
                self._evict()

    def put_many(self, ptrs, datas, payload_bytes):
        """Insert many new atoms at once (pointers not already cached, e.g. a fresh
        commit's); ``payload_bytes`` is the sum of their lengths."""
        cost = payload_bytes + ENTRY_OVERHEAD * len(ptrs)
        with self._lock:
            d = self._d
            if cost > self.max_bytes:
                # The batch alone overflows the budget: the cache keeps only the newest atoms
                # that fit; everything cached before is older than the ones dropped.
                d.clear()
                self.bytes = 0
                budget = self.max_bytes
                keep = len(ptrs)
                while keep and budget - (len(datas[keep - 1]) + ENTRY_OVERHEAD) >= 0:
                    keep -= 1
                    budget -= len(datas[keep]) + ENTRY_OVERHEAD
                ptrs, datas = ptrs[keep:], datas[keep:]
                cost = self.max_bytes - budget
            before = len(d)
            d.update(zip(ptrs, datas))
            if len(d) - before != len(ptrs):
                # Some pointers were cached already (stale after a failed commit): recount.
                self.bytes = sum(map(len, d.values())) + ENTRY_OVERHEAD * len(d)
            else:
                self.bytes += cost
            if self.bytes > self.max_bytes:
                self._evict()

    def _evict(self):
        d = self._d
        while self.bytes > self.max_bytes and d:
            _, old = d.popitem(last=False)
            self.bytes -= len(old) + ENTRY_OVERHEAD

    def discard(self, ptrs):
        """Drop the entries of these pointers (those present)."""
        with self._lock:
            pop = self._d.pop
            for p in ptrs:
                old = pop(p, None)
                if old is not None:
                    self.bytes -= len(old) + ENTRY_OVERHEAD

    def discard_from(self, lo, hi=None):
        """Drop every entry with lo <= pointer (< hi when given)."""
        with self._lock:
            d = self._d
            for p in [p for p in d if p >= lo and (hi is None or p < hi)]:
                self.bytes -= len(d.pop(p)) + ENTRY_OVERHEAD

    def clear(self):
        with self._lock:
            self._d.clear()
            self.bytes = 0

    def stats(self):
        return {"cache_hits": self.hits, "cache_misses": self.misses,
                "cache_bytes": self.bytes, "cache_entries": len(self._d),
                "cache_max_bytes": self.max_bytes}
