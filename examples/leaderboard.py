"""A game leaderboard on a ``pb.SortedDict``.

Entries are keyed ``(-score, player)`` so key order is rank order (ties by name); a plain
``pb.Dict`` maps each player to their current score so an update can find and remove the
old entry. ``irange`` gives a score band, ``peekitem`` the leader and the last place in
O(log n), and ``bisect_left`` a player's rank without walking the board.
"""
import os
import random
import tempfile
from typing import Any, Dict, List, Tuple

import protobase as pb


def submit(tx: pb.Transaction, player: str, score: int) -> None:
    """Record a score; a player keeps their best."""
    best = tx["best"]
    old = best.get(player)
    if old is not None:
        if score <= old:
            return
        del tx["board"][(-old, player)]
    best[player] = score
    tx["board"][(-score, player)] = player


def top(tx: pb.Transaction, n: int) -> List[Tuple[str, int]]:
    board = tx["board"]
    return [(board[k], -k[0]) for k in board.irange()][:n]


def rank(tx: pb.Transaction, player: str) -> int:
    """1-based rank of a player."""
    return tx["board"].bisect_left((-tx["best"][player], player)) + 1


def between(tx: pb.Transaction, low: int, high: int) -> List[str]:
    """Players whose best score is in [low, high], best first."""
    return [p for _, p in tx["board"].irange((-high, ""), (-low, "\U0010ffff"))]


def main(path: str, players: int = 300, games: int = 1500, seed: int = 1) -> Dict[str, Any]:
    rng = random.Random(seed)
    oracle: Dict[str, int] = {}
    with pb.open(path) as db:
        with db.transaction() as tx:
            tx["board"] = pb.SortedDict()
            tx["best"] = pb.Dict()
        with db.transaction() as tx:
            for _ in range(games):
                player, score = f"player{rng.randrange(players):03d}", rng.randrange(100000)
                submit(tx, player, score)
                oracle[player] = max(score, oracle.get(player, score))
        ranked = sorted(oracle.items(), key=lambda ps: (-ps[1], ps[0]))
        with db.transaction(readonly=True) as tx:
            podium = top(tx, 3)
            leader = tx["board"].peekitem(0)
            last = tx["board"].peekitem(-1)
            someone = ranked[len(ranked) // 2][0]
            their_rank = rank(tx, someone)
            band = between(tx, 40000, 45000)
        assert podium == ranked[:3]
        assert leader == ((-ranked[0][1], ranked[0][0]), ranked[0][0])
        assert last[1] == ranked[-1][0]
        assert their_rank == len(ranked) // 2 + 1
        assert band == [p for p, s in ranked if 40000 <= s <= 45000]
        print("top 3:", ", ".join(f"{p} ({s})" for p, s in podium))
        print(f"{someone} is ranked {their_rank} of {len(ranked)}; "
              f"{len(band)} players scored 40000..45000")
        return {"podium": podium, "rank": their_rank, "players": len(ranked), "band": band}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        main(os.path.join(d, "leaderboard.pb"))
