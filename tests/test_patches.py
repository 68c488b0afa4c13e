"""Object patches end to end, on real digits tiled into larger images with
one box each (:mod:`prelabel.datasets.tiles`): box embeddings, an index
of boxes, box pre-labels and box label mistakes, on the real FiftyOne
database and the real embedded Qdrant index.
"""

import os
import uuid

import fiftyone as fo
import numpy as np
import pytest
from fiftyone import ViewField as F

import prelabel
from prelabel import fields, records, units
from prelabel.datasets.tiles import (
    MISLABELED_TAG,
    REFERENCE_TAG,
    make_tiled_dataset,
    write_tiles,
)

N = 240
BOXES = "detections"
EMB = "box_embedding"
KEY = "boxes"


def _name(what):
    return f"prelabel-test-{what}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def tiles(digit_images, session_dir):
    rng = np.random.default_rng(7)
    picks = [digit_images[i] for i in rng.permutation(len(digit_images))[:N]]
    out = write_tiles(picks, os.path.join(session_dir, "tiles"), canvas=96)
    return picks, out


@pytest.fixture(scope="module")
def boxes(tiles):
    """The tiled dataset with box embeddings, image embeddings, an index
    of the boxes and one of the images; 10 % of the reference boxes
    mislabeled."""
    _, tiled = tiles
    dataset = make_tiled_dataset(tiled, _name("tiles"), wrong_share=0.1)
    prelabel.compute_embeddings(
        dataset, patches_field=BOXES, embeddings_field=EMB, progress=False
    )
    prelabel.compute_embeddings(dataset, progress=False)
    prelabel.sync_index(
        dataset,
        embeddings_field=EMB,
        patches_field=BOXES,
        brain_key=KEY,
        progress=False,
    )
    prelabel.sync_index(dataset, brain_key="images", progress=False)
    yield dataset
    for run in dataset.list_brain_runs():
        dataset.delete_brain_run(run)
    dataset.delete()


@pytest.fixture
def fresh(tiles):
    """A small tiled dataset of its own, for tests that change it."""
    _, tiled = tiles
    dataset = make_tiled_dataset(tiled[:60], _name("fresh"))
    yield dataset
    for run in dataset.list_brain_runs():
        dataset.delete_brain_run(run)
    dataset.delete()


def _targets(dataset):
    return dataset.match_tags(REFERENCE_TAG, bool=False)


def _accuracy(samples, pred_path):
    """The share of ``samples`` whose pre-label (``pred_path``: a label,
    or the labels of the sample's one box) is the true class."""
    truth, preds = samples.values(["truth.label", pred_path])
    preds = [p[0] if isinstance(p, list) and p else p for p in preds]
    return float(np.mean([t == p for t, p in zip(truth, preds, strict=True)]))


# ---- embeddings of box crops ------------------------------------------


def test_box_embeddings_are_the_crops(boxes, tiles):
    vecs, img = boxes.values([f"{BOXES}.detections.{EMB}", "embeddings"])
    assert all(len(v) == 1 and v[0] is not None for v in vecs)
    assert boxes.get_field(f"{BOXES}.detections.{EMB}") is not None
    # a crop is not the whole tile: its vector differs from the image's
    a, b = np.asarray(vecs[0][0]), np.asarray(img[0])
    cos = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert cos < 0.99
    # the same crop embedded again gives the same vector (nothing else
    # is cropped), and a second run has nothing left to do
    assert (
        prelabel.compute_embeddings(
            boxes, patches_field=BOXES, embeddings_field=EMB, progress=False
        )
        == 0
    )


def test_box_embeddings_of_another_model_are_refused(fresh):
    prelabel.compute_embeddings(
        fresh, patches_field=BOXES, embeddings_field=EMB, progress=False
    )
    before = fresh.values(f"{BOXES}.detections.{EMB}")
    with pytest.raises(ValueError, match="embeddings_field='box_embedding'"):
        prelabel.compute_embeddings(
            fresh,
            patches_field=BOXES,
            embeddings_field=EMB,
            image_size=64,
            skip_existing=False,
            progress=False,
        )
    after = fresh.values(f"{BOXES}.detections.{EMB}")
    assert all(
        np.array_equal(x[0], y[0]) for x, y in zip(before, after, strict=True)
    )


def test_box_embeddings_split_between_runs(fresh):
    path = f"{BOXES}.detections.split"
    opts = dict(model="pixels", image_size=12, progress=False, num_workers=0)
    first = fresh.limit(10)
    prelabel.compute_embeddings(
        first, patches_field=BOXES, embeddings_field="split", **opts
    )
    del opts["progress"], opts["num_workers"]

    runs = prelabel.plan_embedding_runs(
        fresh, 2, patches_field=BOXES, embeddings_field="split", **opts
    )

    assert [r.size for r in runs] == [25, 25]  # samples whose boxes lack it
    assert records.get(fresh, records.EMBEDDINGS, f"{BOXES}:split")
    for run in runs:
        n = prelabel.compute_embeddings(
            run.of(fresh),
            patches_field=BOXES,
            embeddings_field="split",
            progress=False,
            num_workers=0,
            **opts,
        )
        assert n == 25
    vecs = fresh.values(path)
    assert all(len(v) == 1 and len(v[0]) == 144 for v in vecs)
    with pytest.raises(ValueError, match="embeddings_field='split'"):
        prelabel.plan_embedding_runs(
            fresh,
            2,
            patches_field=BOXES,
            embeddings_field="split",
            model="pixels",
            image_size=16,
        )


def test_patches_field_must_be_detections(fresh):
    for call in (
        lambda: prelabel.compute_embeddings(
            fresh, patches_field="truth", progress=False
        ),
        lambda: prelabel.sync_index(
            fresh, patches_field="nope", brain_key="x", progress=False
        ),
    ):
        with pytest.raises(ValueError, match="patches_field="):
            call()


# ---- the index of boxes -----------------------------------------------


def test_index_holds_one_point_per_box_with_its_label(boxes):
    results = boxes.load_brain_results(KEY)
    assert results.config.patches_field == BOXES
    lids, labels = boxes.values(
        [f"{BOXES}.detections.id", f"{BOXES}.detections.label"], unwind=True
    )
    payloads = dict(results.index.iter_payloads(["label", "sample_id"]))
    assert set(payloads) == set(lids)
    assert {lid: p["label"] for lid, p in payloads.items()} == dict(
        zip(lids, labels, strict=True)
    )
    assert results.total_index_size == N


def test_sync_sends_relabeled_and_deleted_boxes_only(fresh):
    prelabel.compute_embeddings(
        fresh, patches_field=BOXES, embeddings_field=EMB, progress=False
    )
    sync = dict(embeddings_field=EMB, patches_field=BOXES, brain_key=KEY)
    prelabel.sync_index(fresh, progress=False, **sync)
    unlabeled = fresh.filter_labels(BOXES, F("label") == None)  # noqa: E711
    first, second = (fresh[sid] for sid in unlabeled.limit(2).values("id"))
    det = first[BOXES].detections[0]
    det.label = "3"
    first.save()
    gone = second[BOXES].detections[0].id
    second[BOXES].detections = []
    second.save()
    results = prelabel.sync_index(fresh, progress=False, **sync)
    stats = results.last_sync
    assert (stats.updated_payloads, stats.deleted, stats.added) == (1, 1, 0)
    _, _, payloads = results.index.retrieve([det.id, gone], ["label"])
    assert payloads == [{"label": "3"}]


def test_indexes_of_boxes_and_of_images_are_not_confused(boxes):
    with pytest.raises(ValueError, match="indexes whole samples"):
        prelabel.preannotate(
            _targets(boxes), index="images", patches_field=BOXES
        )
    with pytest.raises(ValueError, match="indexes the boxes"):
        prelabel.preannotate(_targets(boxes), index=KEY)
    with pytest.raises(ValueError, match="indexes the boxes"):
        prelabel.sync_index(
            boxes, embeddings_field=EMB, brain_key=KEY, progress=False
        )


# ---- box pre-labels ---------------------------------------------------


def test_box_prelabels_reach_the_image_vote_on_the_same_digits(boxes, tiles):
    """Each unlabeled box voted by its nearest labeled boxes is as right
    as the vote of the same digits as whole images (the digits alone,
    untiled, with the same reference labels, wrong ones included), and
    far better than the vote of the tiles as images."""
    targets = _targets(boxes)
    out = prelabel.preannotate(
        targets, index=KEY, patches_field=BOXES, pred_field="box_pre"
    )
    assert out.num_targets == len(targets)
    box_acc = _accuracy(targets, "box_pre.detections.label")

    prelabel.preannotate(targets, brain_key="images", pred_field="tile_pre")
    tile_acc = _accuracy(targets, "tile_pre.label")

    picks, tiled = tiles
    plain = fo.Dataset(_name("plain"))
    origin = {t[0]: p[0] for p, t in zip(picks, tiled, strict=True)}
    box_label = dict(
        zip(*boxes.values(["id", f"{BOXES}.detections.label"]), strict=True)
    )
    try:
        plain.add_samples(
            [
                fo.Sample(
                    filepath=origin[s.filepath],
                    tags=s.tags,
                    truth=s.truth,
                    ground_truth=(
                        fo.Classification(label=box_label[s.id][0])
                        if box_label[s.id][0]
                        else None
                    ),
                )
                for s in boxes
            ],
            progress=False,
        )
        prelabel.compute_embeddings(plain, progress=False)
        prelabel.sync_index(plain, progress=False)
        plain_targets = _targets(plain)
        prelabel.preannotate(plain_targets, pred_field="p", progress=False)
        image_acc = _accuracy(plain_targets, "p.label")
    finally:
        plain.delete_brain_runs()
        plain.delete()
    print(
        f"box vote {box_acc:.3f}, digits as images {image_acc:.3f}, "
        f"tiles as images {tile_acc:.3f}"
    )
    assert box_acc >= image_acc - 0.02
    assert box_acc > tile_acc


def test_box_prelabels_are_detections_on_the_same_boxes(boxes):
    targets = _targets(boxes)
    before = [s[BOXES].to_dict() for s in boxes.select_fields(BOXES)]
    out = prelabel.preannotate(
        targets,
        index=KEY,
        patches_field=BOXES,
        pred_field="box_accept",
        target_precision=0.7,  # 10 % of the references are mislabeled
    )
    # the boxes a person drew are untouched
    assert [s[BOXES].to_dict() for s in boxes.select_fields(BOXES)] == before
    assert isinstance(boxes.get_field("box_accept"), fo.EmbeddedDocumentField)
    accepted = review = 0
    for sample in targets.select_fields([BOXES, "box_accept"]):
        (src,) = sample[BOXES].detections
        (pre,) = sample["box_accept"].detections
        assert pre.source_id == src.id
        assert pre.bounding_box == src.bounding_box
        assert pre.label in {str(d) for d in range(10)}
        assert 0 < pre.confidence <= 1
        assert len(pre.neighbors) == prelabel.constants.DEFAULT_K
        flagged = prelabel.constants.REVIEW_TAG in pre.tags
        assert flagged == (not pre.accepted)
        accepted += pre.accepted
        review += flagged
    assert (accepted, review) == (out.num_accepted, out.num_review)
    assert 0 < accepted < len(targets)
    # the neighbors are labeled boxes (label ids), never the box itself
    lids = set(boxes.values(f"{BOXES}.detections.id", unwind=True))
    nbs = targets.values("box_accept.detections.neighbors", unwind=True)
    assert {n for row in nbs for n in row} <= lids
    record = records.get(boxes, records.RUNS, "box_accept")
    assert record["patches_field"] == BOXES


@pytest.mark.parametrize("as_view", [False, True])
def test_a_reference_tag_or_view_selects_the_boxes_of_those_samples(
    boxes, as_view
):
    wrong = boxes.match_tags(MISLABELED_TAG)
    out = prelabel.preannotate(
        _targets(boxes),
        index=KEY,
        patches_field=BOXES,
        reference=wrong if as_view else MISLABELED_TAG,
        pred_field="box_tagged",
        k=1,
    )
    voters = set(wrong.values(f"{BOXES}.detections.id", unwind=True))
    nbs = _targets(boxes).values(
        "box_tagged.detections.neighbors", unwind=True
    )
    assert {n for row in nbs for n in row} <= voters
    assert out.num_labeled == len(_targets(boxes))


def test_a_failure_half_way_writes_no_box_field(boxes, monkeypatch):
    calls = []
    real = units._PatchWriter.write

    def flaky(self, values, review=()):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(self, values, review)

    monkeypatch.setattr(units._PatchWriter, "write", flaky)
    with pytest.raises(RuntimeError, match="killed"):
        prelabel.preannotate(
            _targets(boxes),
            index=KEY,
            patches_field=BOXES,
            pred_field="box_broken",
            batch_size=50,
        )
    boxes.reload()
    assert not boxes.has_sample_field("box_broken")
    assert not [
        f for f in boxes.get_field_schema() if f.startswith(fields.TMP_PREFIX)
    ]
    assert records.get(boxes, records.RUNS, "box_broken") is None


def test_box_options_that_do_not_apply_are_refused(boxes):
    t = _targets(boxes)
    for kwargs, match in (
        (dict(label_field="truth"), "label_field='truth'"),
        (dict(eval_key="ev"), "eval_key"),
        (dict(mode="adapted"), "mode='adapted'"),
        (dict(pred_field=BOXES), "pred_field='detections'"),
    ):
        with pytest.raises(ValueError, match=match):
            prelabel.preannotate(t, index=KEY, patches_field=BOXES, **kwargs)


# ---- box label mistakes -----------------------------------------------


def test_mislabeled_boxes_rank_first(boxes):
    out = prelabel.find_label_mistakes(
        boxes, index=KEY, patches_field=BOXES, score_field="box_mistakes"
    )
    num_labeled = len(boxes.match_tags(REFERENCE_TAG))
    assert out.num_scored == num_labeled
    assert out.label_field is None
    patches = boxes.to_patches("box_mistakes").sort_by(
        "box_mistakes.score", reverse=True
    )
    wrong = len(boxes.match_tags(MISLABELED_TAG))
    assert wrong > 0
    top = patches.limit(3 * wrong).values("tags")
    found = sum(MISLABELED_TAG in t for t in top)
    print(f"{found} of {wrong} mislabeled boxes in the top {3 * wrong}")
    assert found >= wrong / 2
    first = patches.first()["box_mistakes"]
    assert first.label != first.neighbors_label
    assert 0 <= first.score <= 1


# ---- the mistakes panel on boxes --------------------------------------


def test_the_panel_lists_boxes_and_shows_their_evidence(boxes):
    from prelabel import panel_data as pdata

    prelabel.find_label_mistakes(
        boxes, index=KEY, patches_field=BOXES, score_field="panel_boxes"
    )
    assert "panel_boxes" in pdata.find_sources(boxes)["suspicious"]
    source = pdata.make_source(boxes, "suspicious", score_field="panel_boxes")
    assert source.boxes == BOXES
    view = pdata.mistakes_view(boxes, source)
    assert view._is_patches
    rows = pdata.list_rows(view, source, limit=None)
    assert rows and all(r["truth"] != r["pred"] for r in rows)
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert pdata.summarize(view, source).count == len(rows)
    assert set(pdata.class_choices(boxes, source)) <= {
        str(d) for d in range(10)
    }

    # a row opens a patches view of the index's boxes: the box first,
    # then the labeled boxes that voted
    first = rows[0]["id"]
    evidence = pdata.evidence_view(boxes, first, source)
    assert evidence._is_patches
    own = view.select(first).values("panel_boxes.source_id")[0]
    nbs = view.select(first).values("panel_boxes.neighbors")[0]
    assert evidence.values("id") == [own] + nbs
    assert evidence.values(f"{BOXES}.label")[1:] == [
        lbl for lbl in evidence.values(f"{BOXES}.label")[1:] if lbl
    ]

    # tagging tags the boxes a person labeled; accepting is refused
    wrong = pdata.mistakes_view(boxes, source, pdata.Filters(min_score=0.99))
    count = pdata.tag_samples(wrong, "label_error", source)
    tagged = boxes.select_labels(tags="label_error", fields=BOXES)
    assert count == tagged.count(f"{BOXES}.detections") > 0
    assert set(tagged.values(f"{BOXES}.detections.id", unwind=True)) == set(
        wrong.values("panel_boxes.source_id")
    )
    boxes.untag_labels("label_error", label_fields=BOXES)
    with pytest.raises(ValueError, match="boxes"):
        pdata.accept_labels(view, source, "accepted")


def test_calibrated_and_propagated_box_prelabels(boxes):
    targets = _targets(boxes)
    out = prelabel.preannotate(
        targets,
        index=KEY,
        patches_field=BOXES,
        pred_field="box_spread",
        calibrate=True,
        propagate=True,
    )
    assert out.calibrated and out.propagation is not None
    preds = targets.values("box_spread.detections", unwind=True)
    assert len(preds) == len(targets)
    assert all(0 <= p.confidence <= 1 for p in preds if p.label)
    assert all(p.raw_confidence is not None for p in preds if p.label)


# ---- a kill while box embeddings are written --------------------------

KILL_CHILD = r"""
import os, signal, sys

import fiftyone as fo
import fiftyone.core.collections as foc

from prelabel.embeddings import compute_embeddings

calls = []
set_label_values = foc.SampleCollection.set_label_values


def killing(self, *args, **kwargs):
    result = set_label_values(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return result


foc.SampleCollection.set_label_values = killing
compute_embeddings(
    fo.load_dataset(sys.argv[1]),
    model="pixels",
    image_size=8,
    patches_field="detections",
    embeddings_field="box_vec",
    num_workers=0,
    batch_size=10,
    write_every=20,
    progress=False,
)
print("the child was not killed")
"""


def test_killed_box_embeddings_resume_with_one_model(fresh):
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", KILL_CHILD, fresh.name],
        cwd=root,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    fresh.reload()
    path = f"{BOXES}.detections.box_vec"
    done = [v for row in fresh.values(path) for v in row if v is not None]
    # killed after two chunks of 20: those boxes hold whole 64-d vectors
    assert len(done) == 40 and {len(v) for v in done} == {64}
    # the field is known as ours, so the next run resumes it ...
    left = prelabel.compute_embeddings(
        fresh,
        model="pixels",
        image_size=8,
        patches_field=BOXES,
        embeddings_field="box_vec",
        num_workers=0,
        progress=False,
    )
    assert left == len(fresh) - 40
    vecs = [v for row in fresh.values(path) for v in row]
    assert len(vecs) == len(fresh) and {len(v) for v in vecs} == {64}
    # ... and another model is refused for it
    with pytest.raises(ValueError, match="choose another embeddings_field"):
        prelabel.compute_embeddings(
            fresh,
            model="pixels",
            image_size=12,
            patches_field=BOXES,
            embeddings_field="box_vec",
            num_workers=0,
            progress=False,
        )


def test_check_index_compares_the_boxes(boxes):
    health = prelabel.check_index(boxes, KEY)
    assert (health.problems, health.stale) == ([], [])
    assert health.num_points == health.num_embedded == N
    assert health.num_checked == N


def test_odd_boxes_and_patches_views(fresh):
    """A box without coordinates is counted as failed (its sample tagged)
    and the others are embedded; an empty label is no label; a patches
    view is refused with the way to pass the boxes."""
    first, second = (fresh[sid] for sid in fresh.limit(2).values("id"))
    first[BOXES].detections[0].bounding_box = None
    first.save()
    second[BOXES].detections[0].label = ""
    second.save()
    count = prelabel.compute_embeddings(
        fresh,
        model="pixels",
        image_size=8,
        patches_field=BOXES,
        embeddings_field=EMB,
        num_workers=0,
        progress=False,
    )
    assert int(count) == len(fresh) - 1 and count.num_failed == 1
    assert "embedding_failed" in fresh[first.id].tags
    results = prelabel.sync_index(
        fresh,
        embeddings_field=EMB,
        patches_field=BOXES,
        brain_key=KEY,
        progress=False,
    )
    empty = second[BOXES].detections[0].id
    _, _, payloads = results.index.retrieve([empty], ["label"])
    assert payloads[0].get("label") is None
    labeled = (
        len(fresh.match_tags(REFERENCE_TAG))
        - (REFERENCE_TAG in second.tags)
        - (REFERENCE_TAG in first.tags)
    )
    assert (
        results.index.count(prelabel.index.base.IndexFilter(labeled=True))
        == labeled
    )
    with pytest.raises(ValueError, match="patches view"):
        prelabel.preannotate(
            fresh.to_patches(BOXES), index=KEY, patches_field=BOXES
        )


def test_an_index_of_boxes_made_by_fiftyone_votes_the_same(boxes):
    """``fob.compute_similarity(..., patches_field=...)`` on our backend
    makes the same index of boxes as ``sync_index``: the pre-labels it
    gives are the same."""
    import fiftyone.brain as fob

    fob.compute_similarity(
        boxes,
        patches_field=BOXES,
        embeddings=EMB,
        backend="prelabel_qdrant",
        brain_key="fob_boxes",
    )
    targets = _targets(boxes)
    for key, field in ((KEY, "pre_ours"), ("fob_boxes", "pre_fob")):
        prelabel.preannotate(
            targets, index=key, patches_field=BOXES, pred_field=field
        )
    ours = targets.values("pre_ours.detections.label", unwind=True)
    theirs = targets.values("pre_fob.detections.label", unwind=True)
    assert ours == theirs and len(ours) == len(targets)
