"""Index settings: how a new embedded index keeps its vectors, chosen by
measurement. The same vectors go into Qdrant Edge under each setting:

- float32 vectors, Qdrant's HNSW defaults (``m`` 16, ``ef_construct``
  100), which prelabel used before;
- float32, ``ef_construct`` 64;
- int8 scalar quantization, ``ef_construct`` 100 (the default of a new
  index) and 64, the top candidates rescored with the float32 vectors
  (``oversampling`` 2);
- int8 without rescoring, to show what rescoring buys.

For each: the upsert (2,000 points a request, payloads as a sync writes
them), ``optimize()`` (the HNSW graph), filtered query throughput (1,000
queries, references = the 25 % of points tagged ``train``, k = 15, the
shard held open as ``stream`` holds it) at the default search ``ef`` and
at ``hnsw_ef`` 32, recall@15 against exact search, and exact numpy on the
same queries. The vectors: the 10,000 real MNIST EfficientNet-Lite0
features and noisy copies of them (noise norm 0.35 x the vector's, as in
the sync and kNN benchmarks) up to 60,000 (20,000 with ``--quick``).

    python benchmarks/index_settings.py [--quick]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402
from common import K, fmt_int, fmt_rate, fmt_s  # noqa: E402

BATCH = 2000
NUM_QUERIES = 1000
REL = 0.35

#: (name, quantization, hnsw settings, oversampling)
SETTINGS = [
    ("float32, ef_construct 100", None, {"ef_construct": 100}, None),
    ("float32, ef_construct 64", None, {"ef_construct": 64}, None),
    ("int8 rescored, ef_construct 100 (default)", "int8", {}, 2.0),
    ("int8 rescored, ef_construct 64", "int8", {"ef_construct": 64}, 2.0),
    ("int8 not rescored, ef_construct 100", "int8", {}, 0.0),
]


def settings(quick: bool) -> dict:
    return {"size": 20000 if quick else 60000}


def vectors(size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(unit vectors, train mask)``: the real features and noisy copies,
    a random quarter tagged ``train`` (seeded)."""
    X, _, _ = common.real_features()
    parts, seed = [X], 2
    while sum(len(p) for p in parts) < size:
        parts.append(common.noisy_copies(X, seed=seed, rel=REL))
        seed += 1
    V = common.normalize(np.concatenate(parts)[:size])
    train = np.random.default_rng(3).random(size) < 0.25
    return V, train


def build(path, V, train, quantization, hnsw) -> dict:
    from prelabel.index import base
    from prelabel.index.edge import EdgeIndex

    index = EdgeIndex(path, quantization=quantization, hnsw_config=hnsw)
    index.create(V.shape[1])
    ids = [f"{i:024x}" for i in range(len(V))]
    t0 = time.perf_counter()
    with index.session():
        for a in range(0, len(V), BATCH):
            payloads = [
                base.make_payload(sid, "0", ["train" if t else "test"], v)
                for sid, t, v in zip(
                    ids[a : a + BATCH],
                    train[a : a + BATCH],
                    V[a : a + BATCH],
                    strict=True,
                )
            ]
            index.upsert(ids[a : a + BATCH], V[a : a + BATCH], payloads)
    upsert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.optimize()
    return index, {
        "upsert_s": upsert_s,
        "optimize_s": time.perf_counter() - t0,
    }


def query(index, Q, oversampling, hnsw_ef):
    """``(seconds, ids)`` of the filtered queries, shard held open."""
    from prelabel.index.base import IndexFilter
    from prelabel.index.locking import Lease

    flt = IndexFilter(tags=("train",))
    if oversampling is not None:
        if oversampling:
            index.oversampling = oversampling
        else:
            index.quantization = None  # the engine's default: no rescoring
    with Lease(index):
        index.query(Q[:100], K, flt, hnsw_ef=hnsw_ef)  # warm
        t0 = time.perf_counter()
        res = index.query(Q, K, flt, hnsw_ef=hnsw_ef)
        seconds = time.perf_counter() - t0
    return seconds, [[int(s, 16) for s in row] for row in res.sample_ids]


def run(quick: bool) -> dict:
    size = settings(quick)["size"]
    V, train = vectors(size)
    rng = np.random.default_rng(0)
    Q = V[rng.choice(size, NUM_QUERIES, replace=False)]
    ref = np.flatnonzero(train)
    t0 = time.perf_counter()
    ex, _ = common.exact_knn(Q, V[ref], K, normalized=True)
    exact_s = time.perf_counter() - t0
    exact = ref[ex].tolist()
    rows = []
    for name, quantization, hnsw, oversampling in SETTINGS:
        print(f"  {name}")
        tmp = tempfile.mkdtemp(prefix="bench-index-settings-")
        try:
            index, r = build(
                os.path.join(tmp, "index"), V, train, quantization, hnsw
            )
            cells = []
            for ef in (None, 32):
                q_s, ids = query(index, Q, oversampling, ef)
                cells += [
                    fmt_rate(NUM_QUERIES / q_s),
                    f"{common.recall_at_k(ids, exact, K):.4f}",
                ]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        rows.append(
            [
                name,
                fmt_s(r["upsert_s"]),
                fmt_s(r["optimize_s"]),
                fmt_s(r["upsert_s"] + r["optimize_s"]),
                *cells,
            ]
        )
    rows.append(
        [
            "exact numpy (no index)",
            "",
            "",
            "",
            fmt_rate(NUM_QUERIES / exact_s),
            "1.0000",
            "",
            "",
        ]
    )
    return common.section(
        "Index settings: quantization and HNSW, chosen by measurement",
        f"{fmt_int(size)} x {V.shape[1]} vectors (real MNIST features and "
        f"noisy copies) in Qdrant Edge under each setting; "
        f"{fmt_int(NUM_QUERIES)} queries filtered to the "
        f"{fmt_int(len(ref))} points tagged `train`, k = {K}, recall "
        "against exact search. The row marked default is what a new "
        "index gets (`prelabel.index.base.DEFAULT_QUANTIZATION`, "
        "`DEFAULT_HNSW`); an existing index keeps the settings it was "
        "created with.",
        [
            common.table(
                "",
                [
                    "setting",
                    "upsert s",
                    "optimize s",
                    "ready s",
                    "queries/s",
                    "recall@15",
                    "queries/s (ef 32)",
                    "recall@15 (ef 32)",
                ],
                rows,
            )
        ],
        reproduce="python benchmarks/index_settings.py",
    )


if __name__ == "__main__":
    sys.exit(common.main_for(run))
