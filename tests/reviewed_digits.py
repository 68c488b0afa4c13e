"""A small dataset with everything the mistakes panel reviews, built by the
real package: sklearn's real 8x8 digits (64 pixels as ``embeddings``),
10 % of the labels flipped, a Qdrant Edge index, pre-labels of the
``test`` samples evaluated under ``prelabel_eval``, and label-mistake
scores of every labeled sample; and, for the "Label next" tab, digits
partly labeled with a batch picked to label next."""

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


def build_picked_dataset(n=200, num_labeled=80, budget=20, seed=0):
    """``n`` real digits (64 pixels as ``embeddings``) with their class in
    ``truth``, ``ground_truth`` on the first ``num_labeled`` only, a
    Qdrant Edge index, and ``budget`` samples picked to label next by
    :func:`prelabel.select_for_labeling` (``"spread"``, after a
    pre-annotation with an accept threshold, so that there is a forecast).

    Returns ``(dataset, selection result)``.
    """
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.data))[:n]
    dataset = fo.Dataset(f"prelabel-picked-{uuid.uuid4().hex[:8]}")
    samples = []
    for rank, i in enumerate(order):
        label = str(digits.target[i])
        samples.append(
            fo.Sample(
                filepath=f"/nonexistent/picked/{i:04d}.png",
                embeddings=digits.data[i].astype(np.float32),
                truth=fo.Classification(label=label),
                ground_truth=(
                    fo.Classification(label=label)
                    if rank < num_labeled
                    else None
                ),
            )
        )
    dataset.add_sample_field(
        "ground_truth",
        fo.EmbeddedDocumentField,
        embedded_doc_type=fo.Classification,
    )
    dataset.add_samples(samples, progress=False)
    prelabel.sync_index(dataset, progress=False)
    if num_labeled:
        # a pre-annotation with an accept threshold: what a forecast
        # starts from
        prelabel.preannotate(
            dataset.exists("ground_truth", False),
            pred_field="prelabel",
            target_precision=0.8,
            progress=False,
        )
    out = prelabel.select_for_labeling(
        dataset, budget=budget, strategy="spread", seed=seed, progress=False
    )
    return dataset, out


def label_from_truth(dataset, ids):
    """A person labels ``ids``: their true class into ``ground_truth``."""
    view = dataset.select(ids)
    truth = dict(zip(*view.values(["id", "truth.label"]), strict=True))
    dataset.set_values(
        "ground_truth",
        {sid: fo.Classification(label=t) for sid, t in truth.items()},
        key_field="id",
    )
