"""Nothing a user owns is lost: bad inputs, kills and damaged files.

One block per way of losing data that a careful user found (the numbers
are those of the "Nothing lost" issue), each on real FiftyOne datasets in
the real MongoDB, a real Qdrant Edge index on disk, and real child
processes killed with SIGKILL:

1. a ``path=`` that names a user's folder;
2. a cloned dataset and its original's index;
3. human labels in fields prelabel did not write;
4. (compute_embeddings: ``test_embeddings.py``, ``test_embeddings_faults.py``);
5. damaged index files;
6. half-made state after a failure or a kill;
7. messages that name the parameter.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from datetime import datetime

import fiftyone as fo
import numpy as np
import pytest
from sklearn.datasets import load_digits

import prelabel
from prelabel import panel_data, records
from prelabel.fields import TMP_PREFIX
from prelabel.index import base, ownership
from prelabel.index.base import IndexDamagedError, IndexUnreachableError
from prelabel.index.edge import EdgeIndex

K = 5


def _digits(n=300, num_train=150, seed=0, extra=None):
    """Real digits (sklearn's 8x8 scans; the 64 pixels as embeddings),
    ``ground_truth`` labels, ``train`` / ``test`` tags."""
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.data))[:n]
    dataset = fo.Dataset(f"prelabel-lost-{uuid.uuid4().hex[:8]}")
    samples = []
    for rank, i in enumerate(order):
        fields = dict(
            filepath=f"/nonexistent/lost/{i:04d}.png",
            embeddings=digits.data[i].astype(np.float32),
            ground_truth=fo.Classification(label=str(digits.target[i])),
            tags=["train" if rank < num_train else "test"],
        )
        fields.update(extra(rank, i) if extra else {})
        samples.append(fo.Sample(**fields))
    dataset.add_samples(samples, progress=False)
    return dataset


@pytest.fixture
def digits():
    dataset = _digits()
    yield dataset
    if fo.dataset_exists(dataset.name):
        dataset.delete()


def _labels(samples, field):
    ids, labels, confs = samples.values(
        ["id", f"{field}.label", f"{field}.confidence"]
    )
    return dict(zip(ids, zip(labels, confs, strict=True), strict=True))


def _preannotate(dataset, index="k", **kwargs):
    kwargs = {"reference": "train", "k": K, "progress": False, **kwargs}
    return prelabel.preannotate(dataset.match_tags("test"), index, **kwargs)


def _child(code, *args, timeout=180):
    """Runs ``python -c code args`` against the same database and home."""
    env = {
        **os.environ,
        "FIFTYONE_DATABASE_NAME": fo.config.database_name,
        "PRELABEL_HOME": os.environ["PRELABEL_HOME"],
    }
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _schema(dataset):
    dataset.reload()
    return sorted(dataset.get_field_schema())


def _no_leftovers(dataset):
    dataset.reload()
    assert not [f for f in _schema(dataset) if f.startswith(TMP_PREFIX)]
    assert records.read(dataset, records.PENDING) == {}


# ---- 1. a path= that names a user's folder ------------------------------


def test_a_folder_with_files_is_refused_and_its_files_survive(
    digits, tmp_path
):
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "precious.txt").write_text("mine")
    with pytest.raises(ValueError, match="path=.*holds other files"):
        prelabel.sync_index(digits, brain_key="k", path=str(decoy))
    assert (decoy / "precious.txt").read_text() == "mine"
    assert sorted(os.listdir(decoy)) == ["precious.txt"]
    assert "k" not in digits.list_brain_runs()


@pytest.mark.parametrize("path", ["", "   ", "."])
def test_an_empty_or_current_folder_path_is_refused(
    digits, tmp_path, monkeypatch, path
):
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "notebook.ipynb").write_text("{}")
    monkeypatch.chdir(cwd)
    with pytest.raises(ValueError, match="path="):
        prelabel.sync_index(digits, brain_key="k", path=path)
    assert sorted(os.listdir(cwd)) == ["notebook.ipynb"]
    assert digits.list_brain_runs() == []


def test_a_relative_path_is_stored_absolute_and_an_empty_folder_is_used(
    digits, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "idx").mkdir()
    results = prelabel.sync_index(
        digits, brain_key="k", path="idx", progress=False
    )
    stored = digits.get_brain_info("k").config.path
    assert stored == str(tmp_path / "idx") == results.config.path
    monkeypatch.chdir("/")
    loaded = digits.load_brain_results("k", cache=False)
    assert loaded.total_index_size == len(digits)


def test_deleting_a_run_never_deletes_a_folder_that_is_not_its_index(
    digits, tmp_path
):
    """The run document is tampered with (as a run synced with ``path=""``
    by an older prelabel would be): it names the user's folder, or the
    index of another run. Deleting the run leaves both as they were."""
    prelabel.sync_index(digits, brain_key="k", progress=False)
    other = prelabel.sync_index(digits, brain_key="other", progress=False)
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "precious.txt").write_text("mine")
    (decoy / "shard").mkdir()  # even a folder named like ours
    for target in (str(decoy), other.config.path):
        run_doc = digits._doc.brain_methods["k"]
        run_doc.config["path"] = target
        run_doc.save()
        digits.reload()
        digits.delete_brain_run("k")
        prelabel.sync_index(digits, brain_key="k", progress=False)
    assert (decoy / "precious.txt").read_text() == "mine"
    assert (decoy / "shard").is_dir()
    assert digits.load_brain_results("other").total_index_size == len(digits)


# ---- 2. a clone and its original's index ---------------------------------


def _points(results):
    return {
        sid: p[base.LABEL]
        for sid, p in results.index.iter_payloads([base.LABEL])
    }


def test_a_clone_gets_its_own_index_and_never_touches_the_original(digits):
    original = prelabel.sync_index(digits, brain_key="k", progress=False)
    _preannotate(digits, pred_field="before")
    before_points = _points(original)
    before_labels = _labels(digits, "before")

    clone = digits.clone()
    try:
        # the clone relabels and loses samples, then syncs
        test_ids = clone.match_tags("train").limit(40).values("id")
        clone.select(test_ids).set_field("ground_truth.label", "0").save()
        clone.delete_samples(clone.match_tags("test").limit(30))
        mine = prelabel.sync_index(clone, brain_key="k", progress=False)
        assert mine.config.path != original.config.path
        assert mine.config.dataset_id == str(clone._doc.id)
        assert mine.total_index_size == len(clone)
        assert mine.last_sync.updated_payloads > 0

        # the original's index is exactly as it was, and votes the same
        again = digits.load_brain_results("k", cache=False)
        assert _points(again) == before_points
        _preannotate(digits, pred_field="after")
        assert _labels(digits, "after") == before_labels

        # deleting the clone's run (and the clone) keeps the original's
        clone.delete_brain_run("k")
        assert not os.path.exists(mine.config.path)
        assert os.path.isdir(original.config.path)
        assert digits.load_brain_results("k").total_index_size == len(digits)
    finally:
        clone.delete()


def test_deleting_a_clone_that_never_loaded_its_run_keeps_the_original(
    digits,
):
    original = prelabel.sync_index(digits, brain_key="k", progress=False)
    clone = digits.clone()
    clone.delete_brain_run("k")  # its run document names the original's
    clone.delete()
    assert EdgeIndex(original.config.path).count() == len(digits)
    prelabel.delete_orphans()
    assert EdgeIndex(original.config.path).count() == len(digits)


def test_a_clone_whose_original_index_is_gone_is_synced_anew(digits):
    prelabel.sync_index(digits, brain_key="k", progress=False)
    clone = digits.clone()
    try:
        digits.delete_brain_run("k")
        results = clone.load_brain_results("k")
        assert results.total_index_size == len(clone)
        got = _preannotate(clone, index=results, pred_field="p")
        assert got.num_labeled == len(clone.match_tags("test"))
    finally:
        clone.delete()


def test_a_clone_of_a_server_run_gets_its_own_collection(digits, monkeypatch):
    """The same on the server path, with one in-memory qdrant-client
    standing in for the server."""
    from qdrant_client import QdrantClient

    import prelabel.index.server as pis

    shared = QdrantClient(location=":memory:")
    monkeypatch.setattr(pis, "connect", lambda url=None, **kw: shared)
    url = "http://qdrant.invalid:6333"
    original = prelabel.sync_index(
        digits, brain_key="k", url=url, progress=False
    )
    name = original.config.collection_name
    meta = shared.get_collection(name).config.metadata["prelabel"]
    assert meta["dataset_id"] == str(digits._doc.id)
    clone = digits.clone()
    try:
        mine = clone.load_brain_results("k", url=url)
        assert mine.config.collection_name != name
        assert mine.total_index_size == len(clone)
        clone.delete_brain_run("k")
        assert not shared.collection_exists(mine.config.collection_name)
        assert shared.count(name).count == len(digits)
    finally:
        clone.delete()


# ---- 3. human labels in other fields -------------------------------------


def test_a_reviewed_field_is_never_overwritten_without_overwrite(digits):
    prelabel.sync_index(digits, brain_key="k", progress=False)
    reviewed = {
        sid: fo.Classification(label="reviewed")
        for sid in digits.match_tags("test").values("id")
    }
    digits.set_values("gt_reviewed", reviewed, key_field="id")
    with pytest.raises(
        ValueError, match="pred_field='gt_reviewed'.*overwrite"
    ):
        _preannotate(digits, pred_field="gt_reviewed")
    assert set(digits.distinct("gt_reviewed.label")) == {"reviewed"}

    # prelabel's own field is replaced on a re-run; a person's only when
    # the caller says so
    _preannotate(digits, pred_field="prelabel")
    _preannotate(digits, pred_field="prelabel", k=7)
    _preannotate(digits, pred_field="gt_reviewed", overwrite=True)
    assert "reviewed" not in digits.distinct("gt_reviewed.label")


def test_label_mistakes_never_overwrite_pre_labels_or_labels(digits):
    prelabel.sync_index(digits, brain_key="k", progress=False)
    _preannotate(digits, pred_field="prelabel")
    before = _labels(digits, "prelabel")
    for kwargs, match in (
        ({"neighbors_field": "prelabel"}, "neighbors_field='prelabel'"),
        ({"score_field": "ground_truth"}, "score_field='ground_truth'"),
        ({"neighbors_field": "ground_truth"}, "would overwrite"),
    ):
        with pytest.raises(ValueError, match=match):
            prelabel.find_label_mistakes(
                digits, index="k", k=K, progress=False, **kwargs
            )
    assert _labels(digits, "prelabel") == before
    _no_leftovers(digits)


def test_an_empty_reference_or_another_dataset_s_index_is_refused(digits):
    results = prelabel.sync_index(digits, brain_key="k", progress=False)
    other = _digits(n=60, num_train=30, seed=1)
    try:
        foreign = prelabel.sync_index(other, brain_key="k", progress=False)
        for kwargs, match in (
            ({"reference": []}, "reference=\\[\\] selects no sample"),
            ({"reference": ""}, "reference="),
            ({"reference": other.match_tags("train")}, "reference= is a view"),
            ({"index": foreign}, "index= is the index of dataset"),
        ):
            with pytest.raises(ValueError, match=match):
                _preannotate(digits, **{"index": results, **kwargs})
        assert not digits.has_sample_field("prelabel")
    finally:
        other.delete()


# ---- 5. a damaged index ---------------------------------------------------


def _vector_file(index_path):
    segments = os.path.join(index_path, "shard", "segments")
    (segment,) = os.listdir(segments)
    return os.path.join(
        segments, segment, "vector_storage", "vectors", "chunk_0.mmap"
    )


@pytest.mark.parametrize("sample", [None, 20])
def test_random_bytes_in_the_vector_file_are_found_and_repaired(
    digits, monkeypatch, sample
):
    """``sample=20``: the sync reads back only 20 random vectors of the
    300, finds damage among them (64 KB of random bytes hit most of the
    points: missing all of them has a chance under 1e-15) and then checks
    and repairs every point."""
    if sample:
        import prelabel.index.sync as pis

        monkeypatch.setattr(pis, "VERIFY_SAMPLE", sample)
    results = prelabel.sync_index(digits, brain_key="k", progress=False)
    _preannotate(digits, pred_field="before")
    size = 64 * 1024 if sample else 4096
    with open(_vector_file(results.config.path), "r+b") as f:
        f.seek(1024)
        f.write(np.random.default_rng(0).bytes(size))

    health = prelabel.check_index(digits, "k")
    assert not health.ok and "no longer hold" in health.problems[0]
    with pytest.raises(IndexDamagedError, match="rebuild=True"):
        _preannotate(digits, pred_field="after")
    assert not digits.has_sample_field("after")

    repaired = prelabel.sync_index(digits, brain_key="k", progress=False)
    assert repaired.last_sync.repaired >= 10
    assert prelabel.check_index(digits, "k", sample_size=None).ok
    _preannotate(digits, pred_field="after")
    assert _labels(digits, "after") == _labels(digits, "before")


def test_the_check_before_a_job_skips_the_count_but_not_the_damage(digits):
    """A job's quick check (``count=False``) never scans the dataset to
    count its embedded samples; the full check does, and says the index
    is stale."""
    prelabel.sync_index(digits, brain_key="k", progress=False)
    digits.take(5, seed=0).set_field("embeddings", None).save()

    full = prelabel.check_index(digits, "k")
    assert full.ok and full.num_embedded == 295 and full.num_points == 300
    assert any("300 points for 295 embedded" in s for s in full.stale)
    quick = prelabel.check_index(digits, "k", sample_size=64, count=False)
    assert quick.ok and quick.num_embedded is None
    assert quick.num_points == 300 and quick.num_checked == 295
    assert not any("embedded samples" in s for s in quick.stale)


def test_points_to_check_are_drawn_without_sorting_the_dataset(digits):
    from prelabel.units import Samples, take

    picked = take(digits, 20)
    assert [type(s).__name__ for s in picked._stages] == ["Select"]
    ids = picked.values("id")
    assert len(set(ids)) == 20 and set(ids) <= set(digits.values("id"))
    # a view, or a seed, keeps FiftyOne's reproducible take
    view = digits.match_tags("test")
    assert type(take(view, 5)._stages[-1]).__name__ == "Take"
    assert take(digits, 5, seed=1).values("id") == digits.take(
        5, seed=1
    ).values("id")

    # a dataset mostly without vectors: the sample comes from those it has
    digits.match_tags("train").set_field("embeddings", None).save()
    digits.match_tags("test").limit(140).set_field("embeddings", None).save()
    rows = Samples().sample_vectors(digits, "embeddings", 64)
    assert len(rows) == 10 and all(v is not None for _, _, v in rows)


@pytest.mark.parametrize(
    "ftype, kwargs, make",
    [
        (fo.FloatField, {}, float),
        (
            fo.EmbeddedDocumentField,
            {"embedded_doc_type": fo.Classification},
            lambda i: fo.Classification(label=str(i % 10)),
        ),
        (
            fo.EmbeddedDocumentField,
            {"embedded_doc_type": fo.Detections},
            lambda i: fo.Detections(detections=[fo.Detection(label="a")]),
        ),
    ],
)
def test_a_replaced_field_holds_only_what_the_last_job_wrote(
    digits, ftype, kwargs, make
):
    """A job's field replaces the old one whole: a sample it did not write
    loses its old value (labels with ids are found through the
    ``<field>.id`` index a job creates, other values by reading every
    sample)."""
    from prelabel import label_indexes
    from prelabel.fields import staged_fields

    ids = digits.values("id")
    if ftype is fo.EmbeddedDocumentField:
        label_indexes.ensure(digits, ["out"])
    for written in (ids, ids[:10]):
        with staged_fields(digits, {"out": (ftype, kwargs)}) as stage:
            values = {i: make(n) for n, i in enumerate(written)}
            digits.set_values(stage["out"], values, key_field="id")
    coll = digits._sample_collection
    assert coll.count_documents({"out": {"$exists": True}}) == 10
    got = dict(zip(*digits.values(["id", "out"]), strict=True))
    assert [i for i in ids if got[i] is not None] == ids[:10]
    _no_leftovers(digits)


def _garble(path):
    with open(path, "r+b") as f:
        f.write(b"\x00garbled\xff" * 8)


def _damage(index_path, what):
    shard = os.path.join(index_path, "shard")
    if what == "index.json":
        _garble(os.path.join(index_path, "index.json"))
    elif what == "shard config":
        _garble(os.path.join(shard, "edge_config.json"))
    elif what == "wal":
        _garble(os.path.join(shard, "wal", "first-index"))
    elif what == "segment":
        segments = os.path.join(shard, "segments")
        (segment,) = os.listdir(segments)
        _garble(os.path.join(segments, segment, "segment.json"))
    elif what == "shard deleted":
        import shutil

        shutil.rmtree(shard)


@pytest.mark.parametrize(
    "what", ["index.json", "shard config", "wal", "segment", "shard deleted"]
)
def test_a_damaged_index_says_rebuild_and_rebuild_repairs_it(digits, what):
    results = prelabel.sync_index(digits, brain_key="k", progress=False)
    _preannotate(digits, pred_field="before")
    _damage(results.config.path, what)

    assert not prelabel.check_index(digits, "k").ok
    with pytest.raises(IndexDamagedError, match="rebuild=True"):
        _preannotate(digits, pred_field="after")
    with pytest.raises(IndexDamagedError, match="rebuild=True"):
        digits.sort_by_similarity(digits.first().id, k=3, brain_key="k")
    with pytest.raises(IndexDamagedError, match="rebuild=True"):
        prelabel.sync_index(digits, brain_key="k", progress=False)

    rebuilt = prelabel.sync_index(
        digits, brain_key="k", rebuild=True, progress=False
    )
    assert rebuilt.last_sync.added == len(digits)
    assert prelabel.check_index(digits, "k", sample_size=None).ok
    _preannotate(digits, pred_field="after")
    assert _labels(digits, "after") == _labels(digits, "before")


def test_a_deleted_index_folder_is_named_and_synced_again(digits):
    results = prelabel.sync_index(digits, brain_key="k", progress=False)
    import shutil

    shutil.rmtree(results.config.path)
    with pytest.raises(IndexDamagedError, match="missing.*sync_index"):
        _preannotate(digits, pred_field="p")
    again = prelabel.sync_index(digits, brain_key="k", progress=False)
    assert again.last_sync.added == len(digits)
    assert _preannotate(digits, pred_field="p").num_labeled > 0


# ---- 6. half-made state ---------------------------------------------------


def _index_folders(dataset):
    folder = os.path.join(ownership.indexes_root(), str(dataset._doc.id))
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.mark.parametrize("failure", ["nan vector", "unreachable server"])
def test_a_first_sync_that_fails_leaves_no_run_and_no_folder(digits, failure):
    kwargs = {"brain_key": "k", "progress": False}
    if failure == "nan vector":
        bad = digits.skip(100).first()
        bad["embeddings"] = np.full(64, np.nan, dtype=np.float32)
        bad.save()
        match = f"sample {bad.id} has NaN.*embeddings_field='embeddings'"
        error = ValueError
    else:
        kwargs["url"] = "http://127.0.0.1:9"
        match = "Qdrant server at http://127.0.0.1:9 did not answer"
        error = IndexUnreachableError
    with pytest.raises(error, match=match):
        prelabel.sync_index(digits, **kwargs)
    assert digits.list_brain_runs() == []
    assert _index_folders(digits) == []


def test_a_brain_key_too_long_for_a_folder_is_refused(digits):
    with pytest.raises(ValueError, match="brain_key=.*characters"):
        prelabel.sync_index(digits, brain_key="k" * 300, progress=False)
    assert digits.list_brain_runs() == []
    assert _index_folders(digits) == []


_KILL_DURING_WRITES = """
    import os, signal, sys
    import fiftyone as fo
    import prelabel

    ds = fo.load_dataset(sys.argv[1])
    calls = [0]
    bulk_write = fo.Dataset._bulk_write

    def dying(self, ops, *args, **kwargs):
        # the second write of results into the staged field
        if any(f.startswith("prelabel_tmp_")
               for op in ops for f in op._doc.get("$set", {})):
            calls[0] += 1
            if calls[0] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return bulk_write(self, ops, *args, **kwargs)

    fo.Dataset._bulk_write = dying
    prelabel.preannotate(
        ds.match_tags("test"), "k", reference="train", k=7,
        pred_field="prelabel", batch_size=50, progress=False,
    )
"""


def test_a_kill_during_pre_annotation_leaves_the_old_field(digits):
    prelabel.sync_index(digits, brain_key="k", progress=False)
    _preannotate(digits, pred_field="prelabel")
    before = _labels(digits, "prelabel")
    proc = _child(_KILL_DURING_WRITES, digits.name)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    digits.reload()
    assert any(f.startswith(TMP_PREFIX) for f in _schema(digits))
    assert _labels(digits, "prelabel") == before
    # the next write on the dataset (here: an explicit recover) cleans up
    assert prelabel.recover(digits) == ["prelabel"]
    _no_leftovers(digits)
    assert _labels(digits, "prelabel") == before
    _preannotate(digits, pred_field="prelabel", k=7)
    _no_leftovers(digits)


_KILL_IN_SWAP = """
    import os, signal, sys
    import pymongo.collection as pc
    import fiftyone as fo
    import prelabel
    import prelabel.fields as pf

    kill_at = int(sys.argv[2])
    state = {"on": False, "n": 0}

    def counted(name):
        original = getattr(pc.Collection, name)

        def call(self, *args, **kwargs):
            if state["on"]:
                state["n"] += 1
                if state["n"] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return original(self, *args, **kwargs)

        setattr(pc.Collection, name, call)

    for name in (
        "update_one", "update_many", "insert_one", "replace_one",
        "find_one_and_update", "bulk_write", "delete_one", "delete_many",
    ):
        counted(name)
    commit = pf._commit

    def counting_commit(*args, **kwargs):
        state["on"] = True
        return commit(*args, **kwargs)

    pf._commit = counting_commit
    ds = fo.load_dataset(sys.argv[1])
    if sys.argv[3] == "mistakes":
        prelabel.find_label_mistakes(ds, "k", k=7, progress=False)
    else:
        prelabel.preannotate(
            ds.match_tags("test"), "k", reference="train", k=7,
            pred_field="prelabel", progress=False,
        )
    print("WRITES", state["n"])
"""


def _kill_at_every_swap_step(dataset, job: str, reset, check) -> None:
    """Runs ``job`` (k=7) in a child killed before each database write of
    its field swap in turn, each time after ``reset()`` (which writes the
    old field), recovers, and calls ``check(kill_at)`` (which returns
    ``"old"`` or ``"new"``)."""
    done = _child(_KILL_IN_SWAP, dataset.name, 10**9, job)
    assert done.returncode == 0, done.stderr
    writes = int(done.stdout.split("WRITES")[-1])
    assert writes >= 5
    outcomes = []
    for kill_at in range(1, writes + 1):
        reset()
        proc = _child(_KILL_IN_SWAP, dataset.name, kill_at, job)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        dataset.reload()
        prelabel.recover(dataset)
        _no_leftovers(dataset)
        outcomes.append(check(kill_at))
    # early kills keep the old field, later ones end with the new one
    assert outcomes[0] == "old" and outcomes[-1] == "new"


@pytest.mark.slow
def test_a_kill_at_every_step_of_the_field_swap_leaves_a_whole_field(digits):
    """The swap of the staged field into place, killed before each of its
    database writes in turn: the field is always the old one whole or, once
    recovered, the new one whole, with the run record that made it."""
    prelabel.sync_index(digits, brain_key="k", progress=False)
    _preannotate(digits, pred_field="expected_new", k=7)
    new = _labels(digits.match_tags("test"), "expected_new")
    _preannotate(digits, pred_field="prelabel")
    old = _labels(digits.match_tags("test"), "prelabel")
    assert old != new

    def check(kill_at):
        got = _labels(digits.match_tags("test"), "prelabel")
        assert got in (old, new), f"a mixed field after a kill at {kill_at}"
        assert not digits.match_tags("train").exists("prelabel")
        run = records.get(digits, records.RUNS, "prelabel")
        assert run["k"] == (7 if got == new else K)
        return "new" if got == new else "old"

    def reset():
        _preannotate(digits, pred_field="prelabel")

    _kill_at_every_swap_step(digits, "preannotate", reset, check)


@pytest.mark.slow
def test_a_swap_finished_by_a_recovery_keeps_the_time_it_recorded(digits):
    """find_label_mistakes swaps two fields and records when it wrote
    them (what lets the panel read only the samples modified since):
    killed before each write of the swap and recovered with the new
    fields, the scored samples carry exactly the recorded time; either
    way the disagreements read through it are those in the database."""
    prelabel.sync_index(digits, brain_key="k", progress=False)

    def reset():
        prelabel.find_label_mistakes(digits, "k", k=K, progress=False)

    reset()
    source = panel_data.make_source(digits, "suspicious")

    def check(kill_at):
        rec = records.get(digits, records.MISTAKES, "mistake_score")
        outcome = "new" if rec["k"] == 7 else "old"
        if outcome == "new":
            stamp = datetime.fromisoformat(rec["scored_at"])
            assert set(digits.values("last_modified_at")) == {stamp}, kill_at
        # (a job killed before its swap wrote its temporary fields on every
        # sample: all of them count as modified since the old run's time)
        ids, gt, major = digits.values(
            ["id", "ground_truth.label", "mistake_score_label.label"]
        )
        wrong = {
            i for i, g, m in zip(ids, gt, major, strict=True) if m and g != m
        }
        view = panel_data.mistakes_view(digits, source)
        assert set(view.values("id")) == wrong, kill_at
        return outcome

    _kill_at_every_swap_step(digits, "mistakes", reset, check)


_FIRST_SYNC = """
    import sys
    import fiftyone as fo
    import prelabel

    ds = fo.load_dataset(sys.argv[1])
    res = prelabel.sync_index(ds, brain_key="race", progress=False)
    print("DONE", res.config.path, res.last_sync.added)
"""


def test_two_first_syncs_of_one_key_at_once_end_with_one_index(digits):
    env = {
        **os.environ,
        "FIFTYONE_DATABASE_NAME": fo.config.database_name,
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_FIRST_SYNC), digits.name],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    paths = {out.split()[1] for out, _ in outs}
    assert len(paths) == 1
    digits.reload()
    assert digits.list_brain_runs() == ["race"]
    assert _index_folders(digits) == ["race"]
    assert digits.load_brain_results("race").total_index_size == len(digits)


def test_a_deleted_dataset_leaves_no_index_folder(digits, tmp_path):
    results = prelabel.sync_index(digits, brain_key="k", progress=False)
    prelabel.adapt_embeddings(
        digits, reference="train", out_field="emb_adapted", progress=False
    )
    folder = results.config.path
    adapters = os.path.dirname(
        records.get(digits, records.ADAPTERS, "emb_adapted")["path"]
    )
    keep = _digits(n=40, num_train=20, seed=3)
    try:
        kept = prelabel.sync_index(keep, brain_key="k", progress=False)
        fo.delete_dataset(digits.name)
        assert os.path.isdir(folder)  # FiftyOne cannot know about it
        # the next sync of any dataset (or delete_orphans) removes it
        prelabel.sync_index(keep, brain_key="k", progress=False)
        assert not os.path.exists(folder)
        assert not os.path.exists(os.path.dirname(folder))
        assert not os.path.exists(adapters)
        assert os.path.isdir(kept.config.path)
    finally:
        keep.delete()


def test_a_killed_first_sync_is_resumed_or_removed(digits):
    """A first sync killed half way leaves no run: its unfinished index is
    resumed by the next first sync of that key, or removed as an orphan by
    any other sync once its process is gone."""
    code = """
        import os, signal, sys
        import fiftyone as fo
        import prelabel
        from prelabel.index.edge import EdgeIndex

        upsert = EdgeIndex.upsert

        def dying(self, *args, **kwargs):
            upsert(self, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        EdgeIndex.upsert = dying
        ds = fo.load_dataset(sys.argv[1])
        prelabel.sync_index(
            ds, brain_key=sys.argv[2], batch_size=100, progress=False
        )
    """

    def killed_first_sync(key):
        proc = _child(code, digits.name, key)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        digits.reload()
        assert key not in digits.list_brain_runs()
        path = ownership.default_index_path(digits, key)
        with open(os.path.join(path, "index.json")) as f:
            assert json.load(f)["complete"] is False
        return EdgeIndex(path).count()

    done = killed_first_sync("resumed")
    results = prelabel.sync_index(digits, brain_key="resumed", progress=False)
    assert results.last_sync.unchanged == done == 100
    assert results.last_sync.added == len(digits) - done

    killed_first_sync("removed")
    assert _index_folders(digits) == ["removed", "resumed"]
    prelabel.sync_index(digits, brain_key="resumed", progress=False)
    assert _index_folders(digits) == ["resumed"]
    assert digits.list_brain_runs() == ["resumed"]


# ---- 7. messages that name the parameter ----------------------------------


def test_bad_values_are_named(digits):
    results = prelabel.sync_index(digits, brain_key="k", progress=False)
    for kwargs, match in (
        ({"min_confidence": "high"}, "min_confidence must be a number"),
        ({"batch_size": 0}, "batch_size must be a positive whole number"),
        ({"k": 0}, "k must be a positive"),
    ):
        with pytest.raises(ValueError, match=match):
            _preannotate(digits, index=results, **kwargs)
    with pytest.raises(ValueError, match="batch_size must be a positive"):
        prelabel.find_label_mistakes(
            digits, index=results, batch_size=0, progress=False
        )
    with pytest.raises(ValueError, match="k must be a positive whole number"):
        digits.sort_by_similarity(digits.first().id, k=0, brain_key="k")
    assert not digits.has_sample_field("prelabel")
