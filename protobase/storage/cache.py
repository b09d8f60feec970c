"""AtomBytesCache: pointer -> atom bytes, bounded by bytes, evicted by second chance (CLOCK).

Atoms are immutable once written and a pointer names exactly one atom, so the cache never
needs invalidation, with one exception: a commit that fails (or is aborted) leaves
pointers that a later commit will reuse, and ``discard_from`` drops them.

Why not an exact LRU: an OrderedDict pays on every operation (a linked-list node per
entry, ``move_to_end`` per hit, and ``update`` goes through the generic mapping path at
about 1 us an entry), and every commit inserts its atoms. Here the entries live in a plain
dict whose insertion order is their age, and a hit only sets a reference bit (membership
in the ``_ref`` set)::

    _d (oldest first):   p1  p2  p3  p4  ...  pn      <- new entries go in at the end
    _ref (hit since inserted or last spared): {p2, p4}

    sweep: p1 unreferenced -> evicted; p2 referenced -> bit cleared, moved to the end;
           p3 evicted; ... until bytes <= low water

So a hit is a dict lookup plus a set add, an insert a dict store, a commit's batch one
``dict.update``. The sweep runs only when ``bytes`` passes ``max_bytes`` and frees down to
``max_bytes - max_bytes // 8``: evicting from the front of a dict leaves dead slots that
the next sweep's iterator steps over until the dict is rebuilt, and batching the sweeps
keeps that to a few skipped slots per insert. A referenced entry is spared once per sweep
round; when every entry was referenced the second round evicts in age order, so a sweep
always terminates.

Invariants (under ``_lock``): ``bytes == sum(len(v) + ENTRY_OVERHEAD for v in _d.values())``
and ``bytes <= max_bytes`` after every operation. ``_ref`` may hold pointers no longer in
``_d`` (a lock-free hit racing an eviction); such a bit is harmless (at worst one spared
sweep for a pointer cached again) and sweeps drop them once they outnumber the entries.

Hits take no lock (a dict lookup and a set add are each atomic under the GIL). Inserts,
evictions and discards take the lock so the byte count stays exact. The hit and miss
counters live in a two-slot ``array('q')`` that the C read path increments in place
(a Python attribute increment cost as much as the lookup itself).
"""
import threading
from array import array

__all__ = ["AtomBytesCache"]

ENTRY_OVERHEAD = 64  # rough per-entry cost of the key, the dict slot and the bytes header


class AtomBytesCache:
    """Cache of atom bytes bounded by ``max_bytes`` (payload + ENTRY_OVERHEAD each),
    second-chance eviction (see the module docstring).

    The store's C read path (frame.AtomReader) serves hits and inserts misses itself,
    following ``get`` and ``put`` step for step on ``_d`` / ``_ref`` / ``_counts`` under
    ``_lock``."""

    ENTRY_OVERHEAD = ENTRY_OVERHEAD

    def __init__(self, max_bytes=64 << 20):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._counts = array("q", [0, 0])   # hits, misses
        self._d = {}
        self._ref = set()
        self._lock = threading.Lock()

    @property
    def hits(self):
        return self._counts[0]

    @property
    def misses(self):
        return self._counts[1]

    def __len__(self):
        return len(self._d)

    def __contains__(self, ptr):
        return ptr in self._d

    def get(self, ptr):
        """The bytes at ``ptr``, or None (counted as a hit or a miss)."""
        data = self._d.get(ptr)
        if data is None:
            self._counts[1] += 1
            return None
        self._ref.add(ptr)
        self._counts[0] += 1
        return data

    def put(self, ptr, data):
        cost = len(data) + ENTRY_OVERHEAD
        with self._lock:
            old = self._d.pop(ptr, None)
            if old is not None:
                self._ref.discard(ptr)
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
                self._ref.clear()
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
                # Some pointers were cached already (stale after a failed commit): their
                # bits belonged to the old bytes, and the byte count is recounted.
                self._ref.difference_update(ptrs)
                self.bytes = sum(map(len, d.values())) + ENTRY_OVERHEAD * len(d)
            else:
                self.bytes += cost
            if self.bytes > self.max_bytes:
                self._evict()

    def _evict(self):
        # Under _lock, with bytes > max_bytes: sweep from the oldest entry down to the low
        # water mark. Round one spares (and moves to the end) referenced entries; round two
        # takes entries in age order whatever their bits, so the sweep always ends.
        d, ref = self._d, self._ref
        need = self.bytes - (self.max_bytes - (self.max_bytes >> 3))
        for spare in (True, False):
            victims = []
            spared = []
            for p, data in d.items():
                if spare and p in ref:
                    spared.append(p)
                    continue
                victims.append(p)
                need -= len(data) + ENTRY_OVERHEAD
                if need <= 0:
                    break
            for p in victims:
                self.bytes -= len(d.pop(p)) + ENTRY_OVERHEAD
            if spared:
                ref.difference_update(spared)
                for p in spared:
                    d[p] = d.pop(p)
            if need <= 0:
                break
        if len(ref) > len(d):
            ref.intersection_update(d)

    def discard(self, ptrs):
        """Drop the entries of these pointers (those present)."""
        with self._lock:
            pop = self._d.pop
            ref = self._ref
            for p in ptrs:
                old = pop(p, None)
                if old is not None:
                    ref.discard(p)
                    self.bytes -= len(old) + ENTRY_OVERHEAD

    def discard_from(self, lo, hi=None):
        """Drop every entry with lo <= pointer (< hi when given)."""
        with self._lock:
            d, ref = self._d, self._ref
            for p in [p for p in d if p >= lo and (hi is None or p < hi)]:
                ref.discard(p)
                self.bytes -= len(d.pop(p)) + ENTRY_OVERHEAD

    def clear(self):
        with self._lock:
            self._d.clear()
            self._ref.clear()
            self.bytes = 0

    def stats(self):
        return {"cache_hits": self.hits, "cache_misses": self.misses,
                "cache_bytes": self.bytes, "cache_entries": len(self._d),
                "cache_max_bytes": self.max_bytes}
