"""The per-point results written raw read back as the same
Classifications FiftyOne would have written."""

import fiftyone as fo
import numpy as np
import pytest

from prelabel.units import Samples, classification_doc


@pytest.fixture
def dataset():
    ds = fo.Dataset()
    ds.add_samples([fo.Sample(filepath=f"/tmp/rw{i}.png") for i in range(4)])
    yield ds
    ds.delete()


def _attrs(i):
    return dict(
        label=f"c{i}",
        confidence=0.5 + i / 10,
        logits=np.log(np.array([0.2, 0.8], dtype=np.float32)),
        votes={"c0": 3, f"c{i}": 12},
        neighbors=[f"{j:024x}" for j in range(3)],
        accepted=bool(i % 2),
    )


def test_written_results_equal_fiftyones_classifications(dataset):
    ids = dataset.values("id")
    values = {sid: _attrs(i) for i, sid in enumerate(ids[:3])}
    values[ids[3]] = None
    before = dataset.values("last_modified_at")
    writer = Samples().writer(dataset, "pred", ids)
    writer.write(values)
    writer.close()
    field = dataset.get_field("pred")
    assert field.document_type is fo.Classification
    got = dataset.values("pred")
    for i, label in enumerate(got[:3]):
        want = fo.Classification(**_attrs(i))
        assert isinstance(label, fo.Classification)
        for name, value in want.iter_fields():
            if name == "id":
                continue
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(label[name], value)
            else:
                assert label[name] == value, name
    assert got[3] is None
    assert len(set(label.id for label in got[:3])) == 3
    after = dataset.values("last_modified_at")
    assert all(a > b for a, b in zip(after, before, strict=True))
    # the App's filters see the label
    assert dataset.count_values("pred.label") == {
        "c0": 1,
        "c1": 1,
        "c2": 1,
        None: 1,
    }


def test_a_loaded_sample_sees_the_write(dataset):
    sample = dataset.first()
    assert sample.has_field("pred") is False or sample["pred"] is None
    Samples().writer(dataset, "pred", [sample.id]).write(
        {sample.id: _attrs(1)}
    )
    assert sample.pred.label == "c1"


def test_classification_doc_of_none():
    assert classification_doc(None) is None
