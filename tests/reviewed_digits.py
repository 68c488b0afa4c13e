"""A small dataset with everything the mistakes panel reviews, built by the
real package: sklearn's real 8x8 digits (64 pixels as ``embeddings``),
10 % of the labels flipped, a Qdrant Edge index, pre-labels of the
``test`` samples evaluated under ``prelabel_eval``, and label-mistake
scores of every labeled sample."""

import uuid

import fiftyone as fo
import numpy as np
from sklearn.datasets import load_digits

import prelabel

EVAL_KEY = "prelabel_eval"
NUM_TRAIN = 250


def build_reviewed_dataset(n=400, seed=0, flip_every=10):
    """Returns ``(dataset, preannotation result, label mistakes result)``."""
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.data))[:n]
    dataset = fo.Dataset(f"prelabel-review-{uuid.uuid4().hex[:8]}")
    samples = []
    for rank, i in enumerate(order):
        label = int(digits.target[i])
        if rank % flip_every == 3:  # a wrong label, as people make them
            label = (label + 1) % 10
        samples.append(
            fo.Sample(
                filepath=f"/nonexistent/digits/{i:04d}.png",
                embeddings=digits.data[i].astype(np.float32),
                ground_truth=fo.Classification(label=str(label)),
                tags=["train" if rank < NUM_TRAIN else "test"],
            )
        )
    dataset.add_samples(samples, progress=False)
    prelabel.sync_index(dataset, progress=False)
    pre = prelabel.preannotate(
        dataset.match_tags("test"),
        reference="train",
        eval_key=EVAL_KEY,
        progress=False,
    )
    mistakes = prelabel.find_label_mistakes(dataset, progress=False)
    return dataset, pre, mistakes


def delete(dataset):
    if fo.dataset_exists(dataset.name):
        dataset.delete()
