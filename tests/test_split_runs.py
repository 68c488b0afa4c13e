"""Embedding split between processes that run at once: the slices of
sample ids, and the field prepared for them, on real digits in a real
dataset (the two-worker run through FiftyOne's delegated queue is in
``test_operators.py``)."""

import fiftyone as fo
import numpy as np
import pytest
from bson import ObjectId

from prelabel import IdRange, plan_embedding_runs, records
from prelabel.embeddings import compute_embeddings
from prelabel.slicing import split_by_id

PIXELS = dict(model="pixels", image_size=12)


def _ids(n):
    return [str(ObjectId()) for _ in range(n)]


def test_split_by_id_makes_even_disjoint_slices_in_id_order():
    ids = _ids(10)
    runs = split_by_id(list(reversed(ids)), 3)
    assert [r.size for r in runs] == [3, 4, 3]
    covered = [i for r in runs for i in ids if r.first <= i <= r.last]
    assert covered == sorted(ids)
    assert split_by_id(ids[:2], 5) == [
        IdRange(ids[0], ids[0], 1),
        IdRange(ids[1], ids[1], 1),
    ]
    assert split_by_id([], 4) == []
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="parts must be a positive"):
            split_by_id(ids, bad)


def test_id_range_round_trips_and_names_a_bad_slice():
    first, last = sorted(_ids(2))
    run = IdRange(first, last, 7)
    assert IdRange.from_dict(run.to_dict()) == run
    assert IdRange.from_dict({"first": first, "last": last}).size is None
    for bad in (None, {"first": first}, {"first": "x", "last": last}):
        with pytest.raises(ValueError, match="slice=.*not a slice"):
            IdRange.from_dict(bad)
    with pytest.raises(ValueError, match="part=.*empty"):
        IdRange.from_dict({"first": last, "last": first}, param="part")


def test_runs_embed_only_the_missing_samples_once(digits_dataset):
    done = digits_dataset.take(40, seed=1)
    compute_embeddings(done, progress=False, num_workers=0, **PIXELS)
    before = dict(zip(*done.values(["id", "embeddings"]), strict=True))
    missing = set(digits_dataset.exists("embeddings", False).values("id"))

    runs = plan_embedding_runs(digits_dataset, 3, **PIXELS)

    assert len(runs) == 3 and sum(r.size for r in runs) == len(missing)
    slices = [set(r.of(digits_dataset).values("id")) & missing for r in runs]
    assert set().union(*slices) == missing
    assert sum(len(s) for s in slices) == len(missing)
    assert [len(s) for s in slices] == [r.size for r in runs]
    # nothing embedded yet; the field is declared as the model's
    assert len(digits_dataset.exists("embeddings")) == 40
    info = digits_dataset.get_field("embeddings").info
    assert info["model"] == "pixels"
    assert records.writer_of(digits_dataset, "embeddings") == (
        records.EMBEDDINGS
    )

    for run in reversed(runs):  # any order: the slices are independent
        n = compute_embeddings(
            run.of(digits_dataset), progress=False, num_workers=0, **PIXELS
        )
        assert n == run.size
    assert len(digits_dataset.exists("embeddings", False)) == 0
    after = dict(zip(*done.values(["id", "embeddings"]), strict=True))
    assert all(np.array_equal(before[i], after[i]) for i in before)

    # the same vectors as one job writes
    one = digits_dataset.clone()
    try:
        compute_embeddings(
            one, progress=False, skip_existing=False, num_workers=0, **PIXELS
        )
        # clone() keeps the samples' order
        split, whole = digits_dataset.values("embeddings"), one.values(
            "embeddings"
        )
        for a, b in zip(split, whole, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)
    finally:
        one.delete()

    assert plan_embedding_runs(digits_dataset, 3, **PIXELS) == []


def test_a_dead_run_leaves_its_slice_to_plan_again(digits_dataset):
    first, second = plan_embedding_runs(digits_dataset, 2, **PIXELS)
    compute_embeddings(
        first.of(digits_dataset), progress=False, num_workers=0, **PIXELS
    )
    # the second run died having written 10 of its samples
    half = second.of(digits_dataset).limit(10)
    compute_embeddings(half, progress=False, num_workers=0, **PIXELS)

    again = plan_embedding_runs(digits_dataset, 2, **PIXELS)
    assert sum(r.size for r in again) == second.size - 10
    inside = [second.first <= r.first and r.last <= second.last for r in again]
    assert all(inside)


def test_plan_refuses_what_one_job_must_do(digits_dataset):
    with pytest.raises(ValueError, match="num_runs must be .*; got 0"):
        plan_embedding_runs(digits_dataset, 0, **PIXELS)
    with pytest.raises(ValueError, match="num_runs must be .*; got '4'"):
        plan_embedding_runs(digits_dataset, "4", **PIXELS)
    with pytest.raises(ValueError, match="model"):
        plan_embedding_runs(digits_dataset, 2, model="vit_huge")

    # a person's vector field can only be replaced whole, by one job
    digits_dataset.add_sample_field("theirs", fo.VectorField)
    digits_dataset.take(5, seed=0).set_values("theirs", [[1.0, 2.0]] * 5)
    with pytest.raises(ValueError, match="embeddings_field='theirs'.*one job"):
        plan_embedding_runs(
            digits_dataset,
            2,
            embeddings_field="theirs",
            overwrite=True,
            **PIXELS,
        )
    assert digits_dataset.get_field("theirs").info is None
    assert len(digits_dataset.exists("theirs")) == 5

    # another model's vectors are not mixed in
    compute_embeddings(
        digits_dataset.limit(5), progress=False, num_workers=0, **PIXELS
    )
    with pytest.raises(ValueError, match="embeddings_field='embeddings'"):
        plan_embedding_runs(digits_dataset, 2, model="pixels", image_size=16)
