"""Scale in FiftyOne: the whole job at 100,000, 500,000 and 1,000,000
samples, each stage in a process of its own (so that its peak RSS is its
own), beside the alternative a user would pick.

Data, per kind of vector (``mnist``, ``fashion``): the 10,000 real
EfficientNet-Lite0 (112 px) features of the MNIST digits (what ``make
demo`` computes) or of the Fashion-MNIST clothing
(``benchmarks/fashion_data.py``), projected onto their first 256
principal components; every sample is one of them (taken in a seeded
order, round robin) plus isotropic Gaussian noise of norm = the median
nearest-neighbor distance of the projected set, labeled with its source's
class. The last 10,000 samples (tag ``test``) are the targets, the others
(tag ``train``) the labeled references; the targets are copies of a
fifth of the real images held out, the references of the other four
fifths (a target's neighbors are copies of other images). 256
dimensions, not 1,280: a million 1,280-d vectors are 5 GB in MongoDB and
as much in the index, more than this 2-core machine can write and read in
a benchmark run; what a stage costs per dimension is in the kNN and sync
tables.

Stages (a child process each, in this order, on the same dataset). The
parent holds a FiftyOne connection throughout, as the App does in a
curation session: FiftyOne's own MongoDB exits with its last client, and
a stage started after that would first read the whole collection back
from disk (1.8 s for a scan of 500,000 samples, 0.26 s once warm).

- ``build``: the dataset (reused across runs when complete);
- ``sync``: ``prelabel.sync_index`` from nothing; ``sync +1 %`` and
  ``sync -1 %``: 1 % new samples added, synced, deleted, synced;
- ``knn (tag)`` / ``knn (view)``: ``prelabel.preannotate`` of the targets,
  references given as the tag ``train`` or as a view of it;
  ``exact numpy``: all vectors read from FiftyOne, blockwise matmul, the
  same vote and the same write;
- ``one-click``: ``mode="adapted", target_precision=0.99``;
- ``mistakes``: ``prelabel.find_label_mistakes`` of every reference;
- ``panel``: the mistakes panel driven as the App drives it (open, a
  slider, a class filter; median of 5);
- ``app sort``: the App server's own ``/sort`` route (sort by similarity
  of one sample, k=25, then the first page of 20 samples), on our index and
  on FiftyOne's sklearn backend (first call, then median of 5).

    python benchmarks/scale_fiftyone.py [--quick] [--sizes 100000,500000]
        [--kinds mnist,fashion] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402
from common import K, fmt_int, fmt_mb, fmt_rate, fmt_s  # noqa: E402

DIM = 256
NUM_TARGETS = 10000
CHUNK = 50000
BRAIN_KEY = "scale"
SKLEARN_KEY = "scale_sklearn"
#: bump when the data changes: datasets of another version are rebuilt
VERSION = 2
KINDS = ("mnist", "fashion")
REPEAT = 5


def settings(quick: bool) -> dict:
    if quick:
        return {"sizes": [20000], "kinds": ["mnist"]}
    return {"sizes": [100000, 500000, 1000000], "kinds": list(KINDS)}


# ---- data ----------------------------------------------------------------


def projected_features(kind: str) -> tuple[np.ndarray, np.ndarray, float]:
    """``(vectors (10000, DIM), labels, share of variance kept)``."""
    if kind == "mnist":
        X, y, _ = common.real_features()
    elif kind == "fashion":
        import fashion_data

        X, y, _ = fashion_data.fashion_features()
    else:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    X = np.asarray(X, dtype=np.float64)
    centered = X - X.mean(0)
    _, S, Vt = np.linalg.svd(centered, full_matrices=False)
    kept = float((S[:DIM] ** 2).sum() / (S**2).sum())
    Z = (centered @ Vt[:DIM].T).astype(np.float32)
    return Z, np.asarray(y), kept


class Generator:
    """The samples of a kind, chunk by chunk, the same every run.

    The real vectors are split once: a fifth are the sources of the
    targets, the rest the sources of the references, so that a target's
    nearest references are copies of other images (as with real data),
    not noisy copies of its own source.
    """

    def __init__(self, kind: str):
        self.Z, self.y, self.kept = projected_features(kind)
        self.rel = common.median_nn_distance(self.Z)
        order = np.random.default_rng(0).permutation(len(self.Z))
        held = len(order) // 5
        self.target_src, self.ref_src = order[:held], order[held:]
        self.seed = KINDS.index(kind) if kind in KINDS else 0

    def chunk(self, start: int, size: int, n: int, salt: int = 0):
        """``(vectors, labels, tags)`` of samples ``start .. start + size``
        of ``n`` (the last :data:`NUM_TARGETS` are the targets)."""
        i = np.arange(start, start + size)
        first_target = n - NUM_TARGETS
        is_target = i >= first_target
        src = np.where(
            is_target,
            self.target_src[(i - first_target) % len(self.target_src)],
            self.ref_src[i % len(self.ref_src)],
        )
        X = common.noisy_copies(
            self.Z[src], seed=[self.seed, salt, start], rel=self.rel
        )
        tags = np.where(is_target, "test", "train").tolist()
        return X, self.y[src], tags


def dataset_name(kind: str, n: int) -> str:
    return f"{common.PREFIX}scale-{kind}-{n // 1000}k"


def build(kind: str, n: int) -> dict:
    """The dataset of ``n`` samples (reused when a complete one of this
    version exists)."""
    fo = common.fiftyone()
    name = dataset_name(kind, n)
    params = {"version": VERSION, "n": n, "dim": DIM}
    if fo.dataset_exists(name):
        dataset = fo.load_dataset(name)
        info = (dataset.info or {}).get("scale") or {}
        if info.get("complete") and all(
            info.get(k) == v for k, v in params.items()
        ):
            return {"reused": True, "n": len(dataset), "kept": info["kept"]}
    common.delete_dataset(name)
    gen = Generator(kind)
    # persistent: every stage is a process of its own
    dataset = fo.Dataset(name, persistent=True)
    for start in range(0, n, CHUNK):
        size = min(CHUNK, n - start)
        X, y, tags = gen.chunk(start, size, n)
        add_vector_samples(dataset, name, start, X, y, tags)
    dataset.info["scale"] = dict(params, complete=True, kept=gen.kept)
    dataset.save()
    return {"reused": False, "n": len(dataset), "kept": gen.kept}


def add_vector_samples(dataset, name, start, X, y, tags) -> list[str]:
    fo = common.fiftyone()
    samples = [
        fo.Sample(
            filepath=f"/nonexistent/{name}/{start + i:07d}.png",
            tags=[tags[i]],
            ground_truth=fo.Classification(label=str(y[i])),
        )
        for i in range(len(X))
    ]
    ids = dataset.add_samples(samples, progress=False)
    dataset.set_values("emb", dict(zip(ids, X, strict=True)), key_field="id")
    return ids


# ---- the stages (each runs in a child process) ---------------------------


def _sync(dataset, tmp):
    import prelabel

    return prelabel.sync_index(
        dataset,
        embeddings_field="emb",
        label_field="ground_truth",
        brain_key=BRAIN_KEY,
        path=os.path.join(tmp, "index"),
        progress=False,
    )


def stage_sync(dataset, tmp, kind):
    for key in dataset.list_brain_runs():
        dataset.delete_brain_run(key)
    shutil.rmtree(os.path.join(tmp, "index"), ignore_errors=True)
    t0 = time.perf_counter()
    _sync(dataset, tmp)
    return {"seconds": time.perf_counter() - t0}


def stage_sync_incremental(dataset, tmp, kind):
    n = len(dataset)
    extra = max(1, n // 100)
    X, y, _ = Generator(kind).chunk(0, extra, n + NUM_TARGETS, salt=1)
    ids = add_vector_samples(
        dataset, dataset.name, 10**7, X, y, ["new"] * extra
    )
    t0 = time.perf_counter()
    _sync(dataset, tmp)
    added = time.perf_counter() - t0
    dataset.delete_samples(ids)
    t0 = time.perf_counter()
    _sync(dataset, tmp)
    return {
        "seconds": added,
        "delete_seconds": time.perf_counter() - t0,
        "changed": extra,
    }


def _preannotate(dataset, reference, pred_field, **kwargs):
    import prelabel

    t0 = time.perf_counter()
    result = prelabel.preannotate(
        dataset.match_tags("test"),
        index=BRAIN_KEY,
        reference=reference,
        label_field="ground_truth",
        pred_field=pred_field,
        k=K,
        overwrite=True,
        progress=False,
        **kwargs,
    )
    out = {"seconds": time.perf_counter() - t0}
    out.update(_accuracy(dataset, pred_field))
    return out, result


def _accuracy(dataset, pred_field) -> dict:
    pred, truth = dataset.match_tags("test").values(
        [f"{pred_field}.label", "ground_truth.label"]
    )
    right = [p == t for p, t in zip(pred, truth, strict=True)]
    return {"accuracy": float(np.mean(right))}


def stage_knn_tag(dataset, tmp, kind):
    return _preannotate(dataset, "train", "pre_tag")[0]


def stage_knn_view(dataset, tmp, kind):
    return _preannotate(dataset, dataset.match_tags("train"), "pre_view")[0]


def stage_exact(dataset, tmp, kind):
    import knn_throughput

    t0 = time.perf_counter()
    stages, _ = knn_throughput.run_exact(dataset, "pre_exact")
    out = {"seconds": time.perf_counter() - t0, "stages": stages}
    out.update(_accuracy(dataset, "pre_exact"))
    return out


def stage_one_click(dataset, tmp, kind):
    out, result = _preannotate(
        dataset,
        "train",
        "pre_accept",
        mode="adapted",
        target_precision=0.99,
    )
    accepted = dataset.match_tags("test").match({"pre_accept.accepted": True})
    pred, truth = accepted.values(["pre_accept.label", "ground_truth.label"])
    out["accepted"] = len(pred)
    out["accepted_precision"] = (
        float(np.mean([p == t for p, t in zip(pred, truth, strict=True)]))
        if pred
        else None
    )
    return out


def stage_mistakes(dataset, tmp, kind):
    import prelabel

    refs = dataset.match_tags("train")
    t0 = time.perf_counter()
    prelabel.find_label_mistakes(
        refs,
        index=BRAIN_KEY,
        label_field="ground_truth",
        k=K,
        overwrite=True,
        progress=False,
    )
    return {"seconds": time.perf_counter() - t0, "scored": len(refs)}


def _median_ms(fn, repeat=REPEAT) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, max(times) * 1000


def stage_panel(dataset, tmp, kind):
    from mistakes_panel import REPO, App

    fo = common.fiftyone()
    plugins = tempfile.mkdtemp(prefix="plugins-", dir=tmp)
    os.symlink(REPO, os.path.join(plugins, "prelabel-qdrant"))
    fo.config.plugins_dir = plugins
    out = {}
    for mode in ("prelabel", "suspicious"):
        t0 = time.perf_counter()
        app = App(dataset)
        app.state["mode"] = mode
        app.event("on_load")
        out[f"{mode}_first_ms"] = (time.perf_counter() - t0) * 1000

        def open_panel(mode=mode):
            other = App(dataset)
            other.state["mode"] = mode
            other.event("on_load")

        out[f"{mode}_open_ms"] = _median_ms(open_panel)
        app.change("mode", mode, "on_change_mode")
        out[f"{mode}_slider_ms"] = _median_ms(
            lambda app=app: app.change(
                "filters.min_score", 0.5, "on_change_filter"
            )
        )
        out[f"{mode}_class_ms"] = _median_ms(
            lambda app=app: app.change(
                "filters.truth", "3", "on_change_filter"
            )
        )
        out[f"{mode}_rows"] = app.state.get("summary")
    return out


def stage_app_sort(dataset, tmp, kind):
    import fiftyone.brain as fob
    from fiftyone.server.app import app as server
    from starlette.testclient import TestClient

    query_ids = (
        dataset.match_tags("test").take(REPEAT + 1, seed=0).values("id")
    )
    t0 = time.perf_counter()
    if SKLEARN_KEY not in dataset.list_brain_runs():
        fob.compute_similarity(
            dataset,
            embeddings="emb",
            backend="sklearn",
            brain_key=SKLEARN_KEY,
            progress=False,
        )
    out = {"sklearn_setup_s": time.perf_counter() - t0}
    with TestClient(server) as client:
        for key in (BRAIN_KEY, SKLEARN_KEY):

            def sort(i, key=key):
                return _app_sort(client, dataset, query_ids[i], key)

            t0 = time.perf_counter()
            first = sort(0)
            out[f"{key}_first_ms"] = (time.perf_counter() - t0) * 1000
            times = []
            for i in range(1, REPEAT + 1):
                t0 = time.perf_counter()
                page = sort(i)
                times.append(time.perf_counter() - t0)
            out[f"{key}_ms"] = statistics.median(times) * 1000
            out[f"{key}_page"] = len(page)
            out[f"{key}_self_first"] = first[0] == query_ids[0]
    return out


def _app_sort(client, dataset, query_id, brain_key) -> list[str]:
    """What the App does: POST /sort with the similarity stage, then load
    the first page of the view it returns (built by the server's own
    ``get_view``, its ObjectIds parsed as the grid's BSON scalars parse
    them)."""
    import fiftyone.server.view as fosv
    from bson import json_util

    response = client.post(
        "/sort",
        json={
            "dataset": dataset.name,
            "view": [],
            "filters": {},
            "subscription": "bench",
            "extended": {
                "query": query_id,
                "k": 25,
                "brain_key": brain_key,
                "reverse": False,
            },
        },
    )
    response.raise_for_status()
    stage = json_util.loads(response.text)
    view = fosv.get_view(dataset.name, stages=[stage])
    return view.limit(20).values("id")


STAGES = {
    "build": None,  # see child()
    "sync": stage_sync,
    "sync_incremental": stage_sync_incremental,
    "knn_tag": stage_knn_tag,
    "knn_view": stage_knn_view,
    "exact": stage_exact,
    "one_click": stage_one_click,
    "mistakes": stage_mistakes,
    "panel": stage_panel,
    "app_sort": stage_app_sort,
}


def child(stage: str, kind: str, n: int, tmp: str) -> None:
    if stage == "build":
        out = build(kind, n)
    else:
        fo = common.fiftyone()
        dataset = fo.load_dataset(dataset_name(kind, n))
        out = STAGES[stage](dataset, tmp, kind)
    out["peak_rss"] = common.self_peak_rss()
    common.emit(out)


# ---- the parent ----------------------------------------------------------


def run_size(kind: str, n: int) -> dict:
    """Every stage at one size, in child processes; returns their
    results by stage name (plus ``seconds`` and ``peak_rss`` of each)."""
    results = {}
    tmp = tempfile.mkdtemp(prefix="bench-scale-")
    try:
        for stage in STAGES:
            print(f"  {kind} {n:,}: {stage}", flush=True)
            cmd = [
                common.PY,
                os.path.abspath(__file__),
                "--child",
                stage,
                "--kind",
                kind,
                "--n",
                str(n),
                "--tmp",
                tmp,
            ]
            m = common.run_measured(cmd)
            if m["returncode"] != 0 or m["result"] is None:
                raise RuntimeError(f"{stage} failed:\n{m['tail']}")
            res = m["result"]
            res["peak_rss"] = max(res["peak_rss"], m["peak_rss"])
            # with the process reading ahead (forked: shared pages split)
            res["peak_tree_pss"] = m["peak_tree_pss"]
            res["wall_s"] = m["seconds"]
            results[stage] = res
            print(f"    {json.dumps(res)[:300]}", flush=True)
        results["recall"] = recall(kind, n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def recall(kind: str, n: int) -> dict:
    """Recall@k of the neighbors each kNN stage wrote, against the exact
    neighbors the exact stage wrote (same targets)."""
    fo = common.fiftyone()
    targets = fo.load_dataset(dataset_name(kind, n)).match_tags("test")
    exact = targets.values("pre_exact.neighbors")
    return {
        field: common.recall_at_k(
            targets.values(f"{field}.neighbors"), exact, K
        )
        for field in ("pre_tag", "pre_view")
    }


# ---- tables --------------------------------------------------------------


def stage_rows(by_size: dict[int, dict]) -> list[list[str]]:
    """One row per stage: seconds (and a rate) and peak RSS per size."""
    sizes = sorted(by_size)

    def cells(fn):
        return [c for n in sizes for c in fn(by_size[n], n)]

    def plain(stage, key="seconds"):
        return lambda r, n: [
            fmt_s(r[stage][key]),
            fmt_mb(r[stage]["peak_rss"]),
        ]

    def rate(stage):
        return lambda r, n: [
            f"{fmt_s(r[stage]['seconds'])} "
            f"({fmt_rate(NUM_TARGETS / r[stage]['seconds'])}/s)",
            fmt_mb(r[stage]["peak_rss"]),
        ]

    def panel(mode):
        def cell(r, n):
            p = r["panel"]
            return [
                f"{p[f'{mode}_open_ms'][0]:,.0f} / "
                f"{p[f'{mode}_class_ms'][0]:,.0f} ms",
                fmt_mb(p["peak_rss"]),
            ]

        return cell

    def sort(key):
        return lambda r, n: [
            f"{r['app_sort'][f'{key}_ms']:,.0f} ms "
            f"(first {r['app_sort'][f'{key}_first_ms']:,.0f})",
            fmt_mb(r["app_sort"]["peak_rss"]),
        ]

    rows = [
        ["build the dataset (not ours)"] + cells(plain("build", "wall_s")),
        ["sync from nothing"] + cells(plain("sync")),
        ["sync +1 % samples"] + cells(plain("sync_incremental")),
        ["sync -1 % samples"]
        + cells(plain("sync_incremental", "delete_seconds")),
        ["pre-annotate, references as a tag"] + cells(rate("knn_tag")),
        ["pre-annotate, references as a view"] + cells(rate("knn_view")),
        ["exact numpy, same vote and write"] + cells(rate("exact")),
        ["one-click (adapted, precision 0.99)"] + cells(rate("one_click")),
        ["find_label_mistakes of every reference"] + cells(plain("mistakes")),
        ["mistakes panel, pre-labels: open / class filter (median)"]
        + cells(panel("prelabel")),
        ["mistakes panel, suspicious labels: open / class filter"]
        + cells(panel("suspicious")),
        ["App /sort by similarity, our index"] + cells(sort(BRAIN_KEY)),
        ["App /sort by similarity, sklearn backend"]
        + cells(sort(SKLEARN_KEY)),
    ]
    return rows


def quality_rows(by_size: dict[int, dict]) -> list[list[str]]:
    rows = []
    for n in sorted(by_size):
        r = by_size[n]
        one = r["one_click"]
        prec = one["accepted_precision"]
        rows.append(
            [
                fmt_int(n),
                common.fmt_ratio(
                    1 / r["knn_tag"]["seconds"], 1 / r["exact"]["seconds"]
                ),
                f"{r['recall']['pre_tag']:.4f}",
                f"{r['recall']['pre_view']:.4f}",
                f"{r['knn_tag']['accuracy']:.4f}",
                f"{r['exact']['accuracy']:.4f}",
                f"{fmt_int(one['accepted'])} at "
                + (f"{prec:.4f}" if prec is not None else "n/a"),
            ]
        )
    return rows


def run(quick: bool, sizes=None, kinds=None) -> dict:
    cfg = settings(quick)
    sizes = sizes or cfg["sizes"]
    kinds = kinds or cfg["kinds"]
    common.fiftyone().list_datasets()  # keeps MongoDB up between stages
    tables, kept = [], {}
    for kind in kinds:
        by_size = {}
        for n in sizes:
            by_size[n] = run_size(kind, n)
            kept[kind] = by_size[n]["build"].get("kept", kept.get(kind))
        columns = ["stage"]
        for n in sizes:
            columns += [f"{fmt_int(n)}: time", "peak RSS MB"]
        tables.append(
            common.table(
                f"{kind}: each stage, {fmt_int(NUM_TARGETS)} targets",
                columns,
                stage_rows(by_size),
            )
        )
        tables.append(
            common.table(
                f"{kind}: ours against exact numpy, recall@{K}, accuracy",
                [
                    "samples",
                    "ours (tag) / exact numpy",
                    "recall (tag)",
                    "recall (view)",
                    "accuracy ours",
                    "accuracy exact",
                    "one-click accepted at precision",
                ],
                quality_rows(by_size),
            )
        )
    desc = "\n\n".join(__doc__.split("\n\n")[1:4])
    notes = [
        "Share of the variance kept by the 256 components: "
        + ", ".join(f"{k} {v:.3f}" for k, v in kept.items() if v)
        + ". Peak RSS is each stage's own process (VmHWM, and the "
        "largest RSS polled every 0.2 s), MongoDB not included."
    ]
    return common.section(
        "Scale in FiftyOne: 10^5 to 10^6 samples",
        desc,
        tables,
        notes,
        reproduce="make bench-scale",
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", help="comma-separated sample counts")
    parser.add_argument("--kinds", help="mnist, fashion or both")
    parser.add_argument("--json", help="also write the section here")
    parser.add_argument("--child", choices=list(STAGES))
    parser.add_argument("--kind")
    parser.add_argument("--n", type=int)
    parser.add_argument("--tmp")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.kind, args.n, args.tmp)
        return 0
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    kinds = args.kinds.split(",") if args.kinds else None
    return common.main_for(
        lambda quick: run(quick, sizes, kinds),
        ["--quick"] * args.quick + (["--json", args.json] * bool(args.json)),
    )


if __name__ == "__main__":
    sys.exit(main())
