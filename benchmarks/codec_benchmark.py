"""Value codec speed against msgpack, pickle and msgspec, measured in the same run.

Each figure is the median time of one encode + decode round trip. Targets (ours / baseline):
a 5-field dict at most 0.7x msgpack, a 5-field dataclass at most 0.3x pickle. A second row
per case times the bound codec.Encoder/Decoder (what a transaction uses) against the anchor.

    python benchmarks/codec_benchmark.py            # full run
    python benchmarks/codec_benchmark.py --quick    # fewer rounds
    python benchmarks/codec_benchmark.py --json out.json
"""
import argparse
import dataclasses
import os
import pickle
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _harness import Row, median_time, print_table, write_json  # noqa: E402

import msgpack  # noqa: E402

try:
    import msgspec
except ImportError:  # msgspec is an optional baseline
    msgspec = None

from protobase._core import load  # noqa: E402

codec = load("codec")

__all__ = ["run"]


@dataclasses.dataclass
class Item:
    id: int
    name: str
    price: float
    tags: list
    active: bool


SMALL = {"id": 12345, "name": "widget", "price": 19.99, "tags": ["a", "b"], "active": True}
FLOATS = [i * 0.731 for i in range(100)]
ITEM = Item(12345, "widget", 19.99, ["a", "b"], True)
DOC = {
    "user": {"id": 981, "name": "Ada Lovelace", "email": "ada@example.org", "verified": True},
    "orders": [{"sku": f"SKU-{i:04d}", "qty": i % 4 + 1, "price": 9.5 + i, "note": "gift wrap" if i % 3 else None}
               for i in range(12)],
    "tags": ["math", "engines", "poetry", "notes"],
    "scores": [0.5, 0.75, 0.875, 0.9375],
    "meta": {"created": 1700000000, "source": "import", "version": 3},
}


def _codecs(value):
    """(name, round-trip function) for each codec that can take `value`."""
    out = [("protobase", lambda: codec.loads(codec.dumps(value)))]
    encode, decode = codec.Encoder().encode, codec.Decoder().decode
    out.append(("protobase bound", lambda: decode(encode(value))))
    if not dataclasses.is_dataclass(value):
        out.append(("msgpack", lambda: msgpack.unpackb(msgpack.packb(value))))
    out.append(("pickle", lambda: pickle.loads(pickle.dumps(value, pickle.HIGHEST_PROTOCOL))))
    if msgspec is not None:
        enc = msgspec.msgpack.Encoder()
        typed = dataclasses.is_dataclass(value)
        dec = msgspec.msgpack.Decoder(type(value)) if typed else msgspec.msgpack.Decoder()
        out.append(("msgspec", lambda: dec.decode(enc.encode(value))))
    return out


def run(quick=False):
    """Time every case; returns the Rows (ours against each baseline)."""
    number = 2000 if quick else 20000
    repeat = 5 if quick else 9
    cases = [
        ("5-field dict", SMALL, "msgpack", 0.7),
        ("list of 100 floats", FLOATS, "msgpack", None),
        ("5-field dataclass", ITEM, "pickle", 0.3),
        (f"~{len(codec.dumps(DOC))} B nested document", DOC, "msgpack", None),
    ]
    rows = []
    for name, value, anchor, target in cases:
        assert codec.loads(codec.dumps(value)) == value
        # Rounds interleave the codecs, so a burst of load on this shared machine hits all alike.
        fns = _codecs(value)
        samples = {label: [] for label, _ in fns}
        for _ in range(repeat):
            for label, fn in fns:
                samples[label].append(median_time(fn, repeat=1, number=number))
        times = {label: statistics.median(v) for label, v in samples.items()}
        ours = times.pop("protobase")
        bound = times.pop("protobase bound")
        for label, t in times.items():
            rows.append(Row(f"{name}: encode+decode vs {label}", ours, label, t,
                            target=target if label == anchor else None))
        # What a transaction pays per value: Encoder/Decoder with their hooks bound once.
        rows.append(Row(f"{name}: Encoder/Decoder vs {anchor}", bound, anchor, times[anchor]))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = run(quick=args.quick)
    print_table("protobase value codec: median encode+decode per op", rows)
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
