"""The mistakes panel on boxes (issue 13), clicked in headless Chromium:
real digits tiled into larger images with one box each, some reference
boxes mislabeled, every labeled box scored by
``find_label_mistakes(..., patches_field=...)``. The operator opens the
panel on the box scores, the panel lists boxes with the summary the data
implies, and a click on a row puts a patches view in the grid: that box,
then the labeled boxes that voted.
"""

import os
import re
import uuid

import fiftyone as fo
import pytest
from fiftyone import ViewField as F

import prelabel
from prelabel.datasets.tiles import make_tiled_dataset, write_tiles
from prelabel.embeddings import compute_embeddings

from .conftest import TIMEOUT

pytestmark = pytest.mark.browser

BOXES = "detections"
SCORE = "box_mistakes"
PANEL_VIEWPORT = {"width": 1400, "height": 1200}


@pytest.fixture
def tiled(digit_images, session_dir):
    tiles = write_tiles(
        digit_images[:160], os.path.join(session_dir, "app-tiles"), canvas=64
    )
    dataset = make_tiled_dataset(
        tiles, f"prelabel-browser-boxes-{uuid.uuid4().hex[:8]}", 0.6, 0.15
    )
    compute_embeddings(
        dataset,
        model="pixels",
        image_size=12,
        num_workers=0,
        patches_field=BOXES,
        embeddings_field="box_vec",
        progress=False,
    )
    prelabel.sync_index(
        dataset,
        embeddings_field="box_vec",
        patches_field=BOXES,
        brain_key="boxes",
        progress=False,
    )
    prelabel.find_label_mistakes(
        dataset,
        index="boxes",
        patches_field=BOXES,
        score_field=SCORE,
        progress=False,
    )
    yield dataset
    if fo.dataset_exists(dataset.name):
        dataset.delete_brain_runs()
        dataset.delete()


def suspicious(dataset):
    """The scored boxes whose neighbors' majority is another label."""
    return dataset.to_patches(SCORE).match(
        F(f"{SCORE}.label") != F(f"{SCORE}.neighbors_label")
    )


def test_box_mistakes_panel_lists_boxes_and_opens_their_patches(app, tiled):
    page = app.page
    page.set_viewport_size(PANEL_VIEWPORT)
    app.open(tiled)
    rows = suspicious(tiled)
    num = len(rows)
    high = len(rows.match(F(f"{SCORE}.score") > 0.9))
    assert num > 0, "the data must have boxes their neighbors disagree with"

    modal = app.open_operator("Open mistakes panel", "open_mistakes_panel")
    modal.get_by_text("Score field", exact=True).wait_for()
    app.choose(modal, "Score field", SCORE)
    app.execute(modal)
    page.get_by_text("Suspicious labels", exact=True).first.wait_for(
        timeout=TIMEOUT * 1000
    )
    summary = f"{num} suspicious labels, {high} above 0.9"
    page.get_by_text(summary, exact=True).wait_for()
    app.shot("1-panel-on-boxes")

    # the first row is the most suspicious box
    top = rows.sort_by([(f"{SCORE}.score", -1), ("_id", 1)]).first()[SCORE]
    row = page.locator("tbody tr").first
    assert row.locator("td").nth(1).inner_text().strip() == top.label
    row.locator("td").first.click()
    evidence = [top.source_id] + list(top.neighbors)
    view = app.wait_view(
        lambda v: v._is_patches and v.values("id") == evidence,
        "the grid to show the box and the labeled boxes that voted",
    )
    assert view.values(f"{BOXES}.label")[1:] == [
        tiled.select_labels(ids=[n]).values(
            f"{BOXES}.detections.label", unwind=True
        )[0]
        for n in top.neighbors
    ]
    page.get_by_text(f"Grid: box {top.id}").wait_for()
    app.shot("2-row-clicked", docs_name="mistakes-panel-boxes.png")
    # the grid shows the patches: the box, then its voters
    page.get_by_text("Samples", exact=True).first.click()
    page.locator("[data-cy=looker]").first.wait_for(timeout=TIMEOUT * 1000)
    page.get_by_text(re.compile(rf"^{len(evidence)} patches$")).wait_for()
    app.shot("3-patches-grid", docs_name="mistakes-panel-boxes-grid.png")
