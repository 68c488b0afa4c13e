"""A recompute killed at any instant leaves one model per field.

A child process (the same environment: the test database, the same
images) recomputes a field with another model and is killed with SIGKILL
at one of the moments that matter: while the new vectors are written
aside, when they are all written but not yet swapped in, and after the
swap moved them but before the records were saved. The parent then checks
that the field never mixes the two models, that
:func:`prelabel.fields.recover` (or simply the next run) finishes or undoes
the write, and that no temporary field is left.
"""

import os
import signal
import subprocess
import sys

import pytest

from prelabel import fields, records
from prelabel.embeddings import compute_embeddings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the child: arm one kill point, then recompute with 8 px pixels (64-d)
CHILD = r"""
import os, signal, sys

import fiftyone as fo
import fiftyone.core.dataset as fod

from prelabel.embeddings import compute_embeddings

name, point = sys.argv[1], sys.argv[2]
calls = []


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if point == "writing":
    # killed right after the 3rd chunk reached the temporary field
    set_values = fod.Dataset.set_values

    def killing_set_values(self, *args, **kwargs):
        result = set_values(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            die()
        return result

    fod.Dataset.set_values = killing_set_values
elif point == "ready":
    # every vector written and journaled as ready, nothing swapped yet
    import prelabel.fields as pf

    pf._swap = lambda *args, **kwargs: die()
elif point == "moved":
    # the new vectors moved into place, the records not saved yet
    import pymongo.collection as pc

    update_many = pc.Collection.update_many

    def killing_update_many(self, query, update, *args, **kwargs):
        result = update_many(self, query, update, *args, **kwargs)
        if "$rename" in update:
            die()
        return result

    pc.Collection.update_many = killing_update_many

compute_embeddings(
    fo.load_dataset(name),
    model="pixels",
    image_size=8,
    embeddings_field="emb",
    skip_existing=False,
    num_workers=0,
    batch_size=10,
    write_every=40,
    progress=False,
)
print("the child was not killed")
"""


def _lengths(dataset):
    return [None if v is None else len(v) for v in dataset.values("emb")]


def _kill_child_during_recompute(dataset, point):
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, dataset.name, point],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    dataset.reload()


@pytest.mark.parametrize(
    "point, journal, old_after_kill, recover_explicitly",
    [
        ("writing", "writing", True, True),
        ("ready", "ready", True, False),
        ("moved", "moving", False, True),
    ],
)
def test_killed_recompute_never_mixes_models(
    digits_dataset, point, journal, old_after_kill, recover_explicitly
):
    dataset = digits_dataset
    compute_embeddings(
        dataset,
        model="pixels",
        image_size=16,
        embeddings_field="emb",
        num_workers=0,
        progress=False,
    )
    assert set(_lengths(dataset)) == {256}

    _kill_child_during_recompute(dataset, point)

    # at the instant of the kill: every sample holds one model's vector
    expected = 256 if old_after_kill else 64
    assert set(_lengths(dataset)) == {expected}
    # killed where it was meant to be: the journal says how far it got
    assert records.get(dataset, records.PENDING, "emb")["state"] == journal

    if recover_explicitly:
        assert fields.recover(dataset) == ["emb"]
    else:
        # the next run finishes the dead one's swap before it looks
        n = compute_embeddings(
            dataset,
            model="pixels",
            image_size=8,
            embeddings_field="emb",
            num_workers=0,
            progress=False,
        )
        assert n == 0
    dataset.reload()
    assert not [
        f for f in dataset.get_field_schema() if f.startswith("prelabel_tmp_")
    ]
    assert records.read(dataset, records.PENDING) == {}
    dim = dataset.get_field("emb").info["dim"]
    assert set(_lengths(dataset)) == {dim}
    assert records.get(dataset, records.EMBEDDINGS, "emb")["dim"] == dim

    # a rerun completes with the new model everywhere
    n = compute_embeddings(
        dataset,
        model="pixels",
        image_size=8,
        embeddings_field="emb",
        skip_existing=False,
        num_workers=0,
        progress=False,
    )
    assert n == 300 and n.num_failed == 0
    assert set(_lengths(dataset)) == {64}
    assert dataset.get_field("emb").info["dim"] == 64
    assert records.get(dataset, records.EMBEDDINGS, "emb")["dim"] == 64
