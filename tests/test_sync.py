"""Keeping an index in step with a real FiftyOne dataset (real MongoDB):
incremental syncs, bad inputs, brain runs, and a sync killed half way by
SIGKILL in another process and finished by the next one."""

import copy
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import fiftyone as fo
import fiftyone.brain as fob
import numpy as np
import pytest
from bson import ObjectId

import prelabel
from prelabel.index import base
from prelabel.index.edge import EdgeIndex
from prelabel.index.server import ServerIndex, connect
from prelabel.index.sync import sync_points

DIM = 16


def _sample(rng, label="a", tags=(), dim=DIM, embedding=True):
    return fo.Sample(
        filepath=f"/nonexistent/{uuid.uuid4().hex}.png",
        ground_truth=fo.Classification(label=label) if label else None,
        tags=list(tags),
        embeddings=rng.normal(size=dim) if embedding else None,
    )


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def dataset(rng):
    ds = fo.Dataset(f"prelabel-sync-{uuid.uuid4().hex[:8]}")
    ds.add_samples(
        [
            _sample(rng, label="abc"[i % 3], tags=[("train", "test")[i % 2]])
            for i in range(40)
        ],
        progress=False,
    )
    yield ds
    if fo.dataset_exists(ds.name):
        ds.delete()


@pytest.fixture(params=["edge", "server"])
def index(request, tmp_path):
    if request.param == "edge":
        return EdgeIndex(str(tmp_path / "index"))
    return ServerIndex(connect(":memory:"), "c")


def dataset_state(samples, label_field="ground_truth"):
    """What the index should hold: sample id -> (label, tags, vdigest)."""
    ids, vectors, labels, tags = samples.values(
        ["id", "embeddings", f"{label_field}.label", "tags"]
    )
    return {
        s: (lbl, sorted(t), base.vector_digest(v))
        for s, v, lbl, t in zip(ids, vectors, labels, tags, strict=True)
        if v is not None
    }


def index_state(index, batch_size=7):
    """What the index holds, checking each payload is self-consistent
    (small batches by default, so that paging is exercised too)."""
    keys = [
        base.SAMPLE_ID,
        base.LABEL,
        base.TAGS,
        base.VECTOR_DIGEST,
        base.PAYLOAD_DIGEST,
    ]
    state = {}
    for s, p in index.iter_payloads(keys, batch_size=batch_size):
        assert s not in state, f"{s} is in the index twice"
        assert p[base.SAMPLE_ID] == s
        # Qdrant drops a key that set_payload sets to None: no key = None
        label = p.get(base.LABEL)
        assert p[base.PAYLOAD_DIGEST] == base.payload_digest(
            label, p[base.TAGS]
        )
        state[s] = (label, p[base.TAGS], p[base.VECTOR_DIGEST])
    return state


def stats_of(stats):
    return {
        "added": stats.added,
        "updated_vectors": stats.updated_vectors,
        "updated_payloads": stats.updated_payloads,
        "deleted": stats.deleted,
        "unchanged": stats.unchanged,
        "skipped": stats.skipped,
    }


def counts(**kwargs):
    out = dict.fromkeys(
        [
            "added",
            "updated_vectors",
            "updated_payloads",
            "deleted",
            "unchanged",
            "skipped",
        ],
        0,
    )
    out.update(kwargs)
    return out


def sync(index, samples, label_field="ground_truth", **kwargs):
    return sync_points(
        index, samples, "embeddings", label_field, progress=False, **kwargs
    )


def test_incremental_sync(index, dataset, rng):
    fractions = []
    stats = sync_points(
        index,
        dataset,
        "embeddings",
        "ground_truth",
        batch_size=16,
        progress=lambda f, label: fractions.append(f),
    )
    assert stats_of(stats) == counts(added=40)
    assert stats.sent == 40
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert index.dim == DIM
    assert index_state(index) == dataset_state(dataset)

    stats = sync(index, dataset, batch_size=16)
    assert stats_of(stats) == counts(unchanged=40)
    assert stats.sent == 0

    ids = dataset.values("id")
    # 5 new samples, and one without an embedding
    dataset.add_samples(
        [_sample(rng, label="d") for _ in range(5)]
        + [_sample(rng, embedding=False)],
        progress=False,
    )
    # 4 deleted
    dataset.delete_samples(ids[:4])
    # 1 new vector; 1 new vector and a new label (still one vector update)
    for sid in ids[4:6]:
        sample = dataset[sid]
        sample.embeddings = rng.normal(size=DIM)
        if sid == ids[5]:
            sample.ground_truth.label = "z"
        sample.save()
    # 3 relabeled (one loses its label), 2 re-tagged, 1 both
    for sid, label in zip(ids[6:9], ["z", "z", None], strict=True):
        sample = dataset[sid]
        sample.ground_truth = fo.Classification(label=label) if label else None
        sample.save()
    dataset.select(ids[9:11]).tag_samples("reviewed")
    dataset.select(ids[11:12]).untag_samples(["train", "test"])
    sample = dataset[ids[12]]
    sample.ground_truth.label = "y"
    sample.tags = ["x", "a"]
    sample.save()
    # 1 loses its embedding: skipped, and its point removed
    sample = dataset[ids[13]]
    sample.embeddings = None
    sample.save()

    stats = sync(index, dataset, batch_size=16)
    assert stats_of(stats) == counts(
        added=5,
        updated_vectors=2,
        updated_payloads=7,
        deleted=5,
        unchanged=40 - 4 - 2 - 7 - 1,
        skipped=2,
    )
    state = index_state(index)
    assert state == dataset_state(dataset)
    assert len(state) == len(dataset) - 2
    assert state[ids[8]][0] is None
    assert state[ids[12]][:2] == ("y", ["a", "x"])
    assert ids[13] not in state

    stats = sync(index, dataset)
    assert stats_of(stats) == counts(unchanged=len(dataset) - 2, skipped=2)

    # what was synced answers queries: each sample finds itself first
    some = dataset.exists("embeddings").limit(5)
    res = index.query(np.stack(some.values("embeddings")), 3)
    assert [row[0] for row in res.sample_ids] == some.values("id")
    assert [row[0] for row in res.labels] == some.values("ground_truth.label")


def test_sync_of_a_view_mirrors_the_view(dataset, tmp_path):
    index = EdgeIndex(str(tmp_path / "index"))
    train = dataset.match_tags("train")
    assert stats_of(sync(index, train)) == counts(added=20)
    assert set(index_state(index)) == set(train.values("id"))
    stats = sync(index, dataset)
    assert stats_of(stats) == counts(added=20, unchanged=20)
    # a narrower view deletes the points outside it
    stats = sync(index, dataset.match_tags("test"))
    assert stats_of(stats) == counts(deleted=20, unchanged=20)


def test_sync_without_label_field(dataset):
    index = ServerIndex(connect(":memory:"), "c")
    stats = sync(index, dataset, label_field=None)
    assert stats.added == 40
    assert {p[0] for p in index_state(index).values()} == {None}
    assert index.count(base.IndexFilter(labeled=True)) == 0


def test_dimension_change_raises_and_leaves_the_index(dataset, tmp_path, rng):
    index = EdgeIndex(str(tmp_path / "index"))
    sync(index, dataset)
    before = index_state(index)
    dataset.set_values(
        "embeddings", list(rng.normal(size=(len(dataset), DIM + 8)))
    )
    with pytest.raises(ValueError, match=r"holds 24-d vectors .* 16-d"):
        sync(index, dataset)
    again = EdgeIndex(index.path)
    assert again.dim == DIM
    assert index_state(again) == before


@pytest.mark.parametrize("batch_size", [2000, 7])
def test_mixed_dimensions_raise(dataset, tmp_path, rng, batch_size):
    """One chunk is read in a thread, several in a forked process: the
    error names the sample either way."""
    index = EdgeIndex(str(tmp_path / "index"))
    sample = dataset.last()
    sample.embeddings = rng.normal(size=DIM + 1)
    sample.save()
    with pytest.raises(ValueError, match="17-d embedding .* recompute"):
        sync(index, dataset, batch_size=batch_size)


def test_bad_fields_raise_before_writing(dataset, tmp_path):
    index = EdgeIndex(str(tmp_path / "index"))
    dataset.set_values("note", ["x"] * len(dataset))
    dataset.set_values(
        "boxes",
        [fo.Detections(detections=[fo.Detection(label="a")])] * len(dataset),
    )
    with pytest.raises(ValueError, match="'note' holds StringField, not"):
        sync(index, dataset, label_field="note")
    with pytest.raises(ValueError, match="'boxes' holds Detections, not"):
        sync(index, dataset, label_field="boxes")
    with pytest.raises(ValueError, match="'nope' does not exist"):
        sync(index, dataset, label_field="nope")
    with pytest.raises(ValueError, match="not an embeddings"):
        sync_points(index, dataset, "note", "ground_truth", progress=False)
    dataset.add_sample_field("empty_vectors", fo.VectorField)
    with pytest.raises(ValueError, match="is empty"):
        sync_points(
            index, dataset, "empty_vectors", "ground_truth", progress=False
        )
    assert not index.exists()
    assert not os.path.exists(index.path)


def test_sync_index_brain_runs(dataset, tmp_path):
    path = str(tmp_path / "index")
    results = prelabel.sync_index(
        dataset, brain_key="knn", path=path, progress=False
    )
    assert results.last_sync.added == 40
    assert results.index.count() == 40
    assert "knn" in dataset.list_brain_runs()

    # a second call loads the run and sends nothing
    results = prelabel.sync_index(dataset, brain_key="knn", progress=False)
    assert stats_of(results.last_sync) == counts(unchanged=40)
    assert results.index.name == path
    loaded = dataset.load_brain_results("knn")
    assert loaded.config.path == path
    assert loaded.total_index_size == 40

    dataset.clone_sample_field("embeddings", "other_embeddings")
    with pytest.raises(ValueError, match="indexes 'embeddings', not 'other"):
        prelabel.sync_index(
            dataset,
            embeddings_field="other_embeddings",
            brain_key="knn",
            progress=False,
        )
    dataset.clone_sample_field("ground_truth", "other_labels")
    with pytest.raises(ValueError, match="stores labels of 'ground_truth'"):
        prelabel.sync_index(
            dataset, label_field="other_labels", brain_key="knn"
        )
    fob.compute_similarity(
        dataset, embeddings="embeddings", backend="sklearn", brain_key="skl"
    )
    with pytest.raises(ValueError, match="run of another backend"):
        prelabel.sync_index(dataset, brain_key="skl", progress=False)
    with pytest.raises(ValueError, match="not a valid name"):
        prelabel.sync_index(dataset, brain_key="1 bad", progress=False)
    # a new embeddings field of another size under the same key
    dataset.set_values(
        "embeddings",
        list(np.random.default_rng(1).normal(size=(len(dataset), 8))),
    )
    with pytest.raises(ValueError, match="8-d vectors"):
        prelabel.sync_index(dataset, brain_key="knn", progress=False)
    # nothing above touched the index
    assert EdgeIndex(path).count() == 40
    assert EdgeIndex(path).dim == DIM


# ---- killed half way ------------------------------------------------------


def _big_dataset(n, dim, seed=0):
    """A dataset of ``n`` samples with labels and embeddings, and the
    embeddings (row ``i`` is sample ``/nonexistent/<i>.png``).

    The first sample goes through FiftyOne; the others are copies of its
    document inserted in one go (FiftyOne's ``add_samples`` takes ~10 s for
    20k samples on two cores, this takes ~1 s), so they are ordinary
    FiftyOne samples in the real database.
    """
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    ds = fo.Dataset(f"prelabel-kill-{uuid.uuid4().hex[:8]}")
    ds.add_sample(
        fo.Sample(
            filepath="/nonexistent/0.png",
            ground_truth=fo.Classification(label="0"),
            tags=["train"],
            embeddings=vectors[0],
        )
    )
    template = ds._sample_collection.find_one()
    field = ds.get_field("embeddings")
    docs = []
    for i in range(1, n):
        doc = copy.copy(template)
        doc["_id"] = ObjectId()
        doc["filepath"] = f"/nonexistent/{i}.png"
        doc["tags"] = [("train", "test")[i % 2]]
        doc["_rand"] = float(rng.random())
        doc["ground_truth"] = {
            **template["ground_truth"],
            "_id": ObjectId(),
            "label": str(i % 10),
        }
        doc["embeddings"] = field.to_mongo(vectors[i])
        docs.append(doc)
    ds._sample_collection.insert_many(docs, ordered=False)
    assert len(ds) == n
    return ds, vectors


def _child(code, *args, tmp_path):
    """Starts ``python -c code args`` against the same database and home."""
    env = {
        **os.environ,
        "FIFTYONE_DO_NOT_TRACK": "true",
        "FIFTYONE_DATABASE_NAME": fo.config.database_name,
        "PRELABEL_HOME": os.environ["PRELABEL_HOME"],
    }
    log = open(tmp_path / f"child-{uuid.uuid4().hex[:6]}.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    return proc, log


def _wait_for_points(proc, log, path, at_least, timeout=90.0):
    """Polls the index (as another process would) until it holds points."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(
                f"the child exited ({proc.returncode}) before it was "
                f"killed:\n{log.read()}"
            )
        if os.path.exists(os.path.join(path, "index.json")):
            count = EdgeIndex(path).count()
            if count >= at_least:
                return count
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the child wrote nothing in time")


def _kill(proc):
    assert proc.poll() is None, "the child finished before it was killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _check_complete(index, ds, vectors):
    """The index holds each sample once, with the right digests."""
    assert index.count() == len(ds)
    state = index_state(index, batch_size=5000)
    ids, paths, labels, tags = ds.values(
        ["id", "filepath", "ground_truth.label", "tags"]
    )
    # the vectors as built, in the order of ``ids``
    vectors = vectors[[int(os.path.basename(p)[:-4]) for p in paths]]
    assert len(state) == len(ds) and set(state) == set(ids)
    for s, v, lbl, t in zip(ids, vectors, labels, tags, strict=True):
        assert state[s] == (lbl, sorted(t), base.vector_digest(v))
    res = index.query(vectors[:20], 5)
    assert [row[0] for row in res.sample_ids] == ids[:20]
    assert [row[0] for row in res.labels] == labels[:20]


def test_big_sync_builds_its_graph_in_parts(tmp_path, monkeypatch):
    """A sync writing more than ``PART_POINTS`` points builds the graph of
    each part as it goes and closes the shard after each (its pages
    handed back), so the index holds several built segments of at most a
    part each; every point is there and the nearest neighbors are the
    exact ones."""
    monkeypatch.setattr(base, "PART_POINTS", 1000)
    monkeypatch.setenv("PRELABEL_INDEX_LINGER", "60")  # closes by itself
    # a part of 1,000 x 4,096 floats (16 MB) is over the engine's
    # indexing threshold (10 MB): smaller segments are never built
    n = 3500
    ds, vectors = _big_dataset(n, 4096)
    try:
        index = EdgeIndex(str(tmp_path / "index"))
        builds, closes = [], []
        real_optimize, real_close = EdgeIndex.optimize, EdgeIndex.close
        monkeypatch.setattr(
            EdgeIndex,
            "optimize",
            lambda self: builds.append(self.count()) or real_optimize(self),
        )
        monkeypatch.setattr(
            EdgeIndex,
            "close",
            lambda self: closes.append(1) or real_close(self),
        )
        stats = sync_points(
            index, ds, "embeddings", "ground_truth", batch_size=500
        )
        assert stats_of(stats) == counts(added=n)
        assert builds == [1000, 2000, 3000, n]  # three parts, the rest
        assert len(closes) == 3
        with index.session() as shard:
            info = shard.info()
        assert info.points_count == n
        # three parts built and kept apart (not merged into one), the
        # rest (under the threshold) in the appendable segment
        assert info.indexed_vectors_count >= 3000
        assert info.segments_count >= 4
        _check_complete(index, ds, vectors)
        # every part is searched: points of each find themselves first,
        # and their neighbors are the exact ones (int8 scores reorder
        # near-ties of random 4,096-d vectors: recall, not order)
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        ids, paths = ds.values(["id", "filepath"])
        row_id = {
            int(os.path.basename(p)[:-4]): s
            for s, p in zip(ids, paths, strict=True)
        }
        rows = np.arange(0, n, 70)
        exact = np.argsort(-(unit[rows] @ unit.T), axis=1)[:, :10]
        res = index.query(vectors[rows], 10)
        hits = 0
        for r, want, found in zip(rows, exact, res.sample_ids, strict=True):
            assert found[0] == row_id[r]
            hits += len({row_id[w] for w in want} & set(found))
        assert hits / (10 * len(rows)) >= 0.9
    finally:
        ds.delete()


@pytest.mark.slow
def test_sync_killed_half_way_is_finished_by_the_next(tmp_path):
    """A ``sync_index`` of 20k points SIGKILLed in another process, mid-way
    (its progress callback pauses after each batch of 2,000, so the sync
    outlasts the 2 s lease on the index however fast the machine writes):
    no run is registered (a first sync registers its run only when
    complete), and the next ``sync_index`` of that key takes the unfinished
    index over and sends only what is missing."""
    n = 20000
    ds, vectors = _big_dataset(n, 64)
    path = str(tmp_path / "index")
    proc = log = None
    try:
        proc, log = _child(
            """
            import sys
            import time
            import fiftyone as fo
            import prelabel

            ds = fo.load_dataset(sys.argv[1])
            prelabel.sync_index(
                ds, path=sys.argv[2], progress=lambda *_: time.sleep(0.4)
            )
            """,
            ds.name,
            path,
            tmp_path=tmp_path,
        )
        # we hold no lock: the child is somewhere in reading the next
        # chunk, upserting or flushing when it dies
        _wait_for_points(proc, log, path, at_least=2000)
        _kill(proc)

        done = EdgeIndex(path).count()
        assert 2000 <= done < n
        ds.reload()
        assert "prelabel_qdrant" not in ds.list_brain_runs()
        assert EdgeIndex(path).meta["complete"] is False

        results = prelabel.sync_index(ds, path=path, progress=False)
        assert results.config.path == path
        assert stats_of(results.last_sync) == counts(
            added=n - done, unchanged=done
        )
        _check_complete(results.index, ds, vectors)
        assert EdgeIndex(path).meta["complete"] is True
        loaded = ds.load_brain_results("prelabel_qdrant")
        assert loaded.total_index_size == n
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if log is not None:
            log.close()
        ds.delete()
