"""The invariants of the one pre-annotation path, for every mode and
option: a sample never votes for itself, a failure half way leaves the
previous field as it was, ``min_confidence``, ``accepted`` and the
``needs_review`` tag agree with what was written, and the run record
says how the field was made. Real digits (sklearn's 8x8 scans, their 64
pixels as embeddings) in a real Qdrant Edge index, several chunks per run.
"""

import uuid

import fiftyone as fo
import numpy as np
import pytest
from sklearn.datasets import load_digits

import prelabel
from prelabel import constants, records
from prelabel.fields import TMP_PREFIX

K = 10
BATCH = 100

CASES = {
    "knn": {},
    "weighted": {"vote": "weighted"},
    "calibrate": {"calibrate": True},
    "accept": {"target_precision": 0.95},
    "propagate": {"propagate": True, "target_precision": 0.95},
    "adapted": {"mode": "adapted", "target_precision": 0.95},
}


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    order = np.random.default_rng(5).permutation(len(data.data))[:600]
    dataset = fo.Dataset(f"prelabel-inv-{uuid.uuid4().hex[:8]}")
    dataset.add_samples(
        [
            fo.Sample(
                filepath=f"/nonexistent/inv/{i:04d}.png",
                embeddings=data.data[i].astype(np.float32),
                ground_truth=fo.Classification(label=str(data.target[i])),
                tags=["train" if rank < 250 else "test"],
            )
            for rank, i in enumerate(order)
        ],
        progress=False,
    )
    prelabel.sync_index(dataset, brain_key="inv", progress=False)
    yield dataset
    dataset.delete()


def _run(dataset, targets, **kwargs):
    dataset.untag_samples(constants.REVIEW_TAG)
    kwargs = {
        "index": "inv",
        "reference": "train",
        "k": K,
        "batch_size": BATCH,
        "progress": False,
        **kwargs,
    }
    return prelabel.preannotate(targets, **kwargs)


@pytest.mark.parametrize("case", list(CASES))
def test_a_sample_never_votes_for_itself(digits, case):
    """Every labeled sample is a target and a reference at once."""
    targets = digits.match_tags("train")
    _run(
        digits, targets, reference=None, pred_field="self_vote", **CASES[case]
    )
    ids, preds = targets.values(["id", "self_vote"])
    assert all(p is not None for p in preds)
    for sid, pred in zip(ids, preds, strict=True):
        assert sid not in pred.neighbors
        assert len(pred.neighbors) == K


@pytest.mark.parametrize("case", list(CASES))
def test_a_failure_half_way_leaves_the_previous_field(
    digits, case, monkeypatch
):
    targets = digits.match_tags("test")
    _run(digits, targets, pred_field="kept")
    before = targets.values("kept")
    record = records.get(digits, records.RUNS, "kept")
    calls = []
    set_values = fo.Dataset.set_values
    bulk_write = fo.Dataset._bulk_write

    def fail_on_second(fields):
        if any(f.startswith(TMP_PREFIX) for f in fields):
            calls.append(fields)
            if len(calls) == 2:
                raise RuntimeError("the database went away")

    def failing(self, field, *args, **kwargs):
        fail_on_second([field])
        return set_values(self, field, *args, **kwargs)

    def failing_bulk(self, ops, *args, **kwargs):
        # the raw writes of results (prelabel.units._SampleWriter)
        fail_on_second([f for op in ops for f in op._doc.get("$set", {})])
        return bulk_write(self, ops, *args, **kwargs)

    monkeypatch.setattr(fo.Dataset, "set_values", failing)
    monkeypatch.setattr(fo.Dataset, "_bulk_write", failing_bulk)
    with pytest.raises(RuntimeError, match="went away"):
        _run(digits, targets, pred_field="kept", k=7, **CASES[case])
    monkeypatch.undo()
    digits.reload()
    assert targets.values("kept") == before
    assert records.get(digits, records.RUNS, "kept") == record
    assert not [
        f for f in digits.get_field_schema() if f.startswith(TMP_PREFIX)
    ]
    assert records.read(digits, records.PENDING) == {}


@pytest.mark.parametrize("case", list(CASES))
def test_min_confidence_accepted_and_review_agree(digits, case):
    targets = digits.match_tags("test")
    out = _run(
        digits,
        targets,
        pred_field="checked",
        min_confidence=0.6,
        **CASES[case],
    )
    ids, preds, tags = targets.values(["id", "checked", "tags"])
    review = {
        s for s, t in zip(ids, tags, strict=True) if constants.REVIEW_TAG in t
    }
    threshold = out.accept_threshold
    for sid, pred in zip(ids, preds, strict=True):
        if pred is None:
            assert sid in review  # below min_confidence: no label, review
            continue
        assert pred.confidence >= 0.6
        if threshold is None:
            assert not pred.has_field("accepted")
            assert sid not in review
        else:
            raw = (
                pred["raw_confidence"]
                if pred.has_field("raw_confidence")
                else pred.confidence
            )
            assert pred["accepted"] == (raw >= threshold)
            assert (sid in review) == (not pred["accepted"])
    assert out.num_review == len(review)
    assert out.num_labeled == sum(p is not None for p in preds)
    if threshold is not None:
        accepted = sum(bool(p and p["accepted"]) for p in preds)
        assert out.num_accepted == accepted
        assert out.coverage == pytest.approx(accepted / len(ids))


@pytest.mark.parametrize("case", list(CASES))
def test_the_run_record_says_how_the_field_was_made(digits, case):
    targets = digits.match_tags("test")
    kwargs = CASES[case]
    out = _run(digits, targets, pred_field="recorded", **kwargs)
    run = records.get(digits, records.RUNS, "recorded")
    assert run["brain_key"] == out.brain_key
    assert run["k"] == K and run["reference"] == "train"
    assert run["vote"] == kwargs.get("vote", "majority")
    assert run["classes"] == out.classes
    assert run["mode"] == kwargs.get("mode", "knn")
    calibrated = kwargs.get("calibrate", False) or kwargs.get("mode") == (
        "adapted"
    )
    assert run["calibrate"] == calibrated
    if case in ("knn", "weighted"):
        assert "expected_curve" not in run
        return
    assert run["target_precision"] == kwargs.get("target_precision")
    assert run["accept_threshold"] == pytest.approx(out.accept_threshold) or (
        out.accept_threshold is None
    )
    assert run["expected_curve"]["coverage"]
    assert (run["calibrator"] is not None) == calibrated
    if "propagate" in kwargs:
        assert run["propagation"] == out.propagation
    if kwargs.get("mode") == "adapted":
        assert run["accept_score"] == out.accept_score
        assert out.brain_key == "inv_adapted"


def _mtimes(view) -> dict:
    ids, times = view.values(["id", "last_modified_at"])
    return dict(zip(ids, times, strict=True))


def test_samples_not_written_keep_their_modification_time(digits):
    """Moving the staged field into place touches only the samples written
    (and those whose old value goes): the others keep last_modified_at,
    and the temporary field leaves nothing behind, in this process's
    schema or in the database's."""
    from fiftyone.core.odm import get_db_conn

    targets = digits.match_tags("test")
    others = digits.match_tags("train")
    _run(digits, targets, pred_field="mtime")
    before = _mtimes(others)
    written = _mtimes(targets)
    _run(digits, targets, pred_field="mtime", overwrite=True)
    assert _mtimes(others) == before
    after = _mtimes(targets)
    assert all(after[sid] > written[sid] for sid in written)
    assert not [f for f in digits.get_field_schema() if TMP_PREFIX in f]
    doc = get_db_conn().datasets.find_one({"_id": digits._doc.id})
    names = [f["name"] for f in doc["sample_fields"]]
    assert "mtime" in names
    assert not [n for n in names if n.startswith(TMP_PREFIX)]
    assert not [k for k in digits.list_indexes() if TMP_PREFIX in str(k)]
    reloaded = fo.load_dataset(digits.name)
    reloaded.reload()
    assert "mtime" in reloaded.get_field_schema()
    assert reloaded.count_values("mtime.label") == digits.count_values(
        "mtime.label"
    )
