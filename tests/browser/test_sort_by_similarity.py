"""The App's "sort by similarity" on a prelabel index (issue 7), clicked in
headless Chromium: select a sample in the grid, open the similarity
action, pick our brain key among two similarity runs, run the search and
show its results; the grid must then hold exactly what
``sort_by_similarity`` returns in Python, in the same order.
"""

import re

import pytest

import prelabel
from prelabel.embeddings import compute_embeddings

from .conftest import TIMEOUT, wait_until

pytestmark = pytest.mark.browser

BRAIN_KEY = "prelabel_qdrant"
#: a second prelabel run on other vectors: choosing the key matters
OTHER_KEY = "pixels_8px"
K = 12
QUERY_INDEX = 3  # the 4th sample of the grid


@pytest.fixture
def dataset(make_dataset):
    dataset = make_dataset(n=240)
    pixels = dict(model="pixels", num_workers=0, progress=False)
    compute_embeddings(dataset, image_size=12, **pixels)
    compute_embeddings(
        dataset, embeddings_field="embeddings_8", image_size=8, **pixels
    )
    prelabel.sync_index(dataset, brain_key=BRAIN_KEY, progress=False)
    prelabel.sync_index(
        dataset,
        embeddings_field="embeddings_8",
        brain_key=OTHER_KEY,
        progress=False,
    )
    return dataset


def labelled(page, label):
    """The block of the Similarity Search form labelled ``label``."""
    return page.locator(
        f"xpath=//label[normalize-space()='{label}']"
        "/ancestor::div[@data-headlessui-state][1]"
    )


def test_sort_by_similarity_from_the_app_uses_our_index(app, dataset):
    page = app.page
    app.open(dataset)
    app.shot("1-grid")

    # select one sample of the grid (its checkbox shows on hover)
    page.locator("[data-cy=looker]").nth(QUERY_INDEX).hover()
    page.locator("[data-cy=looker-checkbox-]").nth(QUERY_INDEX).click()
    (query_id,) = wait_until(
        lambda: list(app.session.selected), "the selection to reach Python"
    )
    assert query_id == dataset.skip(QUERY_INDEX).first().id

    expected = dataset.sort_by_similarity(
        query_id, k=K, brain_key=BRAIN_KEY
    ).values("id")
    other = dataset.sort_by_similarity(
        query_id, k=K, brain_key=OTHER_KEY
    ).values("id")
    assert expected[0] == query_id
    assert expected != other, "the two runs must disagree for this check"

    # the similarity action in the grid's top bar, then its settings:
    # FiftyOne 1.22 opens the Similarity Search panel on the selection
    page.click("[data-cy=action-sort-by-similarity]")
    popout = page.locator("[data-cy=popout]")
    popout.get_by_text("Show similar samples").wait_for()
    app.shot("2-similarity-action")
    popout.locator("button[arial-label='Open similarity panel']").click()
    page.get_by_text("New Search", exact=True).wait_for()

    index = labelled(page, "Similarity Index").locator("[role=combobox]")
    index.click()
    index.fill(BRAIN_KEY)
    page.get_by_role("option", name=BRAIN_KEY, exact=True).click()
    page.get_by_text("Backend: prelabel_qdrant").wait_for()
    page.get_by_text("1 samples selected (positive)").wait_for()
    matches = labelled(page, "Number of matches").locator("input")
    matches.fill(str(K))
    app.shot("3-new-search")
    page.get_by_role("button", name="Search", exact=True).click()
    # no delegated orchestrator here: "Schedule" is not available
    page.get_by_role("menuitem", name=re.compile(r"^Execute")).click()

    # the search runs and is listed; "Show results" puts it in the grid
    card = page.get_by_text(f"{BRAIN_KEY} · k={K}").first
    card.wait_for(timeout=TIMEOUT * 1000)
    page.get_by_text("Completed", exact=True).first.wait_for()
    # the card sits in a sortable wrapper marked aria-disabled, which
    # Playwright reads as "not enabled": click it where it is
    page.get_by_label("Show results").first.click(force=True)

    view = app.wait_view(
        lambda v: v.values("id") == expected,
        f"the grid to show the {K} nearest samples of {query_id}",
    )
    assert len(view) == K
    wait_until(lambda: app.grid_count() == K, f"'{K} samples' in the grid")

    # the grid draws them in that order (row by row): their labels match
    labels = dataset.select(expected, ordered=True).values(
        "ground_truth.label"
    )
    tags = page.locator("[data-cy=looker] [data-cy=tag-ground_truth]")
    wait_until(
        lambda: tags.all_inner_texts() == labels,
        "the grid's thumbnails to show the sorted samples' labels",
    )
    app.shot("4-sorted-grid")
