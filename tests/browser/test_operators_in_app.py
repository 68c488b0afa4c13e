"""The plugin's operators in the App (issue 3), clicked in headless
Chromium: the operator browser lists them, their forms render, and
``knn_preannotate`` filled in (adapted embeddings, accepted at 99 %
precision) and executed from its form writes the prediction field, which
then shows in the sidebar with its count.

Each form is also saved as a screenshot (``docs/operator-<name>.png`` with
``PRELABEL_UPDATE_DOCS=1``), for the README.
"""

import fiftyone as fo
import pytest

import prelabel
from prelabel.embeddings import compute_embeddings

from .conftest import TIMEOUT, wait_until

pytestmark = pytest.mark.browser
expect = pytest.importorskip("playwright.sync_api").expect

PRED_FIELD = "knn_pred"
#: the viewport of the form screenshots: tall enough for most forms
FORM_VIEWPORT = {"width": 1100, "height": 1600}
#: (operator name, its label, a text its resolved form shows)
FORMS = {
    "compute_embeddings": ("Compute embeddings", "Model"),
    "sync_index": ("Sync Qdrant index", "Embeddings field"),
    "adapt_embeddings": ("Adapt embeddings to labels", "Label field"),
    "knn_preannotate": ("kNN pre-annotate", "Index (brain key)"),
    "find_label_mistakes": ("Find label mistakes", "Score field"),
    "open_mistakes_panel": ("Open mistakes panel", "Prediction field"),
}


@pytest.fixture
def dataset(make_dataset):
    """300 real digits (150 ``train``, 150 ``test``) with pixel vectors
    and a prelabel index: what the first two operators make."""
    dataset = make_dataset(n=300)
    compute_embeddings(
        dataset, model="pixels", image_size=12, num_workers=0, progress=False
    )
    prelabel.sync_index(dataset, progress=False)
    return dataset


def open_form(app, name):
    label, ready = FORMS[name]
    modal = app.open_operator(label, name)
    modal.get_by_text(ready, exact=True).first.wait_for()
    return modal


def shoot_form(app, modal, name):
    """Screenshots the form once it is resolved and valid (its Execute
    button is enabled)."""
    execute = modal.get_by_role("button", name="Execute", exact=True)
    expect(execute).to_be_enabled(timeout=TIMEOUT * 1000)
    app.page.wait_for_timeout(300)  # let the last re-render settle
    app.shot(f"form-{name}", locator=modal, docs_name=f"operator-{name}.png")


def close_form(app, modal):
    modal.get_by_role("button", name="Cancel", exact=True).click()
    modal.wait_for(state="detached")


def test_knn_preannotate_from_the_operator_browser(app, dataset):
    page = app.page
    page.set_viewport_size(FORM_VIEWPORT)
    targets = dataset.match_tags("test")
    app.open(dataset, view=targets)
    gt_before = dataset.values("ground_truth.label")

    # compute_embeddings into a new field (the default model differs
    # from the vectors already in 'embeddings': that form is refused)
    modal = open_form(app, "compute_embeddings")
    app.fill(modal, "Embeddings field", "embeddings_lite0")
    modal.get_by_text(
        "'embeddings_lite0' is new; it will be created"
    ).wait_for()
    shoot_form(app, modal, "compute_embeddings")
    close_form(app, modal)

    modal = open_form(app, "sync_index")
    shoot_form(app, modal, "sync_index")
    close_form(app, modal)

    modal = open_form(app, "adapt_embeddings")
    app.choose(modal, "Reference tag", "train")
    modal.get_by_text(
        "150 labeled samples train it; writes 'embeddings_adapted' and "
        "the index 'prelabel_qdrant_adapted'"
    ).wait_for()
    shoot_form(app, modal, "adapt_embeddings")
    close_form(app, modal)

    # kNN pre-annotate on the current view (the test samples), only the
    # train samples vote, into a new field
    modal = open_form(app, "knn_preannotate")
    app.choose(modal, "Reference tag", "train")
    app.fill(modal, "Prediction field", PRED_FIELD)
    # the one-click setting: adapted embeddings, accepted at 99 %
    modal.get_by_text("Adapted embeddings", exact=True).click()
    app.fill(modal, "Accept at precision", 0.99)
    modal.get_by_text(
        "150 targets; 150 labeled samples vote (tag 'train')"
    ).wait_for()
    shoot_form(app, modal, "knn_preannotate")
    app.execute(modal)

    # the sidebar gets the field; expanded, it shows its count
    page.locator(f"[data-cy=sidebar-field-{PRED_FIELD}]").wait_for(
        timeout=TIMEOUT * 1000
    )
    done = page.locator("[data-cy=operators-prompt-modal]")
    done.get_by_text("Pre-annotation done").wait_for()
    app.shot("1-done")
    done.get_by_role("button", name="Close", exact=True).click()
    page.click(f"[data-cy=sidebar-field-arrow-enabled-{PRED_FIELD}]")
    count = page.locator(
        f"[data-cy=sidebar-field-container-{PRED_FIELD}] "
        "[data-cy=entry-count-all]"
    )
    wait_until(
        lambda: count.inner_text().strip() == "150",
        f"'{PRED_FIELD}' to show 150 in the sidebar",
    )
    app.shot("2-sidebar")

    # what the database holds, and what the App shows
    assert dataset.count(PRED_FIELD) == 150
    assert set(dataset.exists(PRED_FIELD).values("id")) == set(
        targets.values("id")
    )
    assert dataset.get_field(PRED_FIELD).document_type is fo.Classification
    assert dataset.values("ground_truth.label") == gt_before
    # the form's method and threshold reached the run
    run = dataset.info["prelabel_runs"][PRED_FIELD]
    assert run["mode"] == "adapted" and run["target_precision"] == 0.99
    accepted = dataset.count_values(f"{PRED_FIELD}.accepted")
    assert accepted.get(True, 0) + accepted.get(False, 0) == 150
    assert accepted.get(False, 0) == dataset.count_sample_tags().get(
        "needs_review", 0
    )
    assert "prelabel_eval" in dataset.list_evaluations()
    view = app.wait_view(
        lambda v: len(v) == 150 and PRED_FIELD in str(v._stages),
        "the App to show the pre-annotated samples",
    )
    confidences = view.values(f"{PRED_FIELD}.confidence")
    assert confidences == sorted(confidences, reverse=True)
    wait_until(lambda: app.grid_count() == 150, "'150 samples' in the grid")

    # the other two forms, now that there is something to review
    for name in ("find_label_mistakes", "open_mistakes_panel"):
        modal = open_form(app, name)
        shoot_form(app, modal, name)
        close_form(app, modal)
