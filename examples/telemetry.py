"""Telemetry ingestion: sensors write readings concurrently; dashboards ask for time ranges.

Every reading is appended to a ``pb.List`` (the raw log: appends from concurrent
transactions commute, so they never conflict) and stored in a ``pb.SortedDict`` keyed
``(timestamp, sensor)``, so a time window is one ``irange`` walk. A ``pb.Dict`` of the
same readings indexed on ``ts`` answers the window as an index query too; both must agree
with a plain filter over the log. The log itself is indexed on ``sensor``: a List query
answers with positions in the log, and concurrent appends stay conflict-free.
"""
import os
import random
import tempfile
import threading
from typing import Any, Dict, List, Tuple

import protobase as pb
from protobase import F


def ingest(tx: pb.Transaction, batch: List[Dict[str, Any]]) -> None:
    log, by_time, by_id = tx["log"], tx["by_time"], tx["by_id"]
    for r in batch:
        log.append(r)
        by_time[(r["ts"], r["sensor"])] = r["value"]
        by_id[(r["sensor"], r["seq"])] = r


def window(tx: pb.Transaction, start: float, end: float) -> List[Tuple[float, str, float]]:
    """Readings with start <= ts < end, in time order, from the SortedDict."""
    by_time = tx["by_time"]
    return [(ts, s, by_time[(ts, s)])
            for ts, s in by_time.irange((start,), (end,), inclusive=(True, False))]


def main(path: str, sensors: int = 4, batches: int = 15, batch_size: int = 20,
         seed: int = 3) -> Dict[str, Any]:
    with pb.open(path, durability="normal") as db:
        with db.transaction() as tx:
            tx["log"] = pb.List()
            tx["log"].create_index("sensor")
            tx["by_time"] = pb.SortedDict()
            tx["by_id"] = pb.Dict()
            tx["by_id"].create_index("ts")
        conflicts_before = db.stats()["conflicts"]

        def sensor(n: int) -> None:
            rng = random.Random(seed * 100 + n)
            name = f"sensor-{n}"
            for b in range(batches):
                batch = []
                for i in range(batch_size):
                    seq = b * batch_size + i
                    batch.append({"sensor": name, "seq": seq, "ts": seq + rng.random(),
                                  "value": round(rng.gauss(20.0, 2.0), 3)})
                db.run(ingest, batch)

        workers = [threading.Thread(target=sensor, args=(n,)) for n in range(sensors)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        conflicts = db.stats()["conflicts"] - conflicts_before

        start, end = 100.0, 140.0
        with db.transaction(readonly=True) as tx:
            log = list(tx["log"])
            from_sorted = window(tx, start, end)
            query = tx["by_id"].where(F.ts >= start, F.ts < end)
            from_index = sorted((r["ts"], r["sensor"], r["value"]) for r in query)
            plan = query.explain()
            of_sensor_1 = list(tx["log"].where(sensor="sensor-1").items())
        expected = sorted((r["ts"], r["sensor"], r["value"]) for r in log if start <= r["ts"] < end)
        total = sensors * batches * batch_size
        assert len(log) == total
        for n in range(sensors):   # each sensor's readings arrive in its own order
            seqs = [r["seq"] for r in log if r["sensor"] == f"sensor-{n}"]
            assert seqs == list(range(batches * batch_size))
        assert from_sorted == expected and from_index == expected
        assert of_sensor_1 == [(i, r) for i, r in enumerate(log) if r["sensor"] == "sensor-1"]
        assert conflicts == 0, "appends and distinct keys never conflict"
        mean = sum(v for _, _, v in from_sorted) / len(from_sorted)
        print(f"{total} readings from {sensors} concurrent sensors, {conflicts} conflicts; "
              f"{len(from_sorted)} in [{start}, {end}), mean {mean:.2f}")
        print(plan)
        return {"readings": total, "window": len(from_sorted), "conflicts": conflicts,
                "plan": plan}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        main(os.path.join(d, "telemetry.pb"))
