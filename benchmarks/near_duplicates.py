"""Near-duplicates through the index against FiftyOne's sklearn backend:
``fob.compute_near_duplicates`` on 100,000 samples (``NEAR_DUP_SIZE`` to
change it), each way in a fresh child process, on the same vectors and
threshold.

Data: the vectors synthesized from the 10,000 real MNIST
EfficientNet-Lite0 (112 px) features that the demo computes: noisy copies
(Gaussian noise of 0.33 x the vector's norm, seeded), cycled over the
features; then 1 % of them (seeded) are replaced by a near copy of another
one (noise of 0.01 x the norm): the planted duplicates. They are written
straight into a dataset (no images).

- *ours*: the prelabel index (Qdrant Edge, cosine) synced in a setup
  child; the measured child loads the run and calls
  ``fob.compute_near_duplicates(dataset, similarity_index=key,
  threshold=...)``: every point's neighbors are asked of the index in
  batches, never all vectors at once.
- *sklearn*: ``fob.compute_near_duplicates(dataset, embeddings="emb",
  threshold=...)``, which builds FiftyOne's sklearn index from the field
  (every embedding in memory, then scikit-learn's radius neighbors).

Each child reports its peak RSS (``VmHWM``) and the peak of its anonymous
memory (``RssAnon``: the heap, without the files the engine maps), measured
from a baseline taken after the imports, and the duplicates it found; the
parent compares them (the same duplicates, the same nearest original).

    python benchmarks/near_duplicates.py [--quick]   # quick: 10,000
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402
from common import fmt_mb, fmt_s  # noqa: E402

DATASET = f"{common.PREFIX}near-duplicates"
KEY = "dups"
NOISE = 0.33
DUP_NOISE = 0.01
DUP_SHARE = 0.01
#: cosine distance: planted pairs lie near 1e-4, other neighbors near 0.1
THRESHOLD = 0.01


#: the full run's size (``NEAR_DUP_SIZE`` to change it)
FULL = 100000


def size(quick: bool) -> int:
    return 10000 if quick else int(os.environ.get("NEAR_DUP_SIZE", FULL))


def vectors(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``n`` vectors, the positions of the planted duplicates and of
    the vectors they copy."""
    X, _, _ = common.real_features()
    src = np.arange(n) % len(X)
    V = common.noisy_copies(X[src], seed=1, rel=NOISE)
    rng = np.random.default_rng(2)
    dups = rng.choice(n, int(n * DUP_SHARE), replace=False)
    originals = rng.choice(np.setdiff1d(np.arange(n), dups), len(dups))
    V[dups] = common.noisy_copies(V[originals], seed=3, rel=DUP_NOISE)
    return V, dups, originals


# ---- children ------------------------------------------------------------


def child_setup(n: int) -> dict:
    import prelabel

    V, dups, originals = vectors(n)
    labels = ["x"] * n
    dataset = common.vector_dataset(DATASET, V, labels, ["all"] * n)
    dataset.persistent = True
    ids = dataset.values("id")
    t0 = time.perf_counter()
    prelabel.sync_index(
        dataset, embeddings_field="emb", brain_key=KEY, progress=False
    )
    return {
        "sync_seconds": time.perf_counter() - t0,
        "planted": [
            [ids[d], ids[o]] for d, o in zip(dups, originals, strict=True)
        ],
    }


def child_run(way: str) -> dict:
    import fiftyone as fo
    import fiftyone.brain as fob

    import prelabel  # noqa: F401 - registers the backend

    dataset = fo.load_dataset(DATASET)
    base = {"rss": common.self_peak_rss(), "anon": common.AnonPeak.now()}
    t0 = time.perf_counter()
    with common.AnonPeak() as anon:
        if way == "ours":
            index = fob.compute_near_duplicates(
                dataset, similarity_index=KEY, threshold=THRESHOLD
            )
        else:
            index = fob.compute_near_duplicates(
                dataset, embeddings="emb", threshold=THRESHOLD
            )
    seconds = time.perf_counter() - t0
    nearest = {
        dup: orig
        for orig, pairs in index.neighbors_map.items()
        for dup, _ in pairs
    }
    return {
        "seconds": seconds,
        "base_rss": base["rss"],
        "peak_rss": common.self_peak_rss(),
        "base_anon": base["anon"],
        "peak_anon": anon.peak,
        "duplicates": sorted(index.duplicate_ids),
        "nearest": nearest,
    }


# ---- the parent ----------------------------------------------------------


def measure(n: int) -> dict:
    me = os.path.abspath(__file__)
    try:
        setup = common.run_measured([common.PY, me, "--child-setup", str(n)])
        if setup["returncode"] != 0 or setup["result"] is None:
            raise RuntimeError(f"setup failed:\n{setup['tail']}")
        out = {"setup": setup["result"]}
        for way in ("ours", "sklearn"):
            m = common.run_measured([common.PY, me, "--child-run", way])
            if m["returncode"] != 0 or m["result"] is None:
                raise RuntimeError(f"{way} failed:\n{m['tail']}")
            out[way] = m["result"]
        return out
    finally:
        common.delete_dataset(DATASET)


def run(quick: bool) -> dict:
    n = size(quick)
    print(f"  {n:,} samples")
    res = measure(n)
    planted = res["setup"]["planted"]
    ours, sk = res["ours"], res["sklearn"]
    rows = []
    for name, r in (
        ("**ours**: the prelabel index (`similarity_index=`)", ours),
        ("FiftyOne's sklearn backend (`embeddings=`)", sk),
    ):
        found = set(r["duplicates"])
        linked = r["nearest"]
        hits = sum(
            (d in found and linked.get(d) == o)
            or (o in found and linked.get(o) == d)
            for d, o in planted
        )
        rows.append(
            [
                name,
                f"{n:,}",
                fmt_s(r["seconds"]),
                fmt_mb(r["peak_rss"] - r["base_rss"]),
                fmt_mb(r["peak_anon"] - r["base_anon"]),
                f"{len(found):,}",
                f"{hits:,} / {len(planted):,}",
            ]
        )
    same = ours["duplicates"] == sk["duplicates"]
    agree = sum(ours["nearest"].get(d) == o for d, o in sk["nearest"].items())
    notes = [
        f"The same duplicates both ways: **{'yes' if same else 'no'}**; "
        f"the same nearest original for {agree:,} of "
        f"{len(sk['nearest']):,} duplicates. The index was synced in "
        f"{fmt_s(res['setup']['sync_seconds'])} s beforehand (not "
        "counted above; sklearn builds its index inside the call).",
        "Peak RSS and anonymous memory are measured from each child's "
        "memory after its imports. RSS counts the pages of the index "
        "files the embedded engine maps (which the kernel can drop and "
        "read again); the anonymous memory is what the process itself "
        "holds.",
    ]
    if not same:
        notes.append(
            "**We differ from sklearn on which samples are duplicates**: "
            "see the rows' planted pairs found."
        )
    return common.section(
        "Near-duplicates through the index",
        "`fob.compute_near_duplicates` (threshold "
        f"{THRESHOLD} cosine distance) through our index against FiftyOne's "
        "sklearn backend, on the same vectors: 1 % planted near copies "
        "among noisy copies of the real MNIST features (1,280-d).",
        [
            common.table(
                "",
                [
                    "way",
                    "samples",
                    "seconds",
                    "peak RSS growth MB",
                    "peak anonymous growth MB",
                    "duplicates found",
                    "planted pairs found",
                ],
                rows,
            )
        ],
        notes,
        "python benchmarks/near_duplicates.py" + (" --quick" if quick else ""),
    )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child-setup":
        common.emit(child_setup(int(sys.argv[2])))
        sys.exit(0)
    if len(sys.argv) > 2 and sys.argv[1] == "--child-run":
        common.emit(child_run(sys.argv[2]))
        sys.exit(0)
    sys.exit(common.main_for(run))
