"""How long the mistakes panel takes to open and re-filter at 10^4 samples.

Drives the real panel through FiftyOne's operator machinery (the calls the
App makes: ``on_load``, a slider change, a class filter, a mode switch, a
row click, a confusion-cell click) and times each event end to end: the
panel's queries, its render and the serialization of what goes back.

    # a synthetic dataset with both modes (deleted afterwards)
    python benchmarks/mistakes_panel.py --num-samples 10000

    # read-only on an existing pre-annotated dataset (no tags, no writes)
    python benchmarks/mistakes_panel.py --dataset mnist-prelabel

Prints one line per event: the median and the slowest of ``--repeat``.
"""

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import uuid

os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")

import fiftyone as fo  # noqa: E402
import fiftyone.operators as foo  # noqa: E402
import numpy as np  # noqa: E402
import pydash  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PANEL_URI = "@prelabel/qdrant/mistakes_panel"
K = 15


def synthetic_dataset(n, seed=0, num_classes=10, reference_frac=0.25):
    """``n`` samples with what preannotate and find_label_mistakes write:
    kNN-like votes of ``K`` reference neighbors, 10 % of them wrong."""
    rng = np.random.default_rng(seed)
    classes = [str(c) for c in range(num_classes)]
    truth = rng.integers(0, num_classes, n)
    dataset = fo.Dataset(f"prelabel-bench-{uuid.uuid4().hex[:8]}")
    dataset.add_samples(
        [
            fo.Sample(
                filepath=f"/nonexistent/bench/{i:06d}.png",
                ground_truth=fo.Classification(label=classes[t]),
                tags=["train" if i < n * reference_frac else "test"],
            )
            for i, t in enumerate(truth)
        ],
        progress=False,
    )
    ids = np.array(dataset.values("id"))
    num_ref = int(n * reference_frac)

    def vote(own):
        wrong = rng.random() < 0.1
        winner = (own + rng.integers(1, num_classes)) % num_classes
        winner = winner if wrong else own
        top = int(rng.integers(6, K + 1))
        other = (winner + 1) % num_classes
        counts = {classes[winner]: top}
        if top < K:
            counts[classes[other]] = K - top
        votes = ", ".join(f"{c}: {v}" for c, v in counts.items())
        return classes[winner], top / K, votes, counts

    pre, score, major = {}, {}, {}
    for i, sid in enumerate(ids):
        label, conf, votes, counts = vote(truth[i])
        neighbors = list(rng.choice(ids[:num_ref], K, replace=False))
        cls = fo.Classification(
            label=label, confidence=conf, votes=votes, neighbors=neighbors
        )
        major[sid] = cls
        score[sid] = 1.0 - counts.get(classes[truth[i]], 0) / K
        if i >= num_ref:
            pre[sid] = cls.copy()
    for field, values in (
        ("prelabel", pre),
        ("mistake_score_label", major),
        ("mistake_score", score),
    ):
        dataset.set_values(field, values, key_field="id")
    info = dict(dataset.info or {})
    info["prelabel_runs"] = {
        "prelabel": {"label_field": "ground_truth", "classes": classes}
    }
    dataset.info = info
    dataset.save()
    dataset.match_tags("test").evaluate_classifications(
        "prelabel",
        gt_field="ground_truth",
        eval_key="prelabel_eval",
        classes=classes,
        progress=False,
    )
    return dataset


class App:
    """The App side of an open panel (as in tests/test_mistakes_panel)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.panel_id = uuid.uuid4().hex
        self.state, self.data = {}, {}

    def event(self, method, **params):
        result = foo.execute_operator(
            PANEL_URI,
            ctx=dict(
                dataset=self.dataset,
                params={
                    **params,
                    "__method__": method,
                    "panel_id": self.panel_id,
                    "panel_state": copy.deepcopy(self.state),
                },
            ),
        )
        if result.error:
            raise RuntimeError(result.error)
        for request in result.executor.to_json()["requests"]:
            name, p = request["operator_uri"], request["params"]
            if name == "patch_panel_state":
                for key, value in p["state"].items():
                    pydash.set_(self.state, key, value)
            elif name == "patch_panel_data":
                for key, value in p["data"].items():
                    pydash.set_(self.data, key, value)

    def change(self, path, value, method):
        pydash.set_(self.state, path, value)
        self.event(method, path=path, value=value)


def timed(label, fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    print(
        f"{label:<44} median {statistics.median(times) * 1000:7.0f} ms"
        f"   max {max(times) * 1000:7.0f} ms"
    )


def run(dataset, repeat, modes):
    app = App(dataset)
    app.event("on_load")  # warm: plugin discovery, imports
    timed(
        "open (on_load + render)",
        lambda: App(dataset).event("on_load"),
        repeat,
    )
    timed(
        "slider: min confidence 0.5",
        lambda: app.change("filters.min_score", 0.5, "on_change_filter"),
        repeat,
    )
    timed(
        "filter: ground truth class 3",
        lambda: app.change("filters.truth", "3", "on_change_filter"),
        repeat,
    )
    app.change("filters.truth", "(any)", "on_change_filter")
    app.change("filters.min_score", 0.0, "on_change_filter")
    timed(
        "row click (sample + neighbors view)",
        lambda: app.event("on_click_row", row=0),
        repeat,
    )
    z = app.data.get("confusion", [{}])[0].get("z")
    if z:
        timed(
            "confusion cell click (truth 3, pred 5)",
            lambda: app.event("on_click_cell", x="5", y="3"),
            repeat,
        )
    timed("show more (200 rows)", lambda: app.event("on_show_more"), repeat)
    if "suspicious" in modes:

        def switch():
            app.change("mode", "suspicious", "on_change_mode")
            app.change("mode", "prelabel", "on_change_mode")

        timed("mode switch, both ways", switch, repeat)
    print(f"rows: {app.state.get('summary')}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=10000)
    parser.add_argument("--dataset", help="an existing dataset (read only)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    plugins = tempfile.mkdtemp(prefix="prelabel-bench-plugins-")
    os.symlink(REPO, os.path.join(plugins, "prelabel-qdrant"))
    fo.config.plugins_dir = plugins

    if args.dataset:
        dataset = fo.load_dataset(args.dataset)
        print(f"{args.dataset}: {len(dataset)} samples (read only)")
        run(dataset, args.repeat, modes=("prelabel",))
        return 0
    t0 = time.perf_counter()
    dataset = synthetic_dataset(args.num_samples)
    print(
        f"synthetic: {len(dataset)} samples, built in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    try:
        run(dataset, args.repeat, modes=("prelabel", "suspicious"))
    finally:
        dataset.delete()
    return 0


if __name__ == "__main__":
    sys.exit(main())
