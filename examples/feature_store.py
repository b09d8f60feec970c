"""An ML feature store: filter on metadata, then rank by embedding similarity.

Entities carry scalar features (indexed: ``segment``, ``age``) and an embedding. A lookup
is a hybrid query: ``where(segment == ..., age between ...)`` picks the candidates through
the indexes, then ``nearest()`` ranks them by cosine distance, through an HNSW index when
hnswlib is installed (``pip install "protobase[vector]"``). Without vector search the
example ranks the filtered candidates exactly with numpy; either way the answer is checked
against a brute-force numpy oracle.
"""
import importlib.util
import os
import tempfile
from typing import Any, Dict, List, Tuple

import numpy as np

import protobase as pb
from protobase import F

DIM = 16


def vector_search_available() -> bool:
    """Does filtered nearest-neighbour search through an HNSW index work here? Tried on a
    tiny in-memory database rather than assumed from what is importable."""
    if importlib.util.find_spec("hnswlib") is None:
        return False
    try:
        with pb.open() as db, db.transaction() as tx:
            tx["probe"] = pb.Dict({1: {"v": [1.0, 0.0]}, 2: {"v": [0.0, 1.0]}})
            tx["probe"].create_vector_index("v", dim=2, metric="l2")
            hits = tx["probe"].where().nearest("v", [0.9, 0.1], k=1)
            return [key for key, _, _ in hits.scored()] == [1]
    except Exception:  # an incomplete vector layer: use the exact fallback
        return False


def exact_nearest(rows: List[Tuple[Any, Any]], query: np.ndarray, k: int) -> List[Any]:
    """The keys of the k rows whose embedding is nearest to `query` by cosine distance."""
    if not rows:
        return []
    keys = [key for key, _ in rows]
    m = np.stack([np.asarray(v["embedding"], dtype=np.float64) for _, v in rows])
    q = np.asarray(query, dtype=np.float64)
    cos = m @ q / (np.linalg.norm(m, axis=1) * np.linalg.norm(q))
    order = np.argsort(1.0 - cos, kind="stable")[:k]
    return [keys[i] for i in order]


def main(path: str, entities: int = 3000, k: int = 5, seed: int = 11) -> Dict[str, Any]:
    rng = np.random.default_rng(seed)
    segments = ["free", "pro", "team"]
    embeddings = rng.normal(size=(entities, DIM)).astype(np.float32)
    use_index = vector_search_available()
    with pb.open(path) as db:
        with db.transaction() as tx:
            tx["users"] = pb.Dict({
                f"u{i:05d}": {"segment": segments[i % 3], "age": int(18 + i % 60),
                              "spend": float(i % 97), "embedding": embeddings[i]}
                for i in range(entities)})
        with db.transaction() as tx:
            users = tx["users"]
            users.create_index("segment")
            users.create_index("age")
            if use_index:
                users.create_vector_index("embedding", dim=DIM, metric="cosine")

        query = embeddings[10] + rng.normal(scale=0.05, size=DIM).astype(np.float32)
        with db.transaction(readonly=True) as tx:
            candidates = tx["users"].where(F.segment == "pro", F.age.between(25, 40))
            plan = candidates.explain()
            rows = list(candidates.items())
            if use_index:
                hits = candidates.nearest("embedding", query, k=k)
                found = [key for key, _, _ in hits.scored()]
            else:
                found = exact_nearest(rows, query, k)
            stored = tx["users"]["u00010"]["embedding"]
        oracle_rows = [(f"u{i:05d}", {"embedding": embeddings[i]}) for i in range(entities)
                       if segments[i % 3] == "pro" and 25 <= 18 + i % 60 <= 40]
        oracle = exact_nearest(oracle_rows, query, k)
        assert sorted(key for key, _ in rows) == [key for key, _ in oracle_rows]
        assert found == oracle, (found, oracle)
        assert isinstance(stored, np.ndarray) and stored.dtype == np.float32
        assert np.array_equal(stored, embeddings[10])
        assert found[0] == "u00010", "the entity the query was drawn from comes first"
        how = "HNSW index" if use_index else "exact numpy scan (no vector index available)"
        print(f"{len(rows)} candidates of {entities} by index; top {k} by {how}: {found}")
        print(plan)
        return {"candidates": len(rows), "found": found, "oracle": oracle,
                "vector_index": use_index, "plan": plan}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        main(os.path.join(d, "features.pb"))
