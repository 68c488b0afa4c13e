"""A detection dataset made of real images: each small image (a digit,
a piece of clothing) is pasted, pixels unchanged, at a random place on a
larger canvas of noise (the clutter around an object), with one box
around it.

It lets the same objects be labeled two ways, so that box-level and
image-level pre-labels can be compared: each sample has the object's class
as an image-level ``Classification`` (``ground_truth``, on the reference
samples only, and ``truth`` on all) and as the ``label`` of its one box
in ``detections`` (reference samples only: the other boxes are
unlabeled). A share of the reference boxes can be given a wrong label
(the sample is tagged ``mislabeled``) to test label-mistake finding.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import fiftyone as fo
import numpy as np
from PIL import Image

#: the tag of reference samples, and of samples whose box label is wrong
REFERENCE_TAG = "reference"
MISLABELED_TAG = "mislabeled"


def write_tiles(
    items: Sequence[tuple[str, str]],
    out_dir: str,
    canvas: int = 96,
    seed: int = 0,
) -> list[tuple[str, str, list[float]]]:
    """Pastes each image of ``items`` (``(filepath, label)``) on a
    ``canvas`` x ``canvas`` image of grey noise, at a random place.

    Returns:
        ``(tile filepath, label, relative [x, y, w, h] box)`` per item:
        the box is the pasted image exactly (see :func:`grow`)
    """
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    out = []
    for i, (path, label) in enumerate(items):
        with Image.open(path) as im:
            obj = np.asarray(im.convert("L"), dtype=np.float32)
        h, w = obj.shape
        if h >= canvas or w >= canvas:
            raise ValueError(
                f"canvas={canvas} is not larger than the {w}x{h} image "
                f"{path}; pass a larger canvas"
            )
        tile = rng.normal(40.0, 20.0, (canvas, canvas))
        x = int(rng.integers(0, canvas - w))
        y = int(rng.integers(0, canvas - h))
        tile[y : y + h, x : x + w] = obj
        target = os.path.join(out_dir, f"tile-{i:05d}.png")
        Image.fromarray(np.clip(tile, 0, 255).astype(np.uint8)).save(target)
        box = [x / canvas, y / canvas, w / canvas, h / canvas]
        out.append((target, label, box))
    return out


def grow(box: Sequence[float], margin: float) -> list[float]:
    """``box`` (relative ``[x, y, w, h]``) grown by ``margin`` of its size
    on every side, within the image: a loose box, as detectors and people
    draw them, whose crop holds some clutter."""
    x0 = max(box[0] - margin * box[2], 0.0)
    y0 = max(box[1] - margin * box[3], 0.0)
    x1 = min(box[0] + (1 + margin) * box[2], 1.0)
    y1 = min(box[1] + (1 + margin) * box[3], 1.0)
    return [x0, y0, x1 - x0, y1 - y0]


def make_tiled_dataset(
    tiles: Sequence[tuple[str, str, list[float]]],
    name: str,
    reference_share: float = 0.5,
    wrong_share: float = 0.0,
    seed: int = 0,
    overwrite: bool = False,
) -> fo.Dataset:
    """A dataset of the tiles of :func:`write_tiles`.

    Args:
        tiles: ``(filepath, label, box)`` per sample
        name: the dataset name
        reference_share (0.5): the share of samples whose box (and image)
            is labeled, tagged ``reference``
        wrong_share (0.0): the share of reference boxes given another
            class (tagged ``mislabeled``; ``ground_truth`` keeps the true
            class)
        seed (0): the random seed of both choices
        overwrite (False): replace a dataset of that name

    Returns:
        a :class:`fiftyone.core.dataset.Dataset`
    """
    rng = np.random.default_rng(seed)
    classes = sorted({lbl for _, lbl, _ in tiles})
    n = len(tiles)
    ref = set(rng.permutation(n)[: int(round(n * reference_share))])
    wrong = {i for i in ref if rng.random() < wrong_share}
    samples = []
    for i, (path, label, box) in enumerate(tiles):
        box_label = None
        tags = []
        if i in ref:
            tags.append(REFERENCE_TAG)
            box_label = label
        if i in wrong:
            tags.append(MISLABELED_TAG)
            others = [c for c in classes if c != label]
            box_label = others[int(rng.integers(len(others)))]
        samples.append(
            fo.Sample(
                filepath=path,
                tags=tags,
                truth=fo.Classification(label=label),
                ground_truth=(
                    fo.Classification(label=label) if i in ref else None
                ),
                detections=fo.Detections(
                    detections=[
                        fo.Detection(label=box_label, bounding_box=list(box))
                    ]
                ),
            )
        )
    dataset = fo.Dataset(name, overwrite=overwrite)
    dataset.add_samples(samples, progress=False)
    return dataset
