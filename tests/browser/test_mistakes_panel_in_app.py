"""The mistakes panel in the App (issue 4), clicked in headless Chromium
on pre-annotated real digits: the App's "+" menu offers it, the
``open_mistakes_panel`` operator opens it, it shows the summary the data
implies, a click on a row puts that sample and the neighbors that voted in
the grid, and a click on a confusion-matrix cell puts exactly that cell's
samples in the grid.

The confusion-matrix cell is clicked with the mouse, at the cell's centre
computed from the plot area's bounding box (plotly's drag layer) and the
number of classes, so plotly itself turns the click into the event the
panel receives.
"""

import pytest
from fiftyone import ViewField as F

import prelabel
from prelabel.embeddings import compute_embeddings

from .conftest import TIMEOUT, wait_until

pytestmark = pytest.mark.browser

PRED = "prelabel"
GT = "ground_truth"
EVAL_KEY = "prelabel_eval"
#: every 10th test label is made wrong, as people make them
FLIP_EVERY = 10
PANEL_VIEWPORT = {"width": 1400, "height": 1500}


@pytest.fixture
def dataset(make_dataset):
    """300 real digits; 10 % of the test labels wrong; the test samples
    pre-annotated from the train ones and evaluated; every label scored
    by find_label_mistakes."""
    dataset = make_dataset(n=300)
    test = dataset.match_tags("test")
    for rank, sample in enumerate(test.iter_samples(autosave=True)):
        if rank % FLIP_EVERY == 3:
            label = int(sample[GT].label)
            sample[GT].label = str((label + 1) % 10)
    compute_embeddings(
        dataset, model="pixels", image_size=12, num_workers=0, progress=False
    )
    index = prelabel.sync_index(dataset, progress=False)
    prelabel.preannotate(
        test,
        index=index,
        reference="train",
        pred_field=PRED,
        eval_key=EVAL_KEY,
        progress=False,
    )
    prelabel.find_label_mistakes(dataset, index=index, progress=False)
    return dataset


def mistakes(dataset):
    return dataset.exists(PRED).match(F(f"{PRED}.label") != F(f"{GT}.label"))


def plot_cell_position(plot, classes, truth, pred):
    """The centre of cell (truth row, pred column) of the heatmap, from
    the plot area's bounding box: ``len(classes)`` equal columns left to
    right and rows top to bottom (the y axis is reversed: the first class
    is the top row)."""
    box = plot.locator(".nsewdrag").first.bounding_box()
    n = len(classes)
    col, row = classes.index(pred), classes.index(truth)
    return (
        box["x"] + (col + 0.5) * box["width"] / n,
        box["y"] + (row + 0.5) * box["height"] / n,
    )


def test_mistakes_panel_row_and_cell_clicks_set_the_grid(app, dataset):
    page = app.page
    page.set_viewport_size(PANEL_VIEWPORT)
    app.open(dataset)
    num = len(mistakes(dataset))
    high = len(mistakes(dataset).match(F(f"{PRED}.confidence") > 0.9))
    assert num > 0 and high > 0, "the data must have confident mistakes"

    # the App's new-panel menu lists the panel by its label
    page.locator("[title='New panel']").first.click()
    page.get_by_text("Prelabel mistakes", exact=True).first.wait_for()
    app.shot("1-new-panel-menu")
    page.keyboard.press("Escape")

    # the operator opens it on our pre-labels and evaluation
    modal = app.open_operator("Open mistakes panel", "open_mistakes_panel")
    modal.get_by_text("Prediction field", exact=True).wait_for()
    app.execute(modal)
    page.get_by_text("Pre-label mistakes", exact=True).first.wait_for(
        timeout=TIMEOUT * 1000
    )
    summary = f"{num} mistakes, {high} above 0.9"
    page.get_by_text(summary, exact=True).wait_for()
    app.shot("2-panel")

    # a row: the sample and the neighbors that voted, in the grid
    row = page.locator("tbody tr").first
    filename = row.locator("td").first.inner_text().strip()
    (sample,) = [
        s for s in mistakes(dataset) if s.filepath.endswith("/" + filename)
    ]
    evidence = [sample.id] + [n for n in sample[PRED].neighbors]
    assert len(evidence) == 1 + 15
    row.locator("td").first.click()
    app.wait_view(
        lambda v: v.values("id") == evidence,
        f"the grid to show {filename} and its 15 voters",
    )
    page.get_by_text(f"Grid: sample {sample.id}").wait_for()
    app.shot("3-row-clicked")

    # a confusion-matrix cell: the most frequent confusion
    pairs = {}
    for t, p in zip(
        *mistakes(dataset).values([f"{GT}.label", f"{PRED}.label"]),
        strict=True,
    ):
        pairs[t, p] = pairs.get((t, p), 0) + 1
    (truth, pred), count = max(pairs.items(), key=lambda kv: kv[1])
    plot = page.locator(".js-plotly-plot").first
    plot.scroll_into_view_if_needed()
    classes = plot.evaluate("gd => gd.data[0].x.map(String)")
    assert plot.evaluate("gd => gd._fullLayout.yaxis.autorange") in (
        "reversed",
        True,
    )
    x, y = plot_cell_position(plot, classes, truth, pred)
    page.mouse.click(x, y)

    cell = dataset.load_evaluation_view(EVAL_KEY).match(
        (F(f"{GT}.label") == truth) & (F(f"{PRED}.label") == pred)
    )
    expected = set(cell.values("id"))
    assert len(expected) == count
    view = app.wait_view(
        lambda v: set(v.values("id")) == expected,
        f"the grid to show the {count} samples of truth {truth}, "
        f"pre-label {pred}",
    )
    assert len(view) == count
    page.get_by_text(
        f"Grid: {count} samples with ground truth {truth} and pre-label "
        f"{pred}"
    ).wait_for()
    app.shot("4-cell-clicked")

    # the two charts are laid out one after the other, each its own size
    coverage = page.locator(".js-plotly-plot").nth(1)
    coverage.scroll_into_view_if_needed()
    matrix_box, coverage_box = plot.bounding_box(), coverage.bounding_box()
    gap = coverage_box["y"] - (matrix_box["y"] + matrix_box["height"])
    assert 0 <= gap < 120, f"{gap} px between the two charts"
    assert matrix_box["width"] > 400 and coverage_box["height"] > 200
    assert coverage.evaluate("gd => gd.data.length") >= 2
    app.shot("5-coverage")

    # a class filter re-lists the rows; the panel then fits one screen
    panel = page.locator("body")
    app.choose(panel, "Ground truth class", truth)
    of_truth = mistakes(dataset).match(F(f"{GT}.label") == truth)
    above = len(of_truth.match(F(f"{PRED}.confidence") > 0.9))
    page.get_by_text(
        f"{len(of_truth)} mistakes, {above} above 0.9", exact=True
    ).wait_for()
    truth_cells = page.locator("tbody tr td:nth-child(2)")
    wait_until(
        lambda: truth_cells.all_inner_texts() == [truth] * len(of_truth),
        f"exactly the {len(of_truth)} rows of ground truth {truth}",
    )
    tabs = page.get_by_text("Pre-label mistakes", exact=True).first
    tabs.scroll_into_view_if_needed()
    page.mouse.move(0, 0)  # no hover label over the matrix
    page.wait_for_timeout(300)
    top = page.get_by_text("Prelabel mistakes", exact=True).first
    left = tabs.bounding_box()["x"]
    y0 = top.bounding_box()["y"] - 8
    bottom = plot.bounding_box()["y"] + plot.bounding_box()["height"]
    width = page.viewport_size["width"] - left
    app.shot(
        "6-filtered",
        clip=dict(x=left, y=y0, width=width, height=bottom - y0),
        docs_name="mistakes-panel.png",
    )
