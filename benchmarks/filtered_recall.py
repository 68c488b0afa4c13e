"""Filtered queries: do they find the true nearest references whatever
share of the index the reference set is?

A pre-annotation queries the index with a filter: the labeled points
(``reference=None``), those of a tag, or those of a reference view. HNSW
walks a graph of every point and keeps those the filter passes; Qdrant
adds links between the points of each value of an indexed keyword (a
tag, a label) when there are enough of them, and scans a filter's points
instead of walking when they are few (``full_scan_threshold``). A filter
that no value matches alone, such as "has a label", gets no links of its
own.

The same vectors (the 10,000 real MNIST EfficientNet-Lite0 features and
noisy copies of them, 60,000 x 1,280; 20,000 with ``--quick``) go into
Qdrant Edge twice for each reference set: with the settings prelabel
used before (``full_scan_threshold`` 10,000 KB, no ACORN) and with
today's (:data:`prelabel.index.base.DEFAULT_HNSW`, ACORN for filters
without a tag). Reference sets: a random 5 / 15 / 30 / 60 % of the
points labeled and the rest not (filter: labeled), and every point
labeled with a random 5 / 25 % tagged (filter: the tag). 1,000 queries
drawn from all points, k = 15, recall@15 against exact numpy search of
the same reference set.

    python benchmarks/filtered_recall.py [--quick]
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
from index_settings import vectors  # noqa: E402

BATCH = 2000
NUM_QUERIES = 1000
#: (name, full_scan_threshold in KB, ACORN's max selectivity)
SETTINGS = [("before", 10000, 0.0), ("now", None, None)]
#: (reference set, share of the points, filtered by a tag)
REFERENCES = [
    ("labeled", 0.05, False),
    ("labeled", 0.15, False),
    ("labeled", 0.30, False),
    ("labeled", 0.60, False),
    ("tag", 0.05, True),
    ("tag", 0.25, True),
]


def build(path, V, chosen, by_tag, threshold):
    """An index of ``V``: the ``chosen`` points labeled (the others not),
    or all labeled and the ``chosen`` ones tagged ``ref``."""
    from prelabel.index import base
    from prelabel.index.edge import EdgeIndex

    hnsw = {} if threshold is None else {"full_scan_threshold": threshold}
    index = EdgeIndex(path, hnsw_config=hnsw)
    index.create(V.shape[1])
    ids = [f"{i:024x}" for i in range(len(V))]
    t0 = time.perf_counter()
    with index.session():
        for a in range(0, len(V), BATCH):
            rows = range(a, min(a + BATCH, len(V)))
            payloads = [
                base.make_payload(
                    ids[i],
                    str(i % 10) if by_tag or chosen[i] else None,
                    ["ref"] if by_tag and chosen[i] else [],
                    V[i],
                )
                for i in rows
            ]
            index.upsert(ids[a : rows.stop], V[a : rows.stop], payloads)
    t1 = time.perf_counter()
    index.optimize()
    return index, time.perf_counter() - t1, t1 - t0


def query(index, Q, flt, acorn):
    """``(seconds, ids)`` of the filtered queries, shard held open."""
    from prelabel.index import base
    from prelabel.index.locking import Lease

    saved = base.ACORN_MAX_SELECTIVITY
    if acorn is not None:
        # the code before: no ACORN, and no exact scan of an index made
        # with the old threshold (what prelabel now does for one)
        base.ACORN_MAX_SELECTIVITY = acorn
        index.scans_instead = lambda *args: False
    try:
        with Lease(index):
            index.query(Q[:50], K, flt)  # warm
            t0 = time.perf_counter()
            res = index.query(Q, K, flt)
            seconds = time.perf_counter() - t0
    finally:
        base.ACORN_MAX_SELECTIVITY = saved
    return seconds, [[int(s, 16) for s in row] for row in res.sample_ids]


def run(quick: bool) -> dict:
    from prelabel.index.base import IndexFilter

    size = 20000 if quick else 60000
    V, _ = vectors(size)
    Q = V[np.random.default_rng(0).choice(size, NUM_QUERIES, replace=False)]
    rows = []
    for kind, share, by_tag in REFERENCES:
        chosen = np.random.default_rng(5).random(size) < share
        ref = np.flatnonzero(chosen)
        t0 = time.perf_counter()
        ex, _ = common.exact_knn(Q, V[ref], K, normalized=True)
        exact_s = time.perf_counter() - t0
        exact = ref[ex].tolist()
        flt = IndexFilter.reference("ref" if by_tag else None)
        row = [f"{kind} {share:.0%}", fmt_int(len(ref))]
        for name, threshold, acorn in SETTINGS:
            print(f"  {kind} {share:.0%}: {name}", flush=True)
            tmp = tempfile.mkdtemp(prefix="bench-filtered-")
            try:
                index, optimize_s, _ = build(
                    os.path.join(tmp, "index"), V, chosen, by_tag, threshold
                )
                q_s, ids = query(index, Q, flt, acorn)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            row += [
                f"{common.recall_at_k(ids, exact, K):.4f}",
                fmt_rate(NUM_QUERIES / q_s),
                fmt_s(optimize_s),
            ]
        rows.append(row + [fmt_rate(NUM_QUERIES / exact_s)])
    return common.section(
        "Filtered queries: recall whatever the reference share",
        f"{fmt_int(size)} x {V.shape[1]} vectors (real MNIST features and "
        "noisy copies) in Qdrant Edge, once with the settings prelabel "
        "used before (`full_scan_threshold` 10,000 KB, no ACORN) and once "
        "with today's (`prelabel.index.base.DEFAULT_HNSW`: 50,000 KB; "
        "ACORN for a filter without a tag), for each reference set: a "
        "share of the points labeled and the rest not (the filter: "
        "labeled, what `reference=None` queries), or all labeled and a "
        f"share tagged (the filter: the tag). {fmt_int(NUM_QUERIES)} "
        f"queries drawn from all points, k = {K}, recall against exact "
        "search of the same reference set; optimize: building the graph "
        "after the upserts. An index keeps the threshold it was created "
        "with; ACORN applies to every index.",
        [
            common.table(
                "",
                [
                    "reference set",
                    "references",
                    "before: recall@15",
                    "before: queries/s",
                    "before: optimize s",
                    "now: recall@15",
                    "now: queries/s",
                    "now: optimize s",
                    "exact numpy queries/s",
                ],
                rows,
            )
        ],
        reproduce="python benchmarks/filtered_recall.py",
    )


if __name__ == "__main__":
    sys.exit(common.main_for(run))
