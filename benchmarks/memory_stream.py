"""Memory of the one-click setting as the targets grow: peak RSS of
``preannotate(mode="adapted", target_precision=0.99)`` at 20,000 and at
200,000 targets, each in a fresh child process.

Data: the 10,000 real MNIST EfficientNet-Lite0 (112 px) features that the
demo computes. 2,500 of them (a seeded split) are the labeled references;
the targets are noisy copies of the other 7,500 (Gaussian noise of 0.33 x
the vector's norm, seeded; the digit's label carried over for scoring),
cycled to the wanted count. The vectors are written straight into the
dataset (no images) and the frozen index is synced in a setup child.

Three measured children per size:

1. *first call*: learns the adapter, writes and indexes the adapted
   embeddings (``<key>_adapted``), then pre-annotates;
2. *again*: the same call with the adapted index already built (reused
   while the references do not change): the pre-annotation path itself;
3. *again, traced*: the same under ``tracemalloc``, for the peak of what
   Python holds (prelabel's and FiftyOne's objects and numpy arrays; not
   the embedded engine's own memory, which is native).

Each child reports its own peak RSS (``VmHWM``) and the peak of its
anonymous memory (``RssAnon``, polled every 0.1 s: the heap, without the
index files the engine maps), measured from a baseline taken after the
imports.

    python benchmarks/memory_stream.py [--quick]   # quick: 2,000 / 20,000
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402
from common import fmt_mb, fmt_s  # noqa: E402

DATASET = f"{common.PREFIX}memory-stream"
NUM_REF = 2500
NOISE = 0.33
KEY = "mem"


#: the measured children of each size
RUNS = ("first call", "again", "again, traced")


def sizes(quick: bool) -> list[int]:
    return [2000, 20000] if quick else [20000, 200000]


# ---- children ------------------------------------------------------------


def child_setup(num_targets: int) -> dict:
    """The dataset of ``num_targets`` noisy targets and the references,
    and its frozen index."""
    import prelabel

    X, y, _ = common.real_features()
    order = np.random.default_rng(0).permutation(len(X))
    ref, pool = order[:NUM_REF], order[NUM_REF:]
    src = pool[np.arange(num_targets) % len(pool)]
    T = common.noisy_copies(X[src], seed=1, rel=NOISE)
    vectors = np.concatenate([X[ref], T])
    labels = np.concatenate([y[ref], y[src]])
    tags = ["train"] * NUM_REF + ["test"] * num_targets
    t0 = time.perf_counter()
    dataset = common.vector_dataset(DATASET, vectors, labels, tags)
    del vectors, T
    dataset.persistent = True
    t1 = time.perf_counter()
    prelabel.sync_index(
        dataset,
        embeddings_field="emb",
        label_field="ground_truth",
        brain_key=KEY,
        progress=False,
    )
    return {"write_s": t1 - t0, "sync_s": time.perf_counter() - t1}


def child_run(traced: bool = False) -> dict:
    """One measured ``preannotate(mode="adapted", target_precision=0.99)``
    (with ``traced``, under ``tracemalloc``)."""
    import tracemalloc

    fo = common.fiftyone()
    import prelabel

    dataset = fo.load_dataset(DATASET)
    targets = dataset.match_tags("test")
    base = {"rss": common.self_peak_rss(), "anon": common.AnonPeak.now()}
    if traced:
        tracemalloc.start(1)
    t0 = time.perf_counter()
    with common.AnonPeak() as anon:
        res = prelabel.preannotate(
            targets,
            index=KEY,
            reference="train",
            label_field="ground_truth",
            pred_field="prelabel",
            mode="adapted",
            target_precision=0.99,
            progress=False,
        )
    seconds = time.perf_counter() - t0
    heap = tracemalloc.get_traced_memory()[1] if traced else None
    tracemalloc.stop()
    peak = common.self_peak_rss()
    truth, pred, ok = targets.values(
        ["ground_truth.label", "prelabel.label", "prelabel.accepted"]
    )
    right = [t == p for t, p, a in zip(truth, pred, ok, strict=True) if a]
    return {
        "seconds": seconds,
        "stages": res.seconds,
        "base_rss": base["rss"],
        "peak_rss": peak,
        "base_anon": base["anon"],
        "peak_anon": anon.peak,
        "peak_heap": heap,
        "num_targets": res.num_targets,
        "accuracy": float(
            np.mean([t == p for t, p in zip(truth, pred, strict=True)])
        ),
        "coverage": res.coverage,
        "accepted_precision": float(np.mean(right)) if right else None,
    }


# ---- the parent ----------------------------------------------------------


def measure(num_targets: int) -> dict:
    me = os.path.abspath(__file__)
    try:
        setup = common.run_measured(
            [common.PY, me, "--child-setup", str(num_targets)]
        )
        if setup["returncode"] != 0:
            raise RuntimeError(f"setup failed:\n{setup['tail']}")
        runs = []
        for flag in ("--child-run", "--child-run", "--child-run-traced"):
            m = common.run_measured([common.PY, me, flag])
            if m["returncode"] != 0 or m["result"] is None:
                raise RuntimeError(f"the run failed:\n{m['tail']}")
            runs.append(m["result"])
        return {"setup": setup["result"], "runs": runs}
    finally:
        common.delete_dataset(DATASET)


def run(quick: bool) -> dict:
    rows, results = [], {}
    for n in sizes(quick):
        print(f"  {n:,} targets")
        results[n] = measure(n)
        for name, r in zip(RUNS, results[n]["runs"], strict=True):
            rows.append(
                [
                    f"{n:,}",
                    name,
                    fmt_mb(r["peak_rss"]),
                    fmt_mb(r["peak_rss"] - r["base_rss"]),
                    fmt_mb(r["peak_anon"] - r["base_anon"]),
                    fmt_mb(r["peak_heap"]) if r["peak_heap"] else "",
                    fmt_s(r["seconds"]),
                    f"{r['accuracy']:.3f}",
                    (
                        f"{r['coverage']:.2f}"
                        if r["coverage"] is not None
                        else ""
                    ),
                ]
            )
    small, big = sizes(quick)
    d_first = (
        results[big]["runs"][0]["peak_rss"]
        - results[small]["runs"][0]["peak_rss"]
    )
    d_again = (
        results[big]["runs"][1]["peak_rss"]
        - results[small]["runs"][1]["peak_rss"]
    )
    d_anon = (
        results[big]["runs"][1]["peak_anon"]
        - results[big]["runs"][1]["base_anon"]
    ) - (
        results[small]["runs"][1]["peak_anon"]
        - results[small]["runs"][1]["base_anon"]
    )
    d_heap = (
        results[big]["runs"][2]["peak_heap"]
        - results[small]["runs"][2]["peak_heap"]
    )
    notes = [
        f"From {small:,} to {big:,} targets, on the pre-annotation path "
        f"(adapted index built), what Python holds grows by "
        f"{fmt_mb(d_heap)} MB at its peak (*traced*), the anonymous "
        f"memory by {fmt_mb(d_anon)} MB, and the peak RSS by "
        f"{fmt_mb(d_again)} MB. The difference is the embedded engine: "
        "the index holds every target, and Qdrant Edge maps its vectors "
        "(file pages, counted in RSS) and keeps its graph and id maps "
        "while a chunk is queried; with a Qdrant server that memory is "
        "the server's. The first call grows by "
        f"{fmt_mb(d_first)} MB: it also learns the adapter and writes, "
        "syncs and builds the graph of an index of every target's "
        "adapted vector.",
        f"Where the time goes at {big:,} targets (again): "
        + ", ".join(
            f"{k} {fmt_s(v)} s"
            for k, v in results[big]["runs"][1]["stages"].items()
        )
        + ".",
    ]
    desc = (
        'Peak resident memory of `preannotate(mode="adapted", '
        "target_precision=0.99)` in a fresh child process per run, with "
        f"{NUM_REF:,} labeled references (real MNIST EfficientNet-Lite0 "
        "features) and targets synthesized from the other real features "
        f"(Gaussian noise of {NOISE} x the vector's norm). *growth* columns "
        "are measured from the child's memory after its imports; *anon* is "
        "the process's anonymous memory (`RssAnon`: the heap, without the "
        "index files the engine maps), polled every 0.1 s. One run each."
    )
    return common.section(
        "Memory: one streaming path (issue 12)",
        desc,
        [
            common.table(
                "",
                [
                    "targets",
                    "run",
                    "peak RSS MB",
                    "growth MB",
                    "anon growth MB",
                    "Python heap peak MB",
                    "wall s",
                    "accuracy",
                    "accepted",
                ],
                rows,
            )
        ],
        notes,
        reproduce="python benchmarks/memory_stream.py"
        + (" --quick" if quick else ""),
    )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child-setup":
        common.emit(child_setup(int(sys.argv[2])))
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1].startswith("--child-run"):
        common.emit(child_run(traced=sys.argv[1].endswith("-traced")))
        sys.exit(0)
    sys.exit(common.main_for(run))
