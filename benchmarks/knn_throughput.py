"""kNN pre-annotation throughput, end to end: from embeddings stored in
FiftyOne to a written FiftyOne field, in targets per second.

Methods, on the same data in the same process:

- ours: ``prelabel.preannotate`` (batched, filtered queries to the
  embedded Qdrant Edge index, one ``set_values`` per batch);
- the article's loop: one Qdrant Edge query per target on the same index,
  a majority vote, ``sample.save()`` per target;
- FiftyOne's own Qdrant backend: first shown failing (it needs a server,
  and its queries call ``QdrantClient.search``, removed from
  qdrant-client), then the path it would need here, qdrant-client's local
  mode: the collection uploaded by FiftyOne's own backend code, one
  ``query_points`` per target;
- exact kNN in numpy: read all vectors from FiftyOne, blockwise matmul +
  argpartition, the same vote and the same written documents as ours.

Recall@k of every approximate method is measured against the exact kNN.

    python benchmarks/knn_throughput.py [--quick]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402
from common import K, fmt_int, fmt_rate, fmt_s  # noqa: E402

#: points uploaded through FiftyOne's own backend code to show its query
PROBE_POINTS = 1000


def settings(quick: bool) -> dict:
    if quick:
        return {
            "sizes": [10000],
            "targets": 2000,
            "repeats": 1,
            "loop_subset": 300,
            "local_subset": {10000: 40, 60000: 20},
        }
    return {
        "sizes": [10000, 60000],
        "targets": 10000,
        "repeats": 3,
        "loop_subset": 1000,
        "local_subset": {10000: 200, 60000: 100},
    }


def build_data(X, y, size, num_targets, rel):
    """Reference vectors (real, then noisy copies) and target vectors
    (noisy copies of a seeded random choice of real ones)."""
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(X))[:num_targets]
    targets = common.noisy_copies(X[pick], seed=1, rel=rel)
    target_labels = y[pick]
    refs, ref_labels = [X], [y]
    seed = 2
    while sum(len(r) for r in refs) < size:
        refs.append(common.noisy_copies(X, seed=seed, rel=rel))
        ref_labels.append(y)
        seed += 1
    refs = np.concatenate(refs)[:size]
    ref_labels = np.concatenate(ref_labels)[:size]
    return refs, ref_labels, targets, target_labels


def accuracy(dataset, ids, field, truth):
    pred = dataset.select(ids, ordered=True).values(f"{field}.label")
    return float(np.mean([p == t for p, t in zip(pred, truth, strict=True)]))


# ---- the methods ---------------------------------------------------------


def run_ours(dataset, results, pred_field):
    import prelabel

    targets = dataset.match_tags("test")
    out = prelabel.preannotate(
        targets,
        index=results,
        reference="train",
        label_field="ground_truth",
        pred_field=pred_field,
        k=K,
        progress=False,
    )
    return out


def run_article_loop(dataset, results, subset_ids, pred_field):
    """One query per target on the same Qdrant Edge index, one
    ``sample.save()`` per target (the Qdrant + FiftyOne article's loop)."""
    import fiftyone as fo
    import qdrant_edge as qe

    from prelabel.index import base
    from prelabel.index.base import IndexFilter
    from prelabel.index.edge import _to_filter

    index = results.index
    flt = _to_filter(IndexFilter.reference("train"))
    neighbors = []
    view = dataset.select(subset_ids, ordered=True)
    with index.session() as shard:
        for sample in view.iter_samples(progress=False):
            hits = shard.query(
                qe.QueryRequest(
                    limit=K,
                    query=qe.Query.Nearest(sample["emb"].tolist()),
                    filter=flt,
                    with_payload=[base.LABEL],
                    with_vector=False,
                )
            )
            labels = [(p.payload or {}).get(base.LABEL) for p in hits]
            neighbors.append([base.to_sample_id(p.id) for p in hits])
            label, votes = Counter(labels).most_common(1)[0]
            sample[pred_field] = fo.Classification(
                label=label, confidence=votes / K
            )
            sample.save()
    return neighbors


class _LocalClientShim:
    """Stands in for the ``qdrant_client`` module inside FiftyOne's Qdrant
    backend, so that its code talks to one local-mode client."""

    def __init__(self, client):
        self._client = client

    def QdrantClient(self, *args, **kwargs):  # noqa: N802 - the real name
        return self._client


def fiftyone_backend_errors(dataset, probe_ids) -> dict:
    """What happens when FiftyOne's Qdrant backend is used here: with its
    own client (it needs a server), and with its client replaced by a
    qdrant-client local-mode one (the upload works, every query fails)."""
    import fiftyone.brain as fob
    import fiftyone.brain.internal.core.qdrant as fbq
    from qdrant_client import QdrantClient

    out = {}
    refs = dataset.match_tags("train")
    try:
        fob.compute_similarity(
            refs,
            embeddings="emb",
            backend="qdrant",
            brain_key="bench_fo_qdrant_server",
            progress=False,
        )
        out["server"] = None
    except Exception as e:
        cause = e.__cause__
        out["server"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        if cause is not None:
            out["server"] += (
                f" (caused by {type(cause).__name__}: "
                f"{str(cause).splitlines()[0][:120]})"
            )

    client = QdrantClient(":memory:")
    real = fbq.qdrant
    fbq.qdrant = _LocalClientShim(client)
    key = "bench_fo_qdrant_local"
    small = refs.limit(PROBE_POINTS)
    try:
        fob.compute_similarity(
            small,
            embeddings="emb",
            backend="qdrant",
            brain_key=key,
            metric="cosine",
            progress=False,
        )
        out["uploaded"] = dataset.load_brain_results(key).total_index_size
        query = dataset.select(probe_ids[:1]).values("emb")[0]
        try:
            small.sort_by_similarity(query, k=K, brain_key=key)
            out["query_error"] = None
        except Exception as e:
            out["query_error"] = f"{type(e).__name__}: {e}"
    finally:
        fbq.qdrant = real
        try:
            dataset.delete_brain_run(key)
        except Exception:
            pass
        client.close()
    return out


def local_collection(refs, ref_ids):
    """A qdrant-client local-mode collection of the reference points, as
    FiftyOne's backend would have filled it (ids derived from the sample
    ids, payload ``sample_id``), uploaded directly (not timed here: the
    sync table times uploads)."""
    import uuid

    from qdrant_client import QdrantClient
    from qdrant_client import models as qm

    client = QdrantClient(":memory:")
    client.create_collection(
        "refs",
        vectors_config=qm.VectorParams(
            size=refs.shape[1], distance=qm.Distance.COSINE
        ),
    )
    for start in range(0, len(refs), 5000):
        chunk = ref_ids[start : start + 5000]
        client.upsert(
            "refs",
            points=qm.Batch(
                ids=[str(uuid.UUID(s + "00000000")) for s in chunk],
                vectors=refs[start : start + 5000].tolist(),
                payloads=[{"sample_id": s} for s in chunk],
            ),
        )
    return client


def run_local_loop(dataset, client, subset_ids, label_of):
    """The loop FiftyOne's ``_kneighbors`` would have to run with the
    current client: one ``query_points`` per target; then the vote and
    one ``set_values``."""
    import fiftyone as fo

    ids, vecs = dataset.select(subset_ids, ordered=True).values(["id", "emb"])
    neighbors, preds = [], {}
    for sid, vec in zip(ids, vecs, strict=True):
        hits = client.query_points(
            "refs", query=vec.tolist(), limit=K, with_payload=False
        ).points
        nb = [str(h.id).replace("-", "")[:-8] for h in hits]
        neighbors.append(nb)
        label, votes = Counter(label_of[n] for n in nb).most_common(1)[0]
        preds[sid] = fo.Classification(label=label, confidence=votes / K)
    dataset.set_values("pl_fo_local", preds, key_field="id")
    return neighbors


def run_exact(dataset, pred_field, slice_size=100_000):
    """Exact kNN in numpy, with the same vote and documents as ours.

    The references are read and searched a slice of ``slice_size`` sample
    ids at a time, keeping the best ``K`` of each target so far: a
    million references read at once (and a block of similarities over all
    of them) need more memory than this machine has (13.4 GB at 500,000).
    """
    from prelabel.core.voting import vote
    from prelabel.neighbors import Neighbors
    from prelabel.preannotate import classify
    from prelabel.scorers import ChunkScores
    from prelabel.slicing import split_by_id
    from prelabel.units import Samples

    stages = {"read": 0.0, "search_vote": 0.0}
    t0 = time.perf_counter()
    refs = dataset.match_tags("train")
    tgt_ids, tgt_vecs = dataset.match_tags("test").values(["id", "emb"])
    Q = common.normalize(np.stack(tgt_vecs))
    slices = split_by_id(refs.values("id"), -(-len(refs) // slice_size))
    stages["read"] += time.perf_counter() - t0
    sims = np.full((len(Q), 0), -np.inf, dtype=np.float32)
    nb_ids = nb_labels = np.empty((len(Q), 0), dtype=object)
    all_labels = set()
    for part in slices:
        t0 = time.perf_counter()
        ids, vecs, labels = part.of(refs).values(
            ["id", "emb", "ground_truth.label"]
        )
        R = common.normalize(np.stack(vecs))
        del vecs
        t1 = time.perf_counter()
        idx, part_sims = common.exact_knn(Q, R, K, normalized=True)
        sims = np.concatenate([sims, part_sims], axis=1)
        nb_ids = np.concatenate([nb_ids, np.asarray(ids, object)[idx]], 1)
        nb_labels = np.concatenate(
            [nb_labels, np.asarray(labels, object)[idx]], axis=1
        )
        best = np.argsort(-sims, axis=1, kind="stable")[:, :K]
        sims = np.take_along_axis(sims, best, axis=1)
        nb_ids = np.take_along_axis(nb_ids, best, axis=1)
        nb_labels = np.take_along_axis(nb_labels, best, axis=1)
        all_labels.update(labels)
        stages["read"] += t1 - t0
        stages["search_vote"] += time.perf_counter() - t1
    t1 = time.perf_counter()
    nb_ids, nb_labels = nb_ids.tolist(), nb_labels.tolist()
    votes = vote(nb_labels, sims, sorted(all_labels), K)
    t2 = time.perf_counter()
    stages["search_vote"] += t2 - t1
    chunk = ChunkScores(
        Neighbors(tgt_ids, Q, nb_ids, nb_labels, sims), votes, votes.probs
    )
    labels, _, _ = classify(chunk)
    # the same write as ours
    writer = Samples().writer(dataset, pred_field, tgt_ids)
    writer.write(dict(zip(tgt_ids, labels, strict=True)))
    stages["write"] = time.perf_counter() - t2
    return stages, nb_ids


# ---- one size ------------------------------------------------------------


def measure_size(X, y, size, cfg, rel, first):
    import prelabel

    name = f"{common.PREFIX}knn-{size // 1000}k"
    refs, ref_labels, targets, target_labels = build_data(
        X, y, size, cfg["targets"], rel
    )
    n_t = len(targets)
    print(f"  {size:,} references, {n_t:,} targets: building {name}")
    t0 = time.perf_counter()
    dataset = common.vector_dataset(
        name,
        np.concatenate([refs, targets]),
        np.concatenate([ref_labels, target_labels]),
        ["train"] * len(refs) + ["test"] * n_t,
    )
    build_s = time.perf_counter() - t0
    rows, info = [], {"build_s": build_s}
    with tempfile.TemporaryDirectory(prefix="bench-knn-") as tmp:
        try:
            ref_ids = dataset.match_tags("train").values("id")
            tgt_ids = dataset.match_tags("test").values("id")
            exact_idx, _ = common.exact_knn(targets, refs, K)
            exact_nb = np.asarray(ref_ids)[exact_idx].tolist()

            print("  syncing our index")
            t0 = time.perf_counter()
            results = prelabel.sync_index(
                dataset,
                embeddings_field="emb",
                label_field="ground_truth",
                brain_key="bench",
                path=os.path.join(tmp, "index"),
                progress=False,
            )
            info["sync_s"] = time.perf_counter() - t0

            print("  ours")
            med, times, out = common.median_time(
                lambda: run_ours(dataset, results, "pl_ours"), cfg["repeats"]
            )
            ours_nb = dataset.select(tgt_ids, ordered=True).values(
                "pl_ours.neighbors"
            )
            ours_rate = n_t / med
            rows.append(
                {
                    "short": "ours",
                    "method": "**ours**: `prelabel.preannotate` "
                    "(Qdrant Edge, batched filtered queries)",
                    "n": n_t,
                    "seconds": med,
                    "rate": ours_rate,
                    "recall": common.recall_at_k(ours_nb, exact_nb, K),
                    "acc": accuracy(
                        dataset, tgt_ids, "pl_ours", target_labels
                    ),
                    "extrapolated": False,
                }
            )
            info["ours_stages"] = out.seconds

            print("  the article's loop")
            m = cfg["loop_subset"]
            sub = tgt_ids[:m]
            med, _, nb = common.median_time(
                lambda: run_article_loop(dataset, results, sub, "pl_loop"),
                1 if cfg["repeats"] == 1 else 2,
            )
            rows.append(
                {
                    "short": "the article's loop",
                    "method": "article's loop: one Qdrant Edge query + "
                    "`sample.save()` per target (same index)",
                    "n": m,
                    "seconds": med,
                    "rate": m / med,
                    "recall": common.recall_at_k(nb, exact_nb[:m], K),
                    "acc": accuracy(
                        dataset, sub, "pl_loop", target_labels[:m]
                    ),
                    "extrapolated": True,
                }
            )

            print("  FiftyOne's Qdrant backend")
            if first:
                info["fo_errors"] = fiftyone_backend_errors(dataset, tgt_ids)
            m = cfg["local_subset"][size]
            sub = tgt_ids[:m]
            client = local_collection(refs, ref_ids)
            label_of = dict(zip(ref_ids, ref_labels, strict=True))
            try:
                local_s, _, local_nb = common.median_time(
                    lambda: run_local_loop(dataset, client, sub, label_of), 1
                )
            finally:
                client.close()
            rows.append(
                {
                    "short": "FiftyOne's backend in local mode",
                    "method": "FiftyOne's Qdrant backend as it would need "
                    "to run here: qdrant-client local mode, one "
                    "`query_points` per target",
                    "n": m,
                    "seconds": local_s,
                    "rate": m / local_s,
                    "recall": common.recall_at_k(local_nb, exact_nb[:m], K),
                    "acc": accuracy(
                        dataset, sub, "pl_fo_local", target_labels[:m]
                    ),
                    "extrapolated": True,
                }
            )

            print("  exact numpy")
            med, _, (stages, nb) = common.median_time(
                lambda: run_exact(dataset, "pl_exact"), cfg["repeats"]
            )
            info["exact_stages"] = stages
            rows.append(
                {
                    "short": "exact numpy kNN",
                    "method": "exact kNN in numpy (blockwise matmul + "
                    "argpartition), same vote and documents as ours",
                    "n": n_t,
                    "seconds": med,
                    "rate": n_t / med,
                    "recall": common.recall_at_k(nb, exact_nb, K),
                    "acc": accuracy(
                        dataset, tgt_ids, "pl_exact", target_labels
                    ),
                    "extrapolated": False,
                }
            )
        finally:
            common.delete_dataset(name)
    return rows, info


def run(quick: bool) -> dict:
    cfg = settings(quick)
    X, y, _ = common.real_features()
    rel = common.median_nn_distance(X)
    tables, notes = [], []
    per_size = {}
    for size in cfg["sizes"]:
        rows, info = measure_size(
            X, y, size, cfg, rel, first=size == cfg["sizes"][0]
        )
        per_size[size] = (rows, info)
        n_t = cfg["targets"]
        ours = rows[0]
        body = []
        for r in rows:
            total = n_t / r["rate"]
            body.append(
                [
                    r["method"],
                    fmt_int(r["n"]),
                    fmt_s(total)
                    + (" (extrapolated)" if r["extrapolated"] else ""),
                    fmt_rate(r["rate"]),
                    common.fmt_ratio(ours["rate"], r["rate"]),
                    f"{r['recall']:.3f}",
                    f"{r['acc']:.3f}",
                ]
            )
        st, ex = info["ours_stages"], info["exact_stages"]
        tab_notes = [
            f"Our index was synced once before timing: "
            f"{fmt_s(info['sync_s'])} s for {size + n_t:,} points "
            f"(see the sync table). Ours, by stage (last run): reading "
            f"vectors, querying and voting {fmt_s(st['query_vote'])} s, "
            f"writing {fmt_s(st['write'])} s, the rest (input checks, "
            "counting the reference set, reading its classes, swapping the "
            f"field in) {fmt_s(st['total'] - st['query_vote'] - st['write'])}"
            " s; exact numpy: reading the vectors "
            f"from FiftyOne {fmt_s(ex['read'])} s, search + vote "
            f"{fmt_s(ex['search_vote'])} s, writing {fmt_s(ex['write'])} s."
        ]
        lose = [r for r in rows[1:] if r["rate"] > ours["rate"]]
        for r in lose:
            tab_notes.append(
                f"**We lose here to {r['short']}** "
                f"({fmt_rate(r['rate'])} vs {fmt_rate(ours['rate'])} "
                "targets/s). " + why_we_lose(r, info, size)
            )
        tables.append(
            common.table(
                f"{size:,} reference points x 1,280 dims, {n_t:,} targets",
                [
                    "method",
                    "targets timed",
                    f"s for {n_t:,} targets",
                    "targets/s",
                    "ours is N x as fast",
                    f"recall@{K}",
                    "accuracy",
                ],
                body,
                tab_notes,
            )
        )
    errs = per_size[cfg["sizes"][0]][1]["fo_errors"]
    notes.append(
        "FiftyOne's own Qdrant backend (fiftyone-brain "
        f"{common.versions()['fiftyone-brain']}) cannot run here as "
        'shipped. `compute_similarity(backend="qdrant")` needs a Qdrant '
        f"server: `{errs.get('server')}`. Pointed at qdrant-client's local "
        "mode instead (its `QdrantClient` replaced by a local-mode client), "
        f"its upload works ({errs['uploaded']:,} points, one request per "
        "1,000; the sync table times it), but every query fails: "
        f"`{errs.get('query_error')}`. The row above is the "
        "loop its `_kneighbors` would have to run with the current "
        "client (`query_points`, one per target), on a collection holding "
        "only the reference points (no id filter in the requests, which "
        "favors it)."
    )
    notes.append(
        "Accuracy is against the label of the real digit each target was "
        "made from; it only shows that every method votes the same way "
        "(approximate search changes a few votes)."
    )
    desc = (
        f"From embeddings stored in FiftyOne to a written `Classification` "
        f"field, k = {K}, majority vote, cosine. Reference points: the "
        "10,000 real MNIST EfficientNet-Lite0 features (112 px, "
        f"`{common.MNIST_DATASET}`.`{common.MNIST_FIELD}`), and for 60k "
        "five noisy copies of them; targets: noisy copies of a seeded "
        "random choice of the real ones. Noise: isotropic Gaussian, seeded, "
        f"of norm {rel:.2f} x the vector's norm (the median distance between "
        "a real unit vector and its nearest other one), so a copy is about "
        "as far from its source as the nearest other digit. Targets and "
        "references are in one dataset (tags `test` / `train`); our index "
        "holds both and selects the references by payload filter. Rows "
        "marked *extrapolated* timed a subset of the targets (column "
        "*targets timed*) and give the time the rate implies for all "
        f"{cfg['targets']:,}. Times are medians of {cfg['repeats']} runs "
        "(subset rows: 1-2 runs)."
    )
    return common.section(
        "kNN pre-annotation throughput (issue 5, item 3)",
        desc,
        tables,
        notes,
        reproduce="python benchmarks/knn_throughput.py"
        + (" --quick" if quick else ""),
    )


def why_we_lose(row, info, size) -> str:
    if row["short"].startswith("exact"):
        return (
            f"At {size:,} reference points one BLAS matmul over all of them "
            "costs less than a graph search per target through Qdrant's "
            "Python bindings (each query is built as a Python object and "
            "answered with Python objects), and exact search needs no "
            "index. Exact cost grows linearly with the reference set, the "
            "HNSW search roughly logarithmically, so the order flips as the "
            "reference set grows; exact numpy also holds every vector in "
            "this process's RAM, re-reads them from FiftyOne each run, and "
            "cannot be shared with the App or other processes."
        )
    return "See the notes below."


if __name__ == "__main__":
    sys.exit(common.main_for(run))
