"""Every example runs against the installed package and produces its documented result."""
import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"pb_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_has_a_test():
    scripts = sorted(p.stem for p in EXAMPLES.glob("*.py"))
    assert scripts == sorted(["shopping_carts", "sessions", "leaderboard", "telemetry",
                              "social_graph", "cache", "feature_store"])


def test_shopping_carts_lose_no_item_under_conflicts(tmp_path):
    out = _load("shopping_carts").main(str(tmp_path / "db.pb"), threads=4, adds_per_thread=25)
    assert out["items"] == out["expected"] == 102
    assert sum(len(c["items"]) for c in out["carts"].values()) == 102


def test_sessions_sweep_removes_exactly_the_expired(tmp_path):
    out = _load("sessions").main(str(tmp_path / "db.pb"))
    assert out["expired"] == 2 and out["alive"] == ["chloe", "dev", "eve"]
    assert "IndexedSearchPlan" in out["plan"]


def test_leaderboard_ranks_match_a_sorted_list(tmp_path):
    out = _load("leaderboard").main(str(tmp_path / "db.pb"), players=100, games=500)
    assert len(out["podium"]) == 3
    scores = [s for _, s in out["podium"]]
    assert scores == sorted(scores, reverse=True)
    assert out["rank"] == out["players"] // 2 + 1


def test_telemetry_appends_never_conflict_and_windows_agree(tmp_path):
    out = _load("telemetry").main(str(tmp_path / "db.pb"), sensors=3, batches=8)
    assert out["readings"] == 3 * 8 * 20
    assert out["conflicts"] == 0
    assert out["window"] > 0
    assert "IndexedSearchPlan" in out["plan"]


def test_social_graph_shares_one_set_between_two_paths(tmp_path):
    out = _load("social_graph").main(str(tmp_path / "db.pb"))
    assert out["friends"] == out["circle"] == {"ben", "chloe", "finn"}
    assert out["collections"] == 9


def test_cache_increments_and_transfers_are_atomic(tmp_path):
    out = _load("cache").main(str(tmp_path / "db.pb"), threads=3, ops=15)
    assert out["hits"] == 45
    assert sum(out["balances"]) == 300
    assert out["expired"] == ["greeting"] and "greeting" not in out["keys"]


def test_feature_store_matches_the_brute_force_oracle(tmp_path):
    pytest.importorskip("numpy")
    out = _load("feature_store").main(str(tmp_path / "db.pb"), entities=1500)
    assert out["found"] == out["oracle"] and out["found"][0] == "u00010"
    assert out["candidates"] == sum(1 for i in range(1500) if i % 3 == 1 and 25 <= 18 + i % 60 <= 40)
    assert "AndMerge" in out["plan"]
    assert out["vector_index"] == (importlib.util.find_spec("hnswlib") is not None)


def test_examples_do_not_reach_into_the_source_tree():
    for path in EXAMPLES.glob("*.py"):
        text = path.read_text()
        assert "sys.path" not in text and "protobase._" not in text, path.name
        assert '\nif __name__ == "__main__":\n' in text, path.name
