"""Bad keys and misused queries get typed errors that say what to do.

A signaling NaN is refused as a key (dict refuses it too), while quiet NaNs (float and
Decimal) are one key everywhere, before and after a round trip through the file; a key
of an unsupported type is a SerializationError (a TypeError) naming the type and the
allowed ones; matching_ids() on a collection without row ids is a QueryError."""
import math
from decimal import Decimal

import pytest

import protobase as pb
from protobase.errors import QueryError, SerializationError
from protobase.query import F

KINDS = ["Dict", "SortedDict", "Set"]


def _put(coll, key):
    if isinstance(coll, pb.Set):
        coll.add(key)
    else:
        coll[key] = "v"


@pytest.fixture
def db(tmp_path):
    d = pb.open(str(tmp_path / "keys.pb"))
    yield d
    d.close()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("key", [Decimal("sNaN"), Decimal("-sNaN"), ("a", Decimal("sNaN"))], ids=repr)
def test_a_signaling_nan_key_is_refused_like_dict_and_changes_nothing(db, kind, key):
    with pytest.raises(TypeError):
        {}[key] = 1                    # the oracle: dict refuses it too
    with db.transaction() as tx:
        tx["c"] = getattr(pb, kind)()
        coll = tx["c"]
        _put(coll, 1)
        with pytest.raises(SerializationError, match="sNaN") as err:
            _put(coll, key)
        assert err.value.type_name == "Decimal"
        with pytest.raises(SerializationError):
            key in coll
        assert Decimal("NaN") not in coll
        assert len(coll) == 1
    with db.transaction() as tx:
        assert len(tx["c"]) == 1 and Decimal("NaN") not in tx["c"]


@pytest.mark.parametrize("kind", KINDS)
def test_quiet_nans_are_one_key_before_and_after_reopening(tmp_path, kind):
    path = str(tmp_path / "nan.pb")
    with pb.open(path) as db:
        with db.transaction() as tx:
            tx["c"] = getattr(pb, kind)()
            coll = tx["c"]
            _put(coll, float("nan"))
            _put(coll, Decimal("NaN"))
            _put(coll, -float("nan"))
            _put(coll, 1.5)
            assert len(coll) == 2
            assert float("nan") in coll and Decimal("NaN") in coll and 1.5 in coll
            assert Decimal("Infinity") not in coll and math.inf not in coll
    with pb.open(path, readonly=True) as db:
        with db.transaction() as tx:
            coll = tx["c"]
            assert len(coll) == 2
            assert float("nan") in coll and Decimal("-NaN") in coll
            keys = list(coll)
            assert sum(1 for k in keys if k != k) == 1 and 1.5 in keys


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("key", [[1], {"a": 1}, {1}, object(), (1, [2])], ids=lambda k: type(k).__name__)
def test_an_unsupported_key_type_is_a_serialization_error_naming_it_and_the_allowed_types(db, kind, key):
    with db.transaction() as tx:
        tx["c"] = getattr(pb, kind)()
        coll = tx["c"]
        with pytest.raises(SerializationError) as err:
            _put(coll, key)
        assert isinstance(err.value, TypeError)
        msg = str(err.value)
        named = "list" if isinstance(key, tuple) else type(key).__name__
        assert repr(named) in msg and "str" in msg and "tuple" in msg and "UUID" in msg
        assert err.value.type_name == named
        assert len(coll) == 0


@pytest.mark.parametrize("kind", ["Dict", "List"])
@pytest.mark.parametrize("stored", [False, True], ids=["new", "stored"])
def test_matching_ids_without_an_index_is_a_query_error_saying_to_create_one(db, kind, stored):
    rows = [{"x": 1}, {"x": 2}]
    with db.transaction() as tx:
        tx["c"] = pb.Dict({"a": rows[0], "b": rows[1]}) if kind == "Dict" else pb.List(rows)
        if not stored:
            for q in (tx["c"].where(F.x == 1), tx["c"].where()):
                with pytest.raises(QueryError, match="create_index"):
                    q.matching_ids()
    if stored:
        with db.transaction() as tx:
            for q in (tx["c"].where(F.x == 1), tx["c"].where()):
                with pytest.raises(QueryError, match="create_index"):
                    q.matching_ids()
            assert list(tx["c"].where(F.x == 1)) == [{"x": 1}]   # the query itself scans
    with db.transaction() as tx:
        tx["c"].create_index("x")
        assert len(tx["c"].where(F.x == 1).matching_ids()) == 1
