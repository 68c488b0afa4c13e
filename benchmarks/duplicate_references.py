"""The accept promise when the references hold near-duplicates of each
other that the targets do not have.

Data: the datasets of ``scale_fiftyone.py`` (noisy copies of the 10,000
real MNIST or Fashion-MNIST features on 256 components; the last 10,000
samples are the targets, copies of a held-out fifth of the real images;
the references are copies of the other four fifths, so at 60,000 samples
each reference has about five copies of its own image among the other
references and no target has one).

Each cell is ``prelabel.preannotate(targets, reference="train",
target_precision=0.99)`` in a child process of its own, ``mode="knn"``
and ``mode="adapted"`` (the one-click setting), with the references
scored as they are now (neighbors closer than the targets get set aside,
near-duplicates kept in one cross-fitting fold: ``prelabel.core.leakage``)
and as before (both switched off in that child: the alternative). The
adapter is learned again for every adapted cell. Reported: what was
accepted and its precision against the hidden truth, the references'
held-out accuracy next to the targets' accuracy (they should agree), and
the promise the run printed.

    python benchmarks/duplicate_references.py [--quick]  # quick: 30,000
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402
import scale_fiftyone as sf  # noqa: E402

TARGET_PRECISION = 0.99
MODES = ("knn", "adapted")


def settings(quick: bool) -> dict:
    if quick:
        return {"n": 30000, "kinds": ["mnist"]}
    return {"n": 60000, "kinds": ["mnist", "fashion"]}


def _switch_off() -> None:
    """The references scored as before: nothing set aside, folds blind to
    near-duplicates."""
    from prelabel.core import adapter, leakage

    leakage.closeness_threshold = lambda *a, **k: float("inf")
    adapter.reference_groups = lambda *a, **k: None


def child(kind: str, n: int, mode: str, aside: bool, tmp: str) -> None:
    import prelabel
    from prelabel.adapt import delete_adapters

    fo = common.fiftyone()
    dataset = fo.load_dataset(sf.dataset_name(kind, n))
    if mode == "sync":  # the index every cell of this kind votes in
        common.emit(sf.stage_sync(dataset, tmp, kind))
        return
    if not aside:
        _switch_off()
    # the adapter is learned again for every cell: its record, the
    # adapted field and its index go first
    adapted = f"{sf.BRAIN_KEY}_adapted"
    if adapted in dataset.list_brain_runs():
        dataset.delete_brain_run(adapted)
    delete_adapters(dataset)
    if dataset.has_sample_field("emb_adapted"):
        dataset.delete_sample_field("emb_adapted")
    t0 = time.perf_counter()
    out = prelabel.preannotate(
        dataset.match_tags("test"),
        index=sf.BRAIN_KEY,
        reference="train",
        label_field="ground_truth",
        pred_field="pre_dup",
        k=sf.K,
        mode=mode,
        target_precision=TARGET_PRECISION,
        overwrite=True,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    targets = dataset.match_tags("test")
    pred, truth = targets.values(["pre_dup.label", "ground_truth.label"])
    accepted = targets.match({"pre_dup.accepted": True})
    a_pred, a_truth = accepted.values(["pre_dup.label", "ground_truth.label"])
    common.emit(
        {
            "seconds": seconds,
            "accepted": len(a_pred),
            "precision": (
                float(np.mean(np.array(a_pred) == np.array(a_truth)))
                if a_pred
                else None
            ),
            "accuracy": float(np.mean(np.array(pred) == np.array(truth))),
            "reference_accuracy": out.reference_accuracy,
            "expected_precision": out.expected_precision,
            "trimmed": out.num_reference_trimmed,
            "scored": out.num_reference_scored,
            "promise": out.promise,
        }
    )


def _cell(kind, n, mode, aside, tmp) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        kind,
        str(n),
        mode,
        "1" if aside else "0",
        tmp,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in res.stdout.splitlines():
        if line.startswith(common.JSON_MARK):
            return json.loads(line[len(common.JSON_MARK) :])
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")


def _row(kind, mode, aside, r) -> list[str]:
    prec = r["precision"]
    return [
        kind,
        "one-click (adapted)" if mode == "adapted" else "kNN vote",
        "yes (now)" if aside else "no (before)",
        f"{r['accepted']:,}",
        f"{prec:.4f}" if prec is not None else "nothing accepted",
        "yes" if prec is None or prec >= TARGET_PRECISION else "**no**",
        f"{r['reference_accuracy']:.4f} / {r['accuracy']:.4f}",
        f"{r['trimmed'] or 0:,} of {r['scored']:,}",
        f"{r['seconds']:.0f}",
    ]


def run(quick: bool) -> dict:
    cfg = settings(quick)
    n = cfg["n"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="prelabel-dups-") as tmp:
        for kind in cfg["kinds"]:
            sf.build(kind, n)
            _cell(kind, n, "sync", True, tmp)
            for mode in MODES:
                for aside in (False, True):
                    r = _cell(kind, n, mode, aside, tmp)
                    print(kind, mode, aside, r, flush=True)
                    rows.append(_row(kind, mode, aside, r))
    return common.section(
        "References with near-duplicates: the accept promise",
        __doc__.split("\n\n    python")[0],
        [
            common.table(
                f"{n:,} samples, {sf.NUM_TARGETS:,} targets, "
                f"precision {TARGET_PRECISION} asked",
                [
                    "kind",
                    "mode",
                    "near-duplicates set aside",
                    "accepted",
                    "precision of the accepted",
                    "promise kept",
                    "held-out accuracy: references / targets",
                    "references with neighbors set aside",
                    "seconds",
                ],
                rows,
            )
        ],
        reproduce="python benchmarks/duplicate_references.py",
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, n, mode, aside, tmp = sys.argv[2:7]
        child(kind, int(n), mode, aside == "1", tmp)
    else:
        sys.exit(common.main_for(run))
