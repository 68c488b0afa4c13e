"""The mistakes panel driven as the App drives it: the plugin is loaded
from a plugins directory by FiftyOne's plugin system, and every lifecycle
event (load, a change of mode or filter, a row click, a confusion-cell
click, a bulk action) is one ``foo.execute_operator`` call of the panel's
URI with the panel id, the panel state and the event's parameters, exactly
what the App sends. The operations the panel returns (state and data
patches, ``set_view``, ``open_panel``, ...) are read back from the
execution's executor and applied to a copy of the state, as the App would,
and the views they set are rebuilt with FiftyOne's own
``DatasetView._build`` and compared with the database.
"""

import copy
import os
import uuid

import fiftyone as fo
import fiftyone.core.view as fov
import fiftyone.operators as foo
import pydash
import pytest
from reviewed_digits import (
    EVAL_KEY,
    build_picked_dataset,
    build_reviewed_dataset,
    delete,
    label_from_truth,
)

import prelabel
from prelabel import constants
from prelabel import panel_data as pdata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = "@prelabel/qdrant"
PANEL_URI = f"{PLUGIN}/mistakes_panel"
#: what open_mistakes_panel passes as the panel's initial state
OPENED_BY_OPERATOR = {
    "pred_field": "prelabel",
    "gt_field": "ground_truth",
    "eval_key": EVAL_KEY,
}
_PLUMBING = {
    "patch_panel_state",
    "set_panel_state",
    "clear_panel_state",
    "patch_panel_data",
    "set_panel_data",
    "clear_panel_data",
    "show_panel_output",
}


@pytest.fixture(scope="module", autouse=True)
def plugins_dir(session_dir):
    """This repo as a plugin in a plugins dir (a symlink, as a developer
    installs it)."""
    path = os.path.join(session_dir, "plugins")
    os.makedirs(path, exist_ok=True)
    link = os.path.join(path, "prelabel-qdrant")
    if not os.path.islink(link):
        os.symlink(REPO, link)
    old = fo.config.plugins_dir
    fo.config.plugins_dir = path
    yield path
    fo.config.plugins_dir = old


@pytest.fixture(scope="module")
def dataset():
    dataset, _, _ = build_reviewed_dataset()
    yield dataset
    delete(dataset)


class App:
    """The App's side of one open panel: its state and data, and the
    operations the panel asked for besides them."""

    def __init__(self, dataset, state=None):
        self.dataset = dataset
        self.panel_id = uuid.uuid4().hex
        self.state = copy.deepcopy(state or {})
        self.data = {}
        self.output = None
        self.ops = []

    def event(self, method, **params):
        result = foo.execute_operator(
            PANEL_URI,
            ctx=dict(
                dataset=self.dataset,
                params={
                    **params,
                    "__method__": method,
                    "panel_id": self.panel_id,
                    "panel_state": copy.deepcopy(self.state),
                },
            ),
        )
        assert result.error is None, result.error
        self.ops = []
        for request in result.executor.to_json()["requests"]:
            name, p = request["operator_uri"], request["params"]
            if name in _PLUMBING:
                assert p["panel_id"] == self.panel_id
            if name == "patch_panel_state":
                for key, value in p["state"].items():
                    pydash.set_(self.state, key, copy.deepcopy(value))
            elif name == "patch_panel_data":
                for key, value in p["data"].items():
                    pydash.set_(self.data, key, copy.deepcopy(value))
            elif name == "show_panel_output":
                self.output = p["output"]
            elif name not in _PLUMBING:
                self.ops.append((name, p))
        return result

    def change(self, path, value, method):
        """A user edits the input at ``path``: the App writes the value
        into the state, then calls the input's ``on_change``."""
        pydash.set_(self.state, path, value)
        return self.event(method, path=path, value=value)

    def triggered(self, name):
        return [p for n, p in self.ops if n == name]

    def view_set(self):
        """The view of the last ``set_view``, rebuilt as the App does."""
        (params,) = self.triggered("set_view")
        return fov.DatasetView._build(self.dataset, params["view"])

    def prop(self, *path):
        """A property of the rendered panel, by its path."""
        node = self.output
        for name in path:
            node = node["type"]["properties"][name]
        return node

    def has(self, *path):
        try:
            self.prop(*path)
            return True
        except (KeyError, TypeError):
            return False


def _loaded(dataset, state=OPENED_BY_OPERATOR):
    app = App(dataset, state)
    app.event("on_load")
    return app


def _ids(view):
    return view.values("id")


def _by_id(collection, path):
    ids, values = collection.values(["id", path])
    return dict(zip(ids, values, strict=True))


# ---- load -------------------------------------------------------------------


def test_load_shows_rows_summary_and_charts_of_the_run(dataset):
    app = _loaded(dataset)
    state, data = app.state, app.data

    assert state["mode"] == "prelabel"
    assert state["source"] == {**OPENED_BY_OPERATOR}
    assert state["pred_field"] is None  # moved under "source"
    source = pdata.make_source(dataset, "prelabel")
    view = pdata.mistakes_view(dataset, source)
    assert data["rows"] == pdata.list_rows(view, source, limit=100)
    assert state["row_ids"] == _ids(view)[:100]
    assert state["summary"] == pdata.summarize(view, source).text
    assert state["summary"].endswith("above 0.9")

    confusion = pdata.confusion_matrix(
        dataset, "prelabel", "ground_truth", EVAL_KEY
    )
    (heatmap,) = data["confusion"]
    assert heatmap["type"] == "heatmap"
    assert heatmap["x"] == heatmap["y"] == confusion.classes
    assert heatmap["z"] == confusion.counts.tolist()
    curve = pdata.precision_coverage(
        dataset, "prelabel", "ground_truth", EVAL_KEY
    )
    assert data["coverage"][0]["x"] == curve.coverage.tolist()
    assert data["coverage"][0]["y"] == curve.precision.tolist()
    assert data["coverage"][1]["y"] == [0.99, 0.99]  # the target line
    assert state["coverage_text"] == curve.text

    # what the App draws
    tabs = app.prop("mode")
    assert tabs["view"]["name"] == "TabsView"
    assert [c["label"] for c in tabs["view"]["choices"]] == [
        "Pre-label mistakes",
        "Suspicious labels",
        "Label next",
    ]
    table = app.prop("rows")["view"]
    assert table["name"] == "TableView"
    assert [c["label"] for c in table["columns"]] == [
        "File",
        "Ground truth",
        "Pre-label",
        "Confidence",
        "Neighbors' vote",
    ]
    assert table["on_click_row"] == f"{PANEL_URI}#on_click_row"
    plot = app.prop("confusion")["view"]
    assert plot["name"] == "PlotlyView"
    assert plot["on_click"] == f"{PANEL_URI}#on_click_cell"
    assert app.prop("summary_md")["default"] == f"**{state['summary']}**"
    assert app.has("bulk", "tag_label_error")
    assert app.has("charts", "open_model_eval")
    assert app.has("coverage")


def test_load_from_the_panel_menu_finds_the_run_itself(dataset):
    app = _loaded(dataset, state={})
    assert app.state["source"] == {**OPENED_BY_OPERATOR}
    assert app.state["ready"] is True
    assert app.data["rows"]


def test_the_panel_keeps_its_state_when_the_view_changes():
    """The App calls a panel on a view change only if it has
    ``on_change_view``; this one has none, so nothing it holds (mode,
    filters, rows) is reset when a click of its own sets the view."""
    config = foo.get_operator(PANEL_URI).resolve_panel_config()
    assert "on_change_view" not in config
    assert config["on_load"] == f"{PANEL_URI}#on_load"
    assert config["on_change_dataset"] == f"{PANEL_URI}#on_change_dataset"


# ---- mode and filters -------------------------------------------------------


def test_filters_refilter_the_rows(dataset):
    app = _loaded(dataset)
    conf = _by_id(dataset, "prelabel.confidence")

    app.change("filters.min_score", 0.8, "on_change_filter")
    rows = app.data["rows"]
    assert rows and all(r["score"] >= 0.8 for r in rows)
    expected = [s for s in _ids_of_mistakes(dataset) if conf[s] >= 0.8]
    assert sorted(app.state["row_ids"]) == sorted(expected)
    assert app.state["summary"].startswith(f"{len(expected)} mistake")

    app.change("filters.truth", "9", "on_change_filter")
    assert all(r["truth"] == "9" for r in app.data["rows"])
    app.change("filters.pred", "8", "on_change_filter")
    assert all(
        (r["truth"], r["pred"]) == ("9", "8") and r["score"] >= 0.8
        for r in app.data["rows"]
    )
    view = pdata.mistakes_view(
        dataset,
        pdata.make_source(dataset, "prelabel"),
        pdata.Filters(0.8, "9", "8"),
    )
    assert app.state["row_ids"] == _ids(view)

    app.change("filters.truth", "(any)", "on_change_filter")
    app.change("filters.pred", "(any)", "on_change_filter")
    assert sorted(app.state["row_ids"]) == sorted(expected)


def _ids_of_mistakes(dataset):
    source = pdata.make_source(dataset, "prelabel")
    return _ids(pdata.mistakes_view(dataset, source))


def test_mode_switch_lists_suspicious_labels(dataset):
    app = _loaded(dataset)
    app.change("filters.min_score", 0.9, "on_change_filter")
    app.change("mode", "suspicious", "on_change_mode")

    source = pdata.make_source(dataset, "suspicious")
    view = pdata.mistakes_view(dataset, source)
    assert app.state["mode"] == "suspicious"
    assert app.state["filters"]["min_score"] == 0.0  # filters start over
    assert app.state["source"]["score_field"] == "mistake_score"
    assert app.state["row_ids"] == _ids(view)[:100]
    assert app.state["summary"].startswith(f"{len(view)} suspicious labels")
    columns = [c["label"] for c in app.prop("rows")["view"]["columns"]]
    assert columns[2:4] == ["Neighbors' majority", "Score"]
    assert not app.has("confusion")  # the charts are the pre-labels'
    assert app.has("source", "score_field")

    app.change("mode", "prelabel", "on_change_mode")
    assert app.state["row_ids"] == _ids_of_mistakes(dataset)[:100]
    assert app.has("confusion")


def test_show_more_pages_the_table(dataset):
    app = _loaded(dataset, state={**OPENED_BY_OPERATOR, "page_size": 10})
    total = app.state["count"]
    assert total > 20, "the fixture should have more than two pages"
    ids = _ids_of_mistakes(dataset)
    assert app.state["row_ids"] == ids[:10]
    assert app.prop("more", "shown_md")["default"] == (
        f"Showing the first 10 of {total}"
    )
    app.event("on_show_more")
    assert app.state["row_ids"] == ids[:20]
    assert [r["id"] for r in app.data["rows"]] == ids[:20]
    # a filter change starts again at one page
    app.change("filters.min_score", 0.0, "on_change_filter")
    assert app.state["row_ids"] == ids[:10]


# ---- clicks that set the view -----------------------------------------------


def test_row_click_shows_the_sample_and_its_voters(dataset):
    app = _loaded(dataset)
    app.event("on_click_row", row=2, path="rows", event="on_click_row")
    sample_id = app.state["row_ids"][2]
    neighbors = dataset[sample_id].prelabel.neighbors
    view = app.view_set()
    assert _ids(view) == [sample_id] + list(neighbors)
    assert "and its 15 nearest labeled neighbors" in app.state["showing"]

    app.event("on_open_sample", row=0, path="rows", event="open")
    first = app.state["row_ids"][0]
    assert _ids(app.view_set())[0] == first
    assert app.triggered("open_sample") == [{"id": first, "group_id": None}]

    app.event("on_click_row", row=10**6, path="rows")  # a stale row
    assert app.triggered("set_view") == []


def test_confusion_cell_click_shows_exactly_its_samples(dataset):
    app = _loaded(dataset)
    scope = dataset.load_evaluation_view(EVAL_KEY)
    ids, truths, preds = scope.values(
        ["id", "ground_truth.label", "prelabel.label"]
    )
    pairs = list(zip(ids, truths, preds, strict=True))
    # the most frequent confusion, as a user would click it
    off = [(t, p) for _, t, p in pairs if t != p]
    truth, pred = max(set(off), key=off.count)
    app.event("on_click_cell", x=pred, y=truth, z=off.count((truth, pred)))
    expected = {s for s, t, p in pairs if (t, p) == (truth, pred)}
    view = app.view_set()
    assert set(_ids(view)) == expected and len(view) == len(expected)
    assert f"{len(expected)} samples with ground truth {truth}" in (
        app.state["showing"]
    )

    # plotly may send a numeric category of a digit class
    app.event("on_click_cell", x=float(pred), y=int(truth))
    assert set(_ids(app.view_set())) == expected
    app.event("on_click_cell", x="no such class", y=truth)
    assert app.triggered("set_view") == []


def test_show_all_puts_the_whole_list_in_the_grid(dataset):
    app = _loaded(dataset)
    app.change("filters.min_score", 0.5, "on_change_filter")
    app.event("on_show_all")
    source = pdata.make_source(dataset, "prelabel")
    expected = pdata.mistakes_view(dataset, source, pdata.Filters(0.5))
    assert _ids(app.view_set()) == _ids(expected)


def test_model_evaluation_button_opens_fiftyones_panel_on_the_key(dataset):
    app = _loaded(dataset)
    app.event("on_open_model_eval")
    (params,) = app.triggered("open_panel")
    assert params["name"] == "model_evaluation_panel_builtin"
    assert params["state"]["view"] == {
        "page": "evaluation",
        "key": EVAL_KEY,
        "id": str(dataset._doc.evaluations[EVAL_KEY].id),
        "init": True,
    }
    # that panel is really FiftyOne's, registered under that name
    assert foo.get_operator(
        "@voxel51/panels/model_evaluation_panel_builtin"
    ).config.label == ("Model Evaluation")


# ---- bulk actions -----------------------------------------------------------


def test_bulk_tag_tags_every_row_of_the_filtered_list(dataset):
    app = _loaded(dataset)
    app.change("filters.truth", "8", "on_change_filter")
    expected = set(app.state["row_ids"])
    assert expected
    try:
        app.event("on_tag", tag="label_error")
        tagged = set(_ids(dataset.match_tags("label_error")))
        assert tagged == expected
        assert app.triggered("reload_dataset")
        (note,) = app.triggered("notify")
        assert note["message"] == (
            f"Tagged {len(expected)} samples 'label_error'"
        )
        # the list is the same after the reload that followed
        assert set(app.state["row_ids"]) == expected

        app.event("on_tag", tag="delete_everything")
        assert app.triggered("notify")[0]["variant"] == "error"
        assert not dataset.match_tags("delete_everything")
    finally:
        dataset.untag_samples("label_error")


def test_accept_copies_prelabels_into_a_new_field(dataset):
    app = _loaded(dataset)
    assert app.state["bulk"]["accept_field"] == "prelabel_accepted"
    app.change("filters.min_score", 0.9, "on_change_filter")
    expected = app.state["row_ids"]
    gt_before = dataset.values("ground_truth.label")
    try:
        app.event("on_accept")
        got = _by_id(dataset, "prelabel_accepted.label")
        pre = _by_id(dataset, "prelabel.label")
        assert {s for s, v in got.items() if v is not None} == set(expected)
        assert all(got[s] == pre[s] for s in expected)
        assert "Copied" in app.state["message"]

        # a text input without on_change: the App only writes the state
        pydash.set_(app.state, "bulk.accept_field", "ground_truth")
        app.event("on_accept")
        assert "would overwrite" in app.state["message"]
        assert app.triggered("notify")[0]["variant"] == "error"
        assert dataset.values("ground_truth.label") == gt_before
    finally:
        if dataset.has_sample_field("prelabel_accepted"):
            dataset.delete_sample_field("prelabel_accepted")


# ---- refresh and the empty state --------------------------------------------


def test_a_changed_field_is_picked_up_on_the_next_event(dataset):
    app = _loaded(dataset)
    before = app.data["confusion"][0]["z"]
    scope = dataset.load_evaluation_view(EVAL_KEY)
    sample = dataset[scope.first().id]
    old, pred = sample.ground_truth.label, sample.prelabel.label
    new = str((int(old) + 5) % 10)
    try:
        sample.ground_truth.label = new
        sample.save()
        app.change("filters.min_score", 0.0, "on_change_filter")
        after = app.data["confusion"][0]["z"]
        classes = app.state["confusion_classes"]
        i_new, i_old, j = (classes.index(c) for c in (new, old, pred))
        assert after[i_new][j] == before[i_new][j] + 1
        assert after[i_old][j] == before[i_old][j] - 1
        assert app.state["version"] == pdata.data_version(dataset)
    finally:
        sample.ground_truth.label = old
        sample.save()
    app.event("on_refresh")
    assert app.data["confusion"][0]["z"] == before


def test_normalized_confusion_and_target_precision(dataset):
    app = _loaded(dataset)
    app.change("charts.normalize", True, "on_change_charts")
    z = app.data["confusion"][0]["z"]
    assert all(abs(sum(row) - 1) < 1e-9 for row in z if sum(row))
    app.change("charts.target", 0.8, "on_change_charts")
    curve = pdata.precision_coverage(
        dataset, "prelabel", "ground_truth", EVAL_KEY, target=0.8
    )
    assert app.state["threshold"] == curve.threshold
    assert app.state["coverage_text"] == curve.text
    marker = app.data["coverage"][-1]
    assert marker["x"] == [curve.coverage_at_target]


def test_coverage_plot_shows_expected_against_measured(dataset):
    prelabel.preannotate(
        dataset.match_tags("test"),
        reference="train",
        pred_field="prelabel_accept",
        target_precision=0.8,
        progress=False,
    )
    try:
        app = _loaded(
            dataset,
            {"pred_field": "prelabel_accept", "gt_field": "ground_truth"},
        )
        exp = pdata.run_expectation(dataset, "prelabel_accept", "ground_truth")
        traces = {t["name"]: t for t in app.data["coverage"]}
        ref = traces["expected (references)"]
        assert ref["x"] == exp.coverage.tolist()
        assert ref["y"] == exp.precision.tolist()
        assert traces["accepted: expected"]["x"] == [exp.expected_coverage]
        measured = traces["accepted: measured"]
        assert measured["x"] == [exp.measured_coverage]
        assert measured["y"] == [exp.measured_precision]
        assert "accepted pre-labels" in traces  # the measured curve
        assert app.state["coverage_text"].endswith(exp.text)
    finally:
        dataset.delete_sample_field("prelabel_accept")
        dataset.untag_samples(constants.REVIEW_TAG)
        runs = dict(dataset.info["prelabel_runs"])
        runs.pop("prelabel_accept")
        dataset.info["prelabel_runs"] = runs
        dataset.save()


def test_without_a_run_the_panel_offers_the_operator():
    dataset = fo.Dataset()
    try:
        dataset.add_sample(
            fo.Sample(
                filepath="/nonexistent/a.png",
                ground_truth=fo.Classification(label="1"),
            )
        )
        app = _loaded(dataset, state={})
        assert app.state["ready"] is False
        notice = app.prop("no_run")["view"]
        assert notice["label"] == "Nothing to review yet"
        assert "kNN pre-annotate" in notice["description"]
        button = app.prop("no_run_actions", "run_preannotate")["view"]
        assert button["label"] == "Run kNN pre-annotate"

        app.event("on_run_preannotate")
        (prompt,) = app.triggered("prompt_user_for_operation")
        assert prompt["operator_uri"] == f"{PLUGIN}/knn_preannotate"
        assert prompt["on_success"] == f"{PANEL_URI}#on_refresh"
        app.event("on_run_find_mistakes")
        (prompt,) = app.triggered("prompt_user_for_operation")
        assert prompt["operator_uri"] == f"{PLUGIN}/find_label_mistakes"
    finally:
        dataset.delete()


def test_a_bad_field_from_the_operator_is_shown_not_raised(dataset):
    app = _loaded(
        dataset, state={"pred_field": "prelabel", "gt_field": "nope"}
    )
    assert "gt_field='nope'" in app.state["error"]
    assert app.prop("error")["view"]["label"] == "Cannot show this"


def test_another_run_is_picked_in_the_dropdown_and_its_removal_noticed(
    dataset,
):
    prelabel.preannotate(
        dataset.match_tags("test"),
        reference="train",
        pred_field="prelabel_k5",
        k=5,
        progress=False,
    )
    try:
        app = _loaded(dataset)
        choices = app.prop("source", "pred_field")["view"]["choices"]
        assert [c["value"] for c in choices] == ["prelabel", "prelabel_k5"]

        app.change("source.pred_field", "prelabel_k5", "on_change_source")
        assert app.state["source"] == {
            "pred_field": "prelabel_k5",
            "gt_field": "ground_truth",
            "eval_key": None,  # that run was not evaluated
        }
        source = pdata.make_source(dataset, "prelabel", "prelabel_k5")
        view = pdata.mistakes_view(dataset, source)
        assert app.state["row_ids"] == _ids(view)[:100]
        # without an evaluation: the matrix of every sample with both
        confusion = pdata.confusion_matrix(
            dataset, "prelabel_k5", "ground_truth"
        )
        assert app.data["confusion"][0]["z"] == confusion.counts.tolist()
        assert not app.has("charts", "open_model_eval")
    finally:
        dataset.delete_sample_field("prelabel_k5")

    # the field is gone: the next click reloads instead of failing
    app.event("on_click_row", row=0)
    assert app.triggered("set_view") == []
    assert app.state["source"]["pred_field"] == "prelabel"
    assert app.state["sources"]["prelabel"] == ["prelabel"]
    assert app.state["row_ids"] == _ids_of_mistakes(dataset)[:100]


# ---- label next -------------------------------------------------------------


@pytest.fixture
def picked():
    """200 digits, 80 labeled, 20 picked to label next; nothing else run
    on them (no pre-labels, no mistake scores)."""
    dataset, out = build_picked_dataset()
    yield dataset, out
    delete(dataset)


def test_label_next_without_a_selection_offers_the_operator(dataset):
    app = _loaded(dataset)
    app.change("mode", "label_next", "on_change_mode")
    assert app.state["mode"] == "label_next"
    assert app.state["ready"] is False and app.state["error"] is None
    notice = app.prop("no_picks")["view"]
    assert notice["label"] == "Nothing picked yet"
    assert app.prop("pick_next")["view"]["label"] == "Pick next batch"
    assert not app.has("rows") and not app.has("confusion")

    app.event("on_pick_next")
    (prompt,) = app.triggered("prompt_user_for_operation")
    assert prompt["operator_uri"] == f"{PLUGIN}/select_for_labeling"
    assert prompt["on_success"] == f"{PANEL_URI}#on_picked"
    # that operator is really the plugin's
    assert foo.get_operator(prompt["operator_uri"]).config.label == (
        "Select samples to label next"
    )

    # the two reviews are as they were
    app.change("mode", "prelabel", "on_change_mode")
    assert app.state["row_ids"] == _ids_of_mistakes(dataset)[:100]
    assert app.has("confusion")


def test_label_next_lists_the_picks_and_puts_them_in_the_grid(picked):
    dataset, out = picked
    # nothing to review but picks: the panel opens on them
    app = _loaded(dataset, state={})
    assert app.state["mode"] == "label_next"
    assert app.state["selections"] == ["label_next_reason"]
    picks = pdata.label_next(dataset)
    assert app.state["pick_ids"] == out.ids
    assert [r["id"] for r in app.data["picks"]] == out.ids
    assert [r["reason"] for r in app.data["picks"]] == out.reasons
    assert [r["rank"] for r in app.data["picks"]] == list(range(1, 21))
    assert {r["label"] for r in app.data["picks"]} == {"(not yet)"}
    assert app.prop("picks_md")["default"] == (
        "**Strategy spread: 20 picks, 0 labeled so far**"
    )
    assert app.prop("forecast_md")["default"] == picks.forecast_text
    assert app.state["forecast_text"].startswith(
        "Forecast when picked: labeling 20 more"
    )
    table = app.prop("picks")["view"]
    assert table["name"] == "TableView"
    assert [c["label"] for c in table["columns"]] == [
        "#",
        "File",
        "Label now",
        "Why picked",
    ]
    assert table["on_click_row"] == f"{PANEL_URI}#on_click_pick"
    tabs = app.prop("mode")["view"]["choices"]
    assert [c["value"] for c in tabs] == [
        "prelabel",
        "suspicious",
        "label_next",
    ]
    assert app.prop("source", "label_field_md")["default"] == (
        "Labels read from `ground_truth`"
    )
    assert app.has("pick_actions", "show_all_picks")
    assert app.has("pick_actions", "pick_next")
    assert not app.has("picks_more")  # one page holds them all

    # a row: that sample in the grid
    app.event("on_click_pick", row=3, path="picks", event="on_click_row")
    assert _ids(app.view_set()) == [out.ids[3]]
    assert app.state["showing"] == f"Grid: sample {out.ids[3]}, pick 4 of 20"
    assert app.prop("showing_md")["default"] == app.state["showing"]
    app.event("on_click_pick", row=10**6, path="picks")  # a stale row
    assert app.triggered("set_view") == []

    # every pick, as the saved view has them
    app.event("on_show_all_picks")
    assert _ids(app.view_set()) == out.ids
    assert _ids(app.view_set()) == _ids(dataset.load_saved_view("to_label"))
    assert app.state["showing"] == (
        "Grid: all 20 picks, in the order picked (saved view 'to_label')"
    )

    # a person labels three of them; the next refresh counts them
    label_from_truth(dataset, out.ids[:3])
    app.event("on_refresh")
    assert app.state["picks_text"] == (
        "Strategy spread: 20 picks, 3 labeled so far"
    )
    truth = _by_id(dataset, "truth.label")
    assert [r["label"] for r in app.data["picks"][:4]] == [
        truth[s] for s in out.ids[:3]
    ] + ["(not yet)"]

    # a pick deleted since the list was loaded: said, and the list reloaded
    dataset.delete_samples([out.ids[5]])
    app.event("on_click_pick", row=5, path="picks")
    assert app.triggered("set_view") == []
    (note,) = app.triggered("notify")
    assert note["variant"] == "warning"
    assert app.state["pick_ids"] == out.ids[:5] + out.ids[6:]
    assert app.state["picks_text"] == (
        "Strategy spread: 19 picks, 3 labeled so far; 1 deleted since"
    )


def test_label_next_pages_and_comes_back_after_a_new_batch(picked):
    dataset, out = picked
    app = _loaded(dataset, state={"page_size": 8})
    assert app.state["pick_ids"] == out.ids[:8]
    assert app.prop("picks_more", "picks_shown_md")["default"] == (
        "Showing the first 8 of 20"
    )
    app.event("on_show_more_picks")
    assert app.state["pick_ids"] == out.ids[:16]
    assert [r["id"] for r in app.data["picks"]] == out.ids[:16]
    app.event("on_show_more_picks")
    assert app.state["pick_ids"] == out.ids
    assert not app.has("picks_more")

    # on another tab, a new batch picked through the operator brings the
    # panel back to the picks
    app.change("mode", "suspicious", "on_change_mode")
    assert app.state["ready"] is False and app.has("no_run")
    second = prelabel.select_for_labeling(
        dataset, budget=6, seed=1, progress=False
    )
    app.event("on_picked")
    assert app.state["mode"] == "label_next"
    assert app.state["pick_ids"] == second.ids
    assert app.state["picks_text"].startswith("Strategy spread: 6 picks")
