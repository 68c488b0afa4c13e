"""The mistakes panel's "Label next" tab in the App, clicked in headless
Chromium on real digits: half of them labeled, the other half
pre-annotated from those, a batch picked by ``select_for_labeling`` and a
few of its picks labeled since. The tab shows the strategy, how many
picks are labeled so far and the forecast, lists the picks in the order
picked with the reason of each, a click on a row puts that sample in the
grid, and "Show all picks" puts the saved view of every pick there.
"""

import pytest

import prelabel
from prelabel.embeddings import compute_embeddings

from .conftest import TIMEOUT, wait_until

pytestmark = pytest.mark.browser

BUDGET = 12
#: picks a person labeled after the selection
NUM_DONE = 4
PANEL_VIEWPORT = {"width": 1400, "height": 1200}


@pytest.fixture
def picked(make_dataset):
    """240 real digits: the ``train`` half labeled, the ``test`` half
    unlabeled (its class kept aside in ``truth``) and pre-annotated from
    the train half; ``BUDGET`` samples picked to label next, the first
    ``NUM_DONE`` of them labeled since."""
    dataset = make_dataset(n=240)
    dataset.clone_sample_field("ground_truth", "truth")
    test = dataset.match_tags("test")
    test.set_field("ground_truth", None).save()
    compute_embeddings(
        dataset, model="pixels", image_size=12, num_workers=0, progress=False
    )
    index = prelabel.sync_index(dataset, progress=False)
    prelabel.preannotate(
        test,
        index=index,
        reference="train",
        target_precision=0.9,
        progress=False,
    )
    out = prelabel.select_for_labeling(
        dataset, index=index, budget=BUDGET, seed=0, progress=False
    )
    done = dataset.select(out.ids[:NUM_DONE])
    for sample in done.iter_samples(autosave=True):
        sample["ground_truth"] = sample["truth"].copy()
    return dataset, out


def test_label_next_lists_the_picks_and_shows_them_in_the_grid(app, picked):
    dataset, out = picked
    page = app.page
    page.set_viewport_size(PANEL_VIEWPORT)
    app.open(dataset)
    assert len(out.ids) == BUDGET and out.forecast is not None

    # the panel from the App's new-panel menu opens on the pre-labels
    page.locator("[title='New panel']").first.click()
    page.get_by_text("Prelabel mistakes", exact=True).first.click()
    page.get_by_text("Pre-label mistakes", exact=True).first.wait_for(
        timeout=TIMEOUT * 1000
    )
    page.get_by_text("Label next", exact=True).first.click()

    header = (
        f"Strategy {out.strategy}: {BUDGET} picks, {NUM_DONE} labeled so far"
    )
    page.get_by_text(header).first.wait_for(timeout=TIMEOUT * 1000)
    forecast = f"Forecast when picked: {out.forecast.text}."
    assert forecast.startswith(
        f"Forecast when picked: labeling {BUDGET} more is expected to"
    )
    page.get_by_text(forecast, exact=True).wait_for()

    # the picks in the order picked: rank, file, label now, reason
    rows = page.locator("tbody tr")
    wait_until(lambda: rows.count() == BUDGET, f"{BUDGET} rows of picks")
    paths, truth = dataset.select(out.ids, ordered=True).values(
        ["filepath", "truth"]
    )
    for i in range(BUDGET):
        cells = rows.nth(i).locator("td")
        assert cells.nth(0).inner_text().strip() == str(i + 1)
        assert cells.nth(1).inner_text().strip() == paths[i].split("/")[-1]
        label = truth[i].label if i < NUM_DONE else "(not yet)"
        assert cells.nth(2).inner_text().strip() == label
        assert cells.nth(3).inner_text().strip() == out.reasons[i]
    app.shot("1-label-next")

    # a row: that sample in the grid
    row = BUDGET - 1
    rows.nth(row).locator("td").nth(1).click()
    app.wait_view(
        lambda v: v.values("id") == [out.ids[row]],
        f"the grid to show pick {row + 1}",
    )
    page.get_by_text(
        f"Grid: sample {out.ids[row]}, pick {row + 1} of {BUDGET}"
    ).wait_for()
    wait_until(lambda: app.grid_count() == 1, "the grid to count 1 sample")
    app.shot("2-row-clicked")

    # every pick: the saved view, in the order picked
    page.get_by_role("button", name="Show all picks").click()
    view = app.wait_view(
        lambda v: v.values("id") == out.ids,
        f"the grid to show the {BUDGET} picks in order",
    )
    assert view.values("id") == dataset.load_saved_view(out.view_name).values(
        "id"
    )
    page.get_by_text(
        f"Grid: all {BUDGET} picks, in the order picked (saved view "
        f"'{out.view_name}')"
    ).wait_for()
    wait_until(
        lambda: app.grid_count() == BUDGET,
        f"the grid to count {BUDGET} samples",
    )

    # the panel as the README shows it
    tabs = page.get_by_text("Label next", exact=True).first
    tabs.scroll_into_view_if_needed()
    page.mouse.move(0, 0)
    page.wait_for_timeout(300)
    top = page.get_by_text("Prelabel mistakes", exact=True).first
    left = page.get_by_text("Pre-label mistakes", exact=True).first
    x0 = left.bounding_box()["x"]
    y0 = top.bounding_box()["y"] - 8
    bottom = rows.last.bounding_box()
    y1 = bottom["y"] + bottom["height"] + 8
    app.shot(
        "3-all-picks",
        clip=dict(
            x=x0, y=y0, width=page.viewport_size["width"] - x0, height=y1 - y0
        ),
        docs_name="label-next-panel.png",
    )
