"""The prelabel index as a FiftyOne brain similarity backend, end to end.

Real FiftyOne datasets on the real MongoDB, a real Qdrant Edge index on
disk (under the temporary ``PRELABEL_HOME`` of conftest), real child
processes; every result is checked against exact cosine search in numpy.
"""

import json
import os
import subprocess
import sys
import textwrap
import uuid

import fiftyone as fo
import fiftyone.brain as fob
import fiftyone.core.odm as foo
import gridfs
import numpy as np
import pytest

import prelabel
import prelabel.index.brain as pib
from prelabel import constants
from prelabel.index.base import IndexFilter
from prelabel.index.edge import EdgeIndex

DIM = 32
SECRET = "s3cret-api-key-do-not-store"


def _add_random(dataset, n, rng, tags=("test",), every=3):
    """Adds ``n`` samples with random embeddings; every ``every``-th one is
    tagged ``tags``. No sample objects stay alive after the call."""
    start = len(dataset)
    samples = [
        fo.Sample(
            filepath=f"/nonexistent/random/{start + i:06d}.png",
            embeddings=rng.normal(size=DIM).astype(np.float32),
            ground_truth=fo.Classification(label=f"c{(start + i) % 3}"),
            tags=list(tags) if (start + i) % every == 0 else ["other"],
        )
        for i in range(n)
    ]
    dataset.add_samples(samples, progress=False)


def _new_dataset(n, seed):
    dataset = fo.Dataset(f"prelabel-brain-{uuid.uuid4().hex[:8]}")
    _add_random(dataset, n, np.random.default_rng(seed))
    return dataset


def _delete(dataset):
    if fo.dataset_exists(dataset.name):
        dataset.delete()


def _exact(samples, query, k):
    """The exact cosine top ``k`` of ``samples`` for a query vector:
    ``(ids, 1 - cosine)``, closest first."""
    ids, vecs = samples.values(["id", "embeddings"])
    mat = np.stack(vecs).astype(np.float64)
    mat /= np.linalg.norm(mat, axis=1, keepdims=True)
    q = np.asarray(query, dtype=np.float64)
    sims = mat @ (q / np.linalg.norm(q))
    order = np.argsort(-sims, kind="stable")[:k]
    return [ids[i] for i in order], 1.0 - sims[order]


def _vector(dataset, sample_id):
    return np.asarray(dataset[sample_id]["embeddings"], dtype=np.float32)


def _raw_run(dataset, key):
    """The run document as stored in MongoDB, and its GridFS results."""
    conn = foo.get_db_conn()
    ds_doc = conn.datasets.find_one({"_id": dataset._doc.id})
    run = conn.runs.find_one({"_id": ds_doc["brain_methods"][key]})
    results = gridfs.GridFS(conn).get(run["results"]).read().decode()
    return run, results


@pytest.fixture(scope="module")
def rand():
    """1,000 random 32-d samples (every 3rd tagged "test") and an index
    under the brain key "idx" synced with an API key that must never be
    stored."""
    dataset = _new_dataset(1000, seed=0)
    results = prelabel.sync_index(
        dataset, brain_key="idx", api_key=SECRET, progress=False
    )
    yield dataset, results
    _delete(dataset)


# ---- registration ------------------------------------------------------


def test_sync_registers_a_similarity_run(rand):
    dataset, results = rand
    assert "idx" in dataset.list_brain_runs(type="similarity")
    assert "idx" in dataset.list_brain_runs(method=constants.BACKEND_NAME)
    assert results.last_sync.added == len(dataset)
    assert results.total_index_size == len(dataset)

    config = dataset.get_brain_info("idx").config
    assert config.method == "prelabel_qdrant"
    assert type(config).__name__ == "PrelabelQdrantSimilarityConfig"
    assert config.embeddings_field == "embeddings"
    assert config.label_field == "ground_truth"
    assert config.location == "embedded"
    home = os.path.realpath(os.environ["PRELABEL_HOME"])
    path = os.path.realpath(config.path)
    assert path.startswith(home + os.sep)
    assert os.path.isdir(path)


def test_credentials_are_never_serialized(rand):
    dataset, _ = rand
    serialized = dataset.get_brain_info("idx").config.serialize()
    for name in ("url", "api_key", "_url", "_api_key"):
        assert serialized.get(name) is None
    assert SECRET not in json.dumps(serialized, default=str)

    run, results = _raw_run(dataset, "idx")
    assert SECRET not in repr(run)
    assert SECRET not in results
    for name in ("url", "api_key", "_url", "_api_key"):
        assert name not in run["config"]
    assert run["config"]["cls"] == (
        "prelabel.index.brain.PrelabelQdrantSimilarityConfig"
    )
    # a reload in this process has no credentials either
    loaded = dataset.load_brain_results("idx", cache=False)
    assert loaded.config.api_key is None
    assert loaded.config.url is None


# ---- sort_by_similarity ------------------------------------------------


def test_sort_by_sample_id_equals_exact_cosine(rand):
    dataset, _ = rand
    for sid in dataset.take(3, seed=1).values("id"):
        view = dataset.sort_by_similarity(
            sid, k=10, brain_key="idx", dist_field="dist"
        )
        want_ids, want_dists = _exact(dataset, _vector(dataset, sid), 10)
        assert view.values("id") == want_ids
        assert view.values("id")[0] == sid  # itself, at distance 0
        np.testing.assert_allclose(view.values("dist"), want_dists, atol=1e-5)


def test_sort_by_vector_equals_exact_cosine(rand):
    dataset, _ = rand
    query = np.random.default_rng(7).normal(size=DIM).astype(np.float32)
    view = dataset.sort_by_similarity(
        query, k=10, brain_key="idx", dist_field="dist"
    )
    want_ids, want_dists = _exact(dataset, query, 10)
    assert view.values("id") == want_ids
    np.testing.assert_allclose(view.values("dist"), want_dists, atol=1e-5)


def _spy_queries(monkeypatch):
    calls = []
    real = EdgeIndex.query

    def spy(self, vectors, k, filter=None, **kwargs):
        calls.append((int(k), filter))
        return real(self, vectors, k, filter, **kwargs)

    monkeypatch.setattr(EdgeIndex, "query", spy)
    return calls


def test_sort_on_small_view_uses_id_filter(rand, monkeypatch):
    dataset, _ = rand
    view = dataset.match_tags("test")
    assert 0 < len(view) <= pib.MAX_ID_FILTER
    calls = _spy_queries(monkeypatch)
    inside = view.first().id
    outside = dataset.match_tags("other").first().id
    for sid in (inside, outside):  # a query may come from outside the view
        calls.clear()
        got = view.sort_by_similarity(
            sid, k=10, brain_key="idx", dist_field="dist"
        )
        want_ids, want_dists = _exact(view, _vector(dataset, sid), 10)
        assert got.values("id") == want_ids
        np.testing.assert_allclose(got.values("dist"), want_dists, atol=1e-5)
        assert calls and all(
            f is not None and f.sample_ids is not None for _, f in calls
        )


def test_sort_on_large_view_oversamples_and_post_filters(rand, monkeypatch):
    dataset, _ = rand
    monkeypatch.setattr(pib, "MAX_ID_FILTER", 10)
    calls = _spy_queries(monkeypatch)

    view = dataset.match_tags("test")
    sid = dataset.match_tags("other").first().id
    got = view.sort_by_similarity(sid, k=10, brain_key="idx")
    want_ids, _ = _exact(view, _vector(dataset, sid), 10)
    assert got.values("id") == want_ids
    assert calls and all(f is None for _, f in calls)

    # a view made of the points farthest from the query: the first request
    # finds too few members, so it must grow until it has k of them
    query = np.random.default_rng(3).normal(size=DIM).astype(np.float32)
    ranked, _ = _exact(dataset, query, len(dataset))
    far = dataset.select(ranked[-40:])
    calls.clear()
    got = far.sort_by_similarity(
        query, k=10, brain_key="idx", dist_field="dist"
    )
    want_ids, want_dists = _exact(far, query, 10)
    assert got.values("id") == want_ids
    assert set(got.values("id")) <= set(ranked[-40:])
    np.testing.assert_allclose(got.values("dist"), want_dists, atol=1e-5)
    assert len(calls) > 1 and all(f is None for _, f in calls)
    assert calls[-1][0] > calls[0][0]


# ---- compute_similarity ------------------------------------------------


def test_compute_similarity_with_our_backend(rand):
    dataset, _ = rand
    results = fob.compute_similarity(
        dataset,
        embeddings="embeddings",
        backend="prelabel_qdrant",
        brain_key="k2",
        label_field="ground_truth",
    )
    try:
        assert isinstance(results, pib.PrelabelQdrantSimilarityIndex)
        assert dataset.get_brain_info("k2").config.method == (
            "prelabel_qdrant"
        )
        k2_path = dataset.get_brain_info("k2").config.path
        assert k2_path != dataset.get_brain_info("idx").config.path
        assert results.total_index_size == len(dataset)
        # the labels went into the payloads, as sync_index writes them
        assert results.index.count(IndexFilter(labeled=True)) == len(dataset)
        for sid in dataset.take(2, seed=5).values("id"):
            a = dataset.sort_by_similarity(sid, k=10, brain_key="k2")
            b = dataset.sort_by_similarity(sid, k=10, brain_key="idx")
            want, _ = _exact(dataset, _vector(dataset, sid), 10)
            assert a.values("id") == b.values("id") == want
    finally:
        dataset.delete_brain_run("k2")
    assert not os.path.exists(k2_path)


# ---- other processes ---------------------------------------------------


def _child_env():
    env = dict(os.environ)
    env["FIFTYONE_DO_NOT_TRACK"] = "true"
    return env


_LOAD_CHILD = textwrap.dedent("""
    import json, sys
    import fiftyone as fo

    name, key, sid = sys.argv[1:4]
    dataset = fo.load_dataset(name)
    results = dataset.load_brain_results(key)
    view = dataset.sort_by_similarity(sid, k=10, brain_key=key)
    print(json.dumps({
        "cls": type(results).__module__ + "." + type(results).__name__,
        "ids": view.values("id"),
    }))
    """)


def test_load_brain_results_in_another_process(rand):
    dataset, _ = rand
    sid = dataset.skip(17).first().id
    want = dataset.sort_by_similarity(sid, k=10, brain_key="idx").values("id")
    assert "import prelabel" not in _LOAD_CHILD
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_CHILD, dataset.name, "idx", sid],
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cls"] == "prelabel.index.brain.PrelabelQdrantSimilarityIndex"
    assert out["ids"] == want


_QUERY_LOOP_CHILD = textwrap.dedent("""
    import json, os, sys
    import fiftyone as fo

    name, key, sid, done, out = sys.argv[1:6]
    dataset = fo.load_dataset(name)
    rows = []
    while len(rows) < 30 or not os.path.exists(done):
        view = dataset.sort_by_similarity(sid, k=10, brain_key=key)
        rows.append(view.values("id"))
        if len(rows) == 1:
            print("ready", flush=True)
        if len(rows) > 5000:
            break
    with open(out, "w") as f:
        json.dump(rows, f)
    """)


def test_queries_in_another_process_while_syncing(tmp_path):
    dataset = _new_dataset(500, seed=11)
    try:
        results = prelabel.sync_index(
            dataset, brain_key="conc", progress=False
        )
        sid = dataset.first().id
        done, out = tmp_path / "done", tmp_path / "rows.json"
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _QUERY_LOOP_CHILD,
                dataset.name,
                "conc",
                sid,
                str(done),
                str(out),
            ],
            env=_child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout.readline().strip() == "ready", (
                child.stderr.read() if child.poll() is not None else ""
            )
            _add_random(dataset, 2000, np.random.default_rng(12))
            stats = prelabel.sync_index(
                dataset, brain_key="conc", progress=False
            ).last_sync
            done.touch()
            _, err = child.communicate(timeout=120)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == 0, err
        assert stats.added == 2000

        rows = json.loads(out.read_text())
        assert len(rows) >= 30
        valid = set(dataset.values("id"))
        for row in rows:
            assert len(row) == 10 and set(row) <= valid
            assert row[0] == sid
        assert results.index.count() == len(dataset) == 2500
        fresh = dataset.load_brain_results("conc", cache=False)
        assert fresh.total_index_size == len(dataset)
    finally:
        _delete(dataset)


# ---- delete, re-create, rename ------------------------------------------


def test_delete_recreate_and_rename(tmp_path):
    dataset = _new_dataset(200, seed=21)
    try:
        sid = dataset.first().id
        want, _ = _exact(dataset, _vector(dataset, sid), 5)

        first = prelabel.sync_index(dataset, brain_key="gone", progress=False)
        path = first.config.path
        assert os.path.isdir(path)
        dataset.delete_brain_run("gone")
        assert "gone" not in dataset.list_brain_runs()
        assert not os.path.exists(path)

        again = prelabel.sync_index(dataset, brain_key="gone", progress=False)
        assert again.last_sync.added == len(dataset)  # from scratch
        assert again.total_index_size == len(dataset)
        got = dataset.sort_by_similarity(sid, k=5, brain_key="gone")
        assert got.values("id") == want

        dataset.rename_brain_run("gone", "renamed")
        assert "renamed" in dataset.list_brain_runs(type="similarity")
        assert "gone" not in dataset.list_brain_runs()
        renamed_path = dataset.get_brain_info("renamed").config.path
        loaded = dataset.load_brain_results("renamed", cache=False)
        assert loaded.key == "renamed"
        assert loaded.sort_by_similarity(sid, k=5).values("id") == want
        got = dataset.sort_by_similarity(sid, k=5, brain_key="renamed")
        assert got.values("id") == want

        # the old key is free again: a new run of it gets its own folder,
        # so deleting it leaves the renamed run intact
        new = prelabel.sync_index(dataset, brain_key="gone", progress=False)
        assert new.config.path != renamed_path
        assert new.last_sync.added == len(dataset)
        dataset.delete_brain_run("gone")
        assert os.path.isdir(renamed_path)
        loaded = dataset.load_brain_results("renamed", cache=False)
        assert loaded.total_index_size == len(dataset)
        assert loaded.sort_by_similarity(sid, k=5).values("id") == want

        dataset.delete_brain_run("renamed")
        assert not os.path.exists(renamed_path)
        assert dataset.list_brain_runs() == []
    finally:
        _delete(dataset)


# ---- the server path (qdrant-client) -------------------------------------


def test_server_path_in_memory_equals_exact(rand):
    """``url=":memory:"`` gives qdrant-client's in-process local mode: a
    fresh, empty store per connection, so only the results object returned
    by the sync (which keeps its connection) can be queried."""
    dataset, _ = rand
    results = prelabel.sync_index(
        dataset,
        brain_key="srv",
        url=":memory:",
        api_key=SECRET,
        progress=False,
    )
    try:
        assert results.index.location == "server"
        assert results.total_index_size == len(dataset)
        config = dataset.get_brain_info("srv").config
        assert config.location == "server"
        assert config.path is None
        assert config.collection_name.startswith("prelabel-")
        run, stored = _raw_run(dataset, "srv")
        assert SECRET not in repr(run) and SECRET not in stored
        assert ":memory:" not in repr(run["config"])

        sid = dataset.skip(5).first().id
        got = results.sort_by_similarity(sid, k=10, dist_field="dist")
        want_ids, want_dists = _exact(dataset, _vector(dataset, sid), 10)
        assert got.values("id") == want_ids
        np.testing.assert_allclose(got.values("dist"), want_dists, atol=1e-5)

        view = dataset.match_tags("test")
        with results.use_view(view):
            got = results.sort_by_similarity(sid, k=10)
        assert got.values("id") == _exact(view, _vector(dataset, sid), 10)[0]
    finally:
        dataset.delete_brain_run("srv")


def test_server_path_load_and_delete_through_fiftyone(rand, monkeypatch):
    """The full FiftyOne round trip of a server run (load from the run
    document, credentials from the environment, sort, delete), with one
    shared in-memory qdrant-client standing in for the server."""
    from qdrant_client import QdrantClient

    import prelabel.index.server as pis

    dataset, _ = rand
    shared = QdrantClient(location=":memory:")
    connects = []

    def connect(url=None, api_key=None, **kwargs):
        connects.append((url, api_key))
        if url is None:
            raise ValueError("no url")
        return shared

    monkeypatch.setattr(pis, "connect", connect)
    monkeypatch.setenv("PRELABEL_QDRANT_URL", "http://qdrant.invalid:6333")
    monkeypatch.setenv("PRELABEL_QDRANT_API_KEY", SECRET)

    results = prelabel.sync_index(
        dataset,
        brain_key="srv2",
        url="http://qdrant.invalid:6333",
        api_key=SECRET,
        progress=False,
    )
    collection = results.config.collection_name
    assert shared.collection_exists(collection)
    assert connects[-1] == ("http://qdrant.invalid:6333", SECRET)
    run, stored = _raw_run(dataset, "srv2")
    assert SECRET not in repr(run) and SECRET not in stored
    assert "qdrant.invalid" not in repr(run)

    connects.clear()
    loaded = dataset.load_brain_results("srv2", cache=False)
    assert loaded.total_index_size == len(dataset)
    # the stored config had no credentials: they came from the environment
    assert connects == [("http://qdrant.invalid:6333", SECRET)]
    sid = dataset.skip(9).first().id
    want, _ = _exact(dataset, _vector(dataset, sid), 10)
    got = dataset.sort_by_similarity(sid, k=10, brain_key="srv2")
    assert got.values("id") == want
    view = dataset.match_tags("test")
    got = view.sort_by_similarity(sid, k=10, brain_key="srv2")
    assert got.values("id") == _exact(view, _vector(dataset, sid), 10)[0]

    dataset.delete_brain_run("srv2")
    assert "srv2" not in dataset.list_brain_runs()
    assert not shared.collection_exists(collection)


def test_a_distributed_collection_is_created_as_configured(rand, monkeypatch):
    """The server options of a cluster (shards, replicas, write
    consistency, HNSW, int8 quantization) reach Qdrant's
    ``create_collection`` and stay in the run, so a resync or a rebuild
    creates the same collection. qdrant-client's local mode accepts and
    ignores distribution, so the request itself is what is checked."""
    from qdrant_client import QdrantClient

    import prelabel.index.server as pis

    dataset, _ = rand
    shared = QdrantClient(location=":memory:")
    created = []
    real = QdrantClient.create_collection

    def spy(self, collection_name, **kwargs):
        created.append(kwargs)
        return real(self, collection_name, **kwargs)

    monkeypatch.setattr(QdrantClient, "create_collection", spy)
    monkeypatch.setattr(pis, "connect", lambda *a, **k: shared)
    cluster = dict(
        shard_number=6,
        replication_factor=2,
        write_consistency_factor=1,
        hnsw_config={"m": 32, "ef_construct": 200},
        quantization="int8",
    )
    results = prelabel.sync_index(
        dataset,
        brain_key="cluster",
        url="http://qdrant.invalid:6333",
        progress=False,
        **cluster,
    )
    try:
        (kwargs,) = created
        assert (
            kwargs["shard_number"],
            kwargs["replication_factor"],
            kwargs["write_consistency_factor"],
        ) == (6, 2, 1)
        assert kwargs["hnsw_config"].m == 32
        assert kwargs["hnsw_config"].ef_construct == 200
        assert kwargs["quantization_config"].scalar.type == "int8"
        config = dataset.get_brain_info("cluster").config
        assert {k: getattr(config, k) for k in cluster} == cluster
        prelabel.sync_index(
            dataset,
            brain_key="cluster",
            url="http://qdrant.invalid:6333",
            rebuild=True,
            progress=False,
        )
        # the rebuilt collection: the same request (its marker aside)
        again = {k: v for k, v in created[1].items() if k != "metadata"}
        assert again == {k: v for k, v in kwargs.items() if k != "metadata"}
        assert results.index.count() == len(dataset)
    finally:
        dataset.delete_brain_run("cluster")
