"""The plugin's jobs inside the App server's process, run the way the App
runs them (the server's own ``/operators/execute`` route; no page
needed): a sync and a pre-annotation of several chunks each, so their
chunks are read by a child the server process forks
(:func:`prelabel.prefetch.prefetch`). The results are in the database,
the human labels are untouched, and the server keeps no child."""

import json
import urllib.request
import uuid

import fiftyone as fo
import numpy as np
import psutil
import pytest

pytestmark = pytest.mark.browser

#: 3 chunks of a sync (2,000 each), 2 of a pre-annotation (1,000 each)
NUM_SAMPLES, NUM_LABELED = 4500, 2500


def _server(port: int) -> psutil.Process:
    """The process that listens on the App's port."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            return psutil.Process(conn.pid)
    raise AssertionError(f"nothing listens on port {port}")


def _execute(port: int, dataset, name: str, params: dict, view=()):
    body = {
        "operator_uri": f"@prelabel/qdrant/{name}",
        "dataset_name": dataset.name,
        "params": params,
        "view": list(view),
        "selected": [],
        "selected_labels": [],
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/operators/execute",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.loads(response.read())
    assert not answer.get("error"), answer
    return answer["result"]


@pytest.fixture
def dataset():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 32))
    classes = rng.integers(0, 10, NUM_SAMPLES)
    ds = fo.Dataset(f"prelabel-app-jobs-{uuid.uuid4().hex[:8]}")
    ds.add_samples(
        [
            fo.Sample(
                filepath=f"/nonexistent/{i}.png",
                embeddings=centers[c] + 0.3 * rng.normal(size=32),
                ground_truth=(
                    fo.Classification(label=str(c))
                    if i < NUM_LABELED
                    else None
                ),
                truth=str(c),
                tags=["train" if i < NUM_LABELED else "test"],
            )
            for i, c in enumerate(classes)
        ],
        progress=False,
    )
    yield ds
    ds.delete()


def test_jobs_of_several_chunks_run_in_the_app_server(app_session, dataset):
    port = app_session.server_port
    labels_before = dataset.values("ground_truth.label")

    synced = _execute(
        port, dataset, "sync_index", {"embeddings_field": "embeddings"}
    )
    assert synced["added"] == NUM_SAMPLES

    targets = dataset.match_tags("test")
    done = _execute(
        port,
        dataset,
        "knn_preannotate",
        {"reference_tag": "train", "pred_field": "pred"},
        view=targets._serialize(),
    )
    assert done["num_targets"] == NUM_SAMPLES - NUM_LABELED

    dataset.reload()
    assert dataset.values("ground_truth.label") == labels_before
    assert dataset.count("pred") == NUM_SAMPLES - NUM_LABELED
    pred, truth = targets.values(["pred.label", "truth"])
    assert np.mean([p == t for p, t in zip(pred, truth, strict=True)]) > 0.95
    assert _server(port).children() == []  # every reading child is gone
