"""Web sessions with expiry.

Sessions live in a ``pb.Dict`` indexed on their expiry time, so "which sessions have
expired?" is an index range query, not a scan; a sweep deletes them in one transaction.
Touching a session (sliding expiry) is a write to one key, so sweeps and requests on other
sessions never conflict. The clock is passed in, so the example is deterministic.
"""
import os
import tempfile
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, List, Optional

import protobase as pb
from protobase import F

TTL = timedelta(minutes=30)


def login(tx: pb.Transaction, user: str, now: datetime) -> str:
    sid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{user}@{now.isoformat()}"))
    tx["sessions"][sid] = {"user": user, "created": now, "expires": now + TTL, "cart": []}
    return sid


def touch(tx: pb.Transaction, sid: str, now: datetime) -> Optional[Dict[str, Any]]:
    """The live session (its expiry pushed back), or None when it is gone or expired."""
    session = tx["sessions"].get(sid)
    if session is None or session["expires"] <= now:
        return None
    session["expires"] = now + TTL
    tx["sessions"][sid] = session
    return session


def sweep(tx: pb.Transaction, now: datetime) -> List[str]:
    """Delete every expired session; returns their ids."""
    sessions = tx["sessions"]
    expired = list(sessions.where(F.expires <= now).keys())
    for sid in expired:
        del sessions[sid]
    return expired


def main(path: str) -> Dict[str, Any]:
    t0 = datetime(2026, 1, 1, 9, 0, tzinfo=timezone.utc)
    with pb.open(path) as db:
        with db.transaction() as tx:
            tx["sessions"] = pb.Dict()
            tx["sessions"].create_index("expires")
        sids = {}
        for i, user in enumerate(["ana", "ben", "chloe", "dev", "eve"]):
            sids[user] = db.run(login, user, t0 + timedelta(minutes=5 * i))

        # At 9:37 ana (logged in at 9:00) and ben (9:05) have expired; chloe (9:10) is
        # active and slides her expiry forward.
        now = t0 + timedelta(minutes=37)
        assert db.run(touch, sids["chloe"], now) is not None
        assert db.run(touch, sids["ana"], now) is None
        with db.transaction(readonly=True) as tx:
            plan = tx["sessions"].where(F.expires <= now).explain()
        print(plan)
        gone = db.run(sweep, now)
        with db.transaction(readonly=True) as tx:
            alive = sorted(s["user"] for s in tx["sessions"].values())
            chloe_expires = tx["sessions"][sids["chloe"]]["expires"]
        assert sorted(gone) == sorted([sids["ana"], sids["ben"]])
        assert alive == ["chloe", "dev", "eve"]
        assert chloe_expires == now + TTL and chloe_expires.tzinfo is not None
        print(f"swept {len(gone)} expired sessions; alive: {', '.join(alive)}")
        return {"expired": len(gone), "alive": alive, "plan": plan}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        main(os.path.join(d, "sessions.pb"))
