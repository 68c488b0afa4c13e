"""Step 5 of the workflow: review the mistakes.

The ``mistakes_panel`` lists the pre-labels that disagree with ground truth
(most confident first) or the labels their neighbors disagree with (most
suspicious first), shows each row's neighbors as evidence, tags or accepts
rows in bulk, and draws the evaluation's confusion matrix and the
precision a confidence threshold keeps. It writes only tags and, on
request, a new field of accepted labels; never ground truth. A third tab,
"Label next", lists the latest picks of ``select_for_labeling`` with the
reason of each and which ones are labeled by now, and opens that operator
for the next batch.

Thin by design: every number comes from :mod:`prelabel.panel_data`; this
module keeps the panel state, renders it, and turns clicks into views.

State (``ctx.panel.state``; what the App keeps across view changes):

- ``source``: the fields reviewed: ``pred_field``, ``gt_field``,
  ``eval_key`` (pre-label mode), ``score_field`` (suspicious mode); the
  ``open_mistakes_panel`` operator passes the first three at top level
- ``mode``: ``"prelabel"``, ``"suspicious"`` or ``"label_next"``
- ``filters``: ``min_score``, ``truth``, ``pred`` (``"(any)"`` for none)
- ``charts``: ``normalize``, ``target``
- ``bulk``: ``accept_field``
- ``limit``, ``row_ids``: the rows on screen; ``page_size`` (optional,
  default 100): rows added per "Show more"
- ``summary``, ``classes``, ``sources``, ``eval_keys``, ``coverage_text``,
  ``showing``, ``message``, ``version``: what the last load found
- label-next mode: ``selections`` (the reason fields of the dataset's
  selections), ``pick_ids`` (the picks on screen), ``picks_count``,
  ``picks_text``, ``forecast_text``, ``picks_label_field``

Data (``ctx.panel.data``, write-only): ``rows``, ``confusion``,
``coverage`` (the table and the two plots); ``picks`` (label-next mode's
table).
"""

import fiftyone.operators.types as types
from fiftyone.operators.categories import Categories
from fiftyone.operators.panel import Panel, PanelConfig

from prelabel import constants
from prelabel import panel_data as pdata

NAME = "mistakes_panel"
#: FiftyOne's built-in Model Evaluation panel
MODEL_EVAL_PANEL = "model_evaluation_panel_builtin"
#: rows added per "Show more"
PAGE = 100
#: rows the table shows at most (the grid shows them all)
MAX_ROWS = 1000
#: the class filters' "no filter" choice
ANY = "(any)"

_COLUMNS = {
    "prelabel": ("Pre-label", "Confidence"),
    "suspicious": ("Neighbors' majority", "Score"),
}
_TAG_HELP = {
    "label_error": "the ground-truth label is wrong",
    "prelabel_ok": "the pre-label is right",
    constants.REVIEW_TAG: "a person should look again",
}


def _op_uri(name):
    return f"{constants.PLUGIN_NAME}/{name}"


class MistakesPanel(Panel):
    @property
    def config(self):
        return PanelConfig(
            name=NAME,
            label="Prelabel mistakes",
            icon="fact_check",
            category=Categories.CURATE,
            surfaces="grid",
            help_markdown=(
                "Pre-labels that disagree with ground truth and labels "
                "their neighbors disagree with, most confident first. "
                "Click a row to see the sample with the neighbors that "
                "voted; click a confusion-matrix cell to see its samples. "
                "'Label next' lists the samples picked to label next and "
                "why."
            ),
        )

    # ---- lifecycle ----------------------------------------------------

    def on_load(self, ctx):
        state = ctx.panel.state
        source = dict(state.get("source") or {})
        # the open_mistakes_panel operator passes its choice at top level
        for key in ("pred_field", "gt_field", "eval_key", "score_field"):
            if state.get(key) is not None:
                source[key] = state.get(key)
        ctx.panel.set_state(
            {
                "source": source,
                "pred_field": None,
                "gt_field": None,
                "eval_key": None,
                "score_field": None,
            }
        )
        self._load(ctx)

    def on_change_dataset(self, ctx):
        ctx.panel.set_state(
            {"source": {}, "mode": None, "filters": {}, "showing": None}
        )
        self._load(ctx)

    def on_refresh(self, ctx):
        ctx.panel.set_state("message", None)
        self._load(ctx)

    def on_change_mode(self, ctx):
        # scores of the two modes are not comparable: start unfiltered
        ctx.panel.set_state(
            {
                "mode": ctx.params.get("value") or ctx.panel.state.mode,
                "filters": {"min_score": 0.0, "truth": ANY, "pred": ANY},
                "message": None,
                "showing": None,
            }
        )
        self._load(ctx)

    def on_change_source(self, ctx):
        if ctx.params.get("path") == "source.pred_field":
            # another run may have voted with other labels and evaluations
            ctx.panel.set_state(
                {"source.gt_field": None, "source.eval_key": None}
            )
        self._load(ctx)

    def on_change_filter(self, ctx):
        if self._stale(ctx):
            self._load(ctx)
        else:
            ctx.panel.set_state("limit", _page(ctx))
            self._load_rows(ctx, self._source(ctx))

    def on_show_more(self, ctx):
        page = _page(ctx)
        limit = min(int(ctx.panel.state.limit or page) + page, MAX_ROWS)
        ctx.panel.set_state("limit", limit)
        self._load_rows(ctx, self._source(ctx))

    def on_change_charts(self, ctx):
        self._load_charts(ctx, self._source(ctx))

    # ---- clicks that set the App's view --------------------------------

    def on_click_row(self, ctx):
        self._show_evidence(ctx)  # a handler returns nothing to the App

    def _show_evidence(self, ctx):
        """Puts the row's evidence in the grid; returns that view."""
        sample_id = self._row_id(ctx)
        source = self._source(ctx)
        if sample_id is None or source is None:
            return
        try:
            view = pdata.evidence_view(ctx.dataset, sample_id, source)
        except ValueError as e:  # deleted since the list was loaded
            ctx.ops.notify(str(e), variant="warning")
            self._load(ctx)
            return
        ctx.ops.set_view(view)
        what = "box" if source.boxes else "sample"
        ctx.panel.set_state(
            "showing",
            f"Grid: {what} {sample_id} and its {len(view) - 1} nearest "
            "labeled neighbors (the vote's evidence)",
        )
        return view

    def on_open_sample(self, ctx):
        view = self._show_evidence(ctx)
        if view is not None:
            # the row's sample, or its box in the patches view
            ctx.ops.open_sample(id=view.first().id)

    def on_click_cell(self, ctx):
        source = self._source(ctx)
        classes = ctx.panel.state.get("confusion_classes") or []
        truth = _category(ctx.params.get("y"), classes)
        pred = _category(ctx.params.get("x"), classes)
        if source is None or truth is None or pred is None:
            return
        st = ctx.panel.state
        view = pdata.confusion_cell_view(
            ctx.dataset,
            source.pred_field,
            source.gt_field,
            truth,
            pred,
            eval_key=st.get("source.eval_key"),
        )
        ctx.ops.set_view(view)
        ctx.panel.set_state(
            "showing",
            f"Grid: {len(view)} samples with ground truth {truth} and "
            f"pre-label {pred}",
        )

    def on_show_all(self, ctx):
        source = self._source(ctx)
        if source is None:
            return
        view = pdata.mistakes_view(ctx.dataset, source, self._filters(ctx))
        ctx.ops.set_view(view)
        ctx.panel.set_state(
            "showing", f"Grid: all {len(view)} rows of the list, in order"
        )

    def on_open_model_eval(self, ctx):
        eval_key = ctx.panel.state.get("source.eval_key")
        if not eval_key:
            return
        eval_id = str(ctx.dataset._doc.evaluations[eval_key].id)
        ctx.ops.open_panel(
            MODEL_EVAL_PANEL,
            state={
                "view": {
                    "page": "evaluation",
                    "key": eval_key,
                    "id": eval_id,
                    "init": True,
                }
            },
        )

    # ---- bulk actions ---------------------------------------------------

    def on_tag(self, ctx):
        tag = ctx.params.get("tag")
        if tag not in pdata.TAGS:
            ctx.ops.notify(f"Unknown tag {tag!r}", variant="error")
            return
        source = self._source(ctx)
        if source is None:
            return
        view = pdata.mistakes_view(ctx.dataset, source, self._filters(ctx))
        count = pdata.tag_samples(view, tag, source)
        what = "boxes" if source.boxes else "samples"
        ctx.ops.reload_dataset()
        ctx.ops.notify(f"Tagged {count} {what} '{tag}'", variant="success")
        self._load(ctx)

    def on_accept(self, ctx):
        source = self._source(ctx)
        if source is None:
            return
        field = (ctx.panel.state.get("bulk.accept_field") or "").strip()
        field = field or _accept_default(source)
        view = pdata.mistakes_view(ctx.dataset, source, self._filters(ctx))
        try:
            count = pdata.accept_labels(view, source, field)
        except ValueError as e:
            ctx.panel.set_state("message", str(e))
            ctx.ops.notify(str(e), variant="error")
            return
        ctx.panel.set_state(
            "message",
            f"Copied {count} labels of '{source.pred_field}' into "
            f"'{field}'",
        )
        ctx.ops.reload_dataset()
        ctx.ops.notify(
            f"Copied {count} labels into '{field}'", variant="success"
        )
        self._load(ctx)

    # ---- no run yet ------------------------------------------------------

    def on_run_preannotate(self, ctx):
        ctx.prompt(_op_uri("knn_preannotate"), on_success=self.on_refresh)

    def on_run_find_mistakes(self, ctx):
        ctx.prompt(_op_uri("find_label_mistakes"), on_success=self.on_refresh)

    def on_pick_next(self, ctx):
        ctx.prompt(_op_uri("select_for_labeling"), on_success=self.on_picked)

    def on_picked(self, ctx):
        """After a selection: its picks, whatever tab was open."""
        ctx.panel.set_state(
            {"mode": pdata.LABEL_NEXT, "message": None, "showing": None}
        )
        self._load(ctx)

    # ---- label next ---------------------------------------------------------

    def on_click_pick(self, ctx):
        """Puts the clicked pick in the grid."""
        row = ctx.params.get("row")
        ids = ctx.panel.state.pick_ids or []
        if row is None or not 0 <= int(row) < len(ids):
            return
        sample_id = ids[int(row)]
        try:
            view = pdata.pick_view(ctx.dataset, sample_id)
        except ValueError as e:  # deleted since the list was loaded
            ctx.ops.notify(str(e), variant="warning")
            self._load(ctx)
            return
        ctx.ops.set_view(view)
        ctx.panel.set_state(
            "showing",
            f"Grid: sample {sample_id}, pick {int(row) + 1} of "
            f"{int(ctx.panel.state.picks_count or len(ids))}",
        )

    def on_show_all_picks(self, ctx):
        picks = pdata.label_next(ctx.dataset)
        if picks is None:
            self._load(ctx)
            return
        view = pdata.picks_view(ctx.dataset, picks)
        ctx.ops.set_view(view)
        where = f" (saved view '{picks.view_name}')" if picks.view_name else ""
        ctx.panel.set_state(
            "showing",
            f"Grid: all {len(view)} picks, in the order picked{where}",
        )

    def on_show_more_picks(self, ctx):
        page = _page(ctx)
        limit = min(int(ctx.panel.state.limit or page) + page, MAX_ROWS)
        ctx.panel.set_state("limit", limit)
        self._load_label_next(ctx)

    # ---- loading ----------------------------------------------------------

    def _load(self, ctx):
        """Re-reads everything: sources, rows, summary, charts."""
        dataset = ctx.dataset
        state = ctx.panel.state
        sources = pdata.find_sources(dataset)
        selections = pdata.selection_fields(dataset)
        mode = state.mode
        if mode not in pdata.PANEL_MODES:
            mode = "prelabel" if sources["prelabel"] else "suspicious"
            if not sources["suspicious"] and selections:
                mode = pdata.LABEL_NEXT
        updates = {
            "sources": sources,
            "selections": selections,
            "mode": mode,
            "version": pdata.data_version(dataset),
        }
        if state.get("filters.min_score") is None:
            updates["filters"] = {"min_score": 0.0, "truth": ANY, "pred": ANY}
        if state.get("charts.target") is None:
            updates["charts"] = {
                "normalize": bool(state.get("charts.normalize")),
                "target": pdata.DEFAULT_TARGET_PRECISION,
            }
        if not state.get("bulk.accept_field"):
            updates["bulk"] = {"accept_field": ""}
        ctx.panel.set_state(updates)
        if mode == pdata.LABEL_NEXT:
            ctx.panel.set_state("limit", _page(ctx))
            self._load_label_next(ctx)
            return
        try:
            source = self._resolve_source(ctx, mode, sources)
        except ValueError as e:
            ctx.panel.set_state({"error": str(e), "ready": False})
            return
        if source is None:
            ctx.panel.set_state({"error": None, "ready": False})
            return
        ctx.panel.set_state(
            {
                "error": None,
                "ready": True,
                "limit": _page(ctx),
            }
        )
        if not state.get("bulk.accept_field"):
            ctx.panel.set_state("bulk.accept_field", _accept_default(source))
        self._load_rows(ctx, source, classes=True)
        self._load_charts(ctx, source)

    def _resolve_source(self, ctx, mode, sources):
        dataset = ctx.dataset
        chosen = dict(ctx.panel.state.get("source") or {})
        if mode == "prelabel":
            pred = chosen.get("pred_field")
            if pred not in sources["prelabel"]:
                pred = None
            gt = chosen.get("gt_field")
            if pred is None or gt is None:
                gt = None
            source = pdata.make_source(dataset, mode, pred, gt)
            if source is None:
                return None
            eval_keys = pdata.eval_keys_for(dataset, source.pred_field)
            eval_key = chosen.get("eval_key")
            if eval_key not in eval_keys:
                eval_key = (
                    constants.DEFAULT_EVAL_KEY
                    if constants.DEFAULT_EVAL_KEY in eval_keys
                    else (eval_keys[0] if eval_keys else None)
                )
            chosen.update(
                pred_field=source.pred_field,
                gt_field=source.gt_field,
                eval_key=eval_key,
            )
        else:
            score = chosen.get("score_field")
            if score not in sources["suspicious"]:
                score = None
            source = pdata.make_source(
                dataset,
                mode,
                gt_field=chosen.get("gt_field"),
                score_field=score,
            )
            if source is None:
                return None
            eval_keys = []
            chosen.update(
                gt_field=source.gt_field,
                score_field=source.score_field,
                boxes=source.boxes,
            )
        ctx.panel.set_state({"source": chosen, "eval_keys": eval_keys})
        return source

    def _load_rows(self, ctx, source, classes=False):
        """The rows and their summary; with ``classes``, the class
        filters' choices too (from the same read when no filter is on)."""
        if source is None:
            return
        state = ctx.panel.state
        filters = self._filters(ctx)
        view = pdata.mistakes_view(ctx.dataset, source, filters)
        limit = int(state.limit or _page(ctx))
        shown = pdata.page(view, source, limit=limit)
        rows, summary = shown.rows, shown.summary
        if classes:
            choices = shown.classes
            if filters != pdata.Filters():
                choices = pdata.class_choices(ctx.dataset, source)
            ctx.panel.set_state("classes", choices)
        ctx.panel.set_data("rows", rows)
        ctx.panel.set_state(
            {
                # the App copies the table's values into the state and
                # shows state and data merged index by index: a longer
                # stale copy would leave old rows under the new ones
                "rows": None,
                "row_ids": [r["id"] for r in rows],
                "summary": summary.text,
                "count": summary.count,
            }
        )

    def _load_charts(self, ctx, source):
        state = ctx.panel.state
        if source is None or source.mode != "prelabel":
            ctx.panel.set_state({"has_charts": False, "coverage_text": None})
            return
        dataset = ctx.dataset
        eval_key = state.get("source.eval_key")
        normalize = bool(state.get("charts.normalize"))
        target = float(
            state.get("charts.target") or pdata.DEFAULT_TARGET_PRECISION
        )
        target = min(max(target, 0.5), 1.0)
        plots = pdata.charts(
            dataset, source.pred_field, source.gt_field, eval_key, target
        )
        confusion, curve = plots.confusion, plots.coverage
        expected = plots.expectation
        ctx.panel.set_data("confusion", _heatmap(confusion, normalize))
        ctx.panel.set_data("coverage", _coverage_traces(curve, expected))
        ctx.panel.set_state(
            {
                # no stale copies of the plots' values (see _load_rows)
                "confusion": None,
                "coverage": None,
                "has_charts": bool(confusion.classes),
                "confusion_classes": confusion.classes,
                "coverage_text": curve.text
                + (f"\n\n{expected.text}" if expected else ""),
                "threshold": curve.threshold,
            }
        )

    def _load_label_next(self, ctx):
        """Re-reads the latest selection: its picks, their labels now."""
        state = ctx.panel.state
        no_charts = {"has_charts": False, "coverage_text": None}
        try:
            picks = pdata.label_next(ctx.dataset)
        except ValueError as e:
            ctx.panel.set_state({**no_charts, "error": str(e), "ready": False})
            return
        if picks is None:
            ctx.panel.set_state({**no_charts, "error": None, "ready": False})
            return
        limit = int(state.limit or _page(ctx))
        shown = picks.rows[:limit]
        ctx.panel.set_data("picks", [_pick_row(r) for r in shown])
        ctx.panel.set_state(
            {
                **no_charts,
                "error": None,
                "ready": True,
                # no stale copy of the table's values (see _load_rows)
                "picks": None,
                "pick_ids": [r["id"] for r in shown],
                "picks_count": len(picks.rows),
                "picks_text": picks.text,
                "forecast_text": picks.forecast_text,
                "picks_label_field": picks.label_field,
            }
        )

    def _stale(self, ctx):
        return ctx.panel.state.version != pdata.data_version(ctx.dataset)

    # ---- state readers ---------------------------------------------------

    def _source(self, ctx):
        """The fields the state names; None (and the panel reloaded, to
        say why) if they no longer exist."""
        state = ctx.panel.state
        chosen = state.get("source") or {}
        try:
            source = pdata.make_source(
                ctx.dataset,
                "suspicious" if state.mode == "suspicious" else "prelabel",
                pred_field=chosen.get("pred_field"),
                gt_field=chosen.get("gt_field"),
                score_field=chosen.get("score_field"),
            )
        except ValueError:
            source = None
        if source is None:
            self._load(ctx)
        return source

    def _filters(self, ctx):
        filters = ctx.panel.state.get("filters") or {}

        def cls(value):
            return None if value in (None, "", ANY) else str(value)

        return pdata.Filters(
            min_score=float(filters.get("min_score") or 0.0),
            truth=cls(filters.get("truth")),
            pred=cls(filters.get("pred")),
        )

    def _row_id(self, ctx):
        row = ctx.params.get("row")
        ids = ctx.panel.state.row_ids or []
        if row is None or not 0 <= int(row) < len(ids):
            return None
        return ids[int(row)]

    # ---- rendering ---------------------------------------------------------

    def render(self, ctx):
        panel = types.Object()
        state = ctx.panel.state
        sources = state.sources or {}
        if (
            not sources.get("prelabel")
            and not sources.get("suspicious")
            and not state.selections
        ):
            self._render_no_run(panel)
            return _layout(panel)

        mode = state.mode or "prelabel"
        self._render_header(panel, state, mode)
        if state.error:
            panel.view(
                "error",
                types.Error(label="Cannot show this", description=state.error),
            )
            return _layout(panel)
        if mode == pdata.LABEL_NEXT:
            self._render_label_next(panel, state)
            return _layout(panel)
        if not state.ready:
            self._render_missing_mode(panel, mode)
            return _layout(panel)

        self._render_filters(panel, state)
        panel.md(f"**{state.summary}**", name="summary_md")
        if state.showing:
            panel.md(state.showing, name="showing_md")
        self._render_bulk(panel, mode, bool(state.get("source.boxes")))
        if state.message:
            panel.md(state.message, name="message_md")
        self._render_table(panel, state, mode)
        if mode == "prelabel" and state.has_charts:
            self._render_charts(panel, state)
        return _layout(panel)

    def _render_no_run(self, panel):
        panel.view(
            "no_run",
            types.Notice(
                label="Nothing to review yet",
                description=(
                    "Run 'kNN pre-annotate' to pre-label samples from "
                    "their labeled neighbors (with an evaluation key for "
                    "the confusion matrix), 'Find label mistakes' to "
                    "score the existing labels, or pick the samples to "
                    "label first."
                ),
            ),
        )
        buttons = panel.h_stack("no_run_actions", gap=2)
        buttons.btn(
            "run_preannotate",
            label="Run kNN pre-annotate",
            variant="contained",
            on_click=self.on_run_preannotate,
        )
        buttons.btn(
            "run_find_mistakes",
            label="Find label mistakes",
            variant="outlined",
            on_click=self.on_run_find_mistakes,
        )
        buttons.btn(
            "pick_next",
            label="Pick samples to label",
            variant="outlined",
            on_click=self.on_pick_next,
        )
        buttons.btn("refresh", label="Refresh", on_click=self.on_refresh)

    def _render_header(self, panel, state, mode):
        tabs = types.TabsView()
        for value, label in pdata.PANEL_MODES.items():
            tabs.add_choice(value, label=label)
        panel.enum(
            "mode",
            list(pdata.PANEL_MODES),
            default=mode,
            view=tabs,
            on_change=self.on_change_mode,
        )
        source = panel.h_stack("source", gap=2, align_y="center")
        sources = state.sources or {}
        chosen = state.get("source") or {}
        if mode == "prelabel" and sources.get("prelabel"):
            _dropdown(
                source,
                "pred_field",
                sources["prelabel"],
                chosen.get("pred_field"),
                "Pre-label field",
                self.on_change_source,
            )
            if state.eval_keys:
                _dropdown(
                    source,
                    "eval_key",
                    state.eval_keys,
                    chosen.get("eval_key"),
                    "Evaluation",
                    self.on_change_source,
                )
        elif mode == "suspicious" and sources.get("suspicious"):
            _dropdown(
                source,
                "score_field",
                sources["suspicious"],
                chosen.get("score_field"),
                "Score field",
                self.on_change_source,
            )
        if mode == pdata.LABEL_NEXT:
            if state.picks_label_field:
                source.md(
                    f"Labels read from `{state.picks_label_field}`",
                    name="label_field_md",
                )
        elif chosen.get("gt_field"):
            source.md(
                f"Ground truth: `{chosen['gt_field']}`", name="gt_field_md"
            )
        source.btn(
            "refresh",
            label="Refresh",
            icon="refresh",
            on_click=self.on_refresh,
        )

    def _render_missing_mode(self, panel, mode):
        if mode == "prelabel":
            text = (
                "No pre-labels on this dataset yet: run 'kNN pre-annotate' "
                "(with an evaluation key for the confusion matrix)."
            )
            action = ("run_preannotate", "Run kNN pre-annotate")
            handler = self.on_run_preannotate
        else:
            text = (
                "No label-mistake scores on this dataset yet: run 'Find "
                "label mistakes'."
            )
            action = ("run_find_mistakes", "Find label mistakes")
            handler = self.on_run_find_mistakes
        panel.view(
            "no_run", types.Notice(label="No run yet", description=text)
        )
        panel.btn(
            action[0], label=action[1], variant="contained", on_click=handler
        )

    def _render_label_next(self, panel, state):
        if not state.ready:
            panel.view(
                "no_picks",
                types.Notice(
                    label="Nothing picked yet",
                    description=(
                        "No samples were picked to label on this dataset "
                        "yet: pick a batch (it reads a prelabel index; run "
                        "'Sync index' first if there is none)."
                    ),
                ),
            )
            panel.btn(
                "pick_next",
                label="Pick next batch",
                variant="contained",
                on_click=self.on_pick_next,
            )
            return
        panel.md(f"**{state.picks_text}**", name="picks_md")
        panel.md(state.forecast_text or "", name="forecast_md")
        if state.showing:
            panel.md(state.showing, name="showing_md")
        actions = panel.h_stack("pick_actions", gap=2, align_y="center")
        actions.btn(
            "show_all_picks",
            label="Show all picks",
            variant="contained",
            on_click=self.on_show_all_picks,
        )
        actions.btn(
            "pick_next",
            label="Pick next batch",
            variant="outlined",
            on_click=self.on_pick_next,
        )
        # the App's tables are at least 650 px wide, wider than a panel
        # beside the grid: this one wraps its reasons instead
        table = types.TableView(
            on_click_row=self.on_click_pick,
            componentsProps={"table": {"sx": {"minWidth": 0}}},
        )
        table.add_column("rank", label="#")
        table.add_column("filename", label="File")
        table.add_column("label", label="Label now")
        table.add_column("reason", label="Why picked")
        panel.list("picks", types.Object(), view=table)
        shown = len(state.pick_ids or [])
        count = int(state.picks_count or 0)
        if shown < count:
            more = panel.h_stack("picks_more", gap=2, align_y="center")
            more.md(
                f"Showing the first {shown} of {count}", name="picks_shown_md"
            )
            if shown < MAX_ROWS:
                more.btn(
                    "show_more_picks",
                    label="Show more",
                    on_click=self.on_show_more_picks,
                )

    def _render_filters(self, panel, state):
        filters = panel.h_stack("filters", gap=2, align_y="center")
        mode = state.mode
        score_label = _COLUMNS[mode][1]
        filters.float(
            "min_score",
            label=f"Minimum {score_label.lower()}",
            min=0.0,
            max=1.0,
            default=float(state.get("filters.min_score") or 0.0),
            view=types.SliderView(
                label=f"Minimum {score_label.lower()}",
                space=4,
                # the App's defaults: a 100 px label beside the slider
                # (cut to "Minimum c...") and a value bubble always shown
                # with 6 decimals
                label_position="top",
                value_label_display="auto",
                value_precision=2,
                componentsProps={"slider": {"sx": {"minWidth": 160}}},
            ),
            on_change=self.on_change_filter,
        )
        classes = [ANY] + list(state.classes or [])
        for name, label in (
            ("truth", "Ground truth class"),
            ("pred", f"{_COLUMNS[mode][0]} class"),
        ):
            _dropdown(
                filters,
                name,
                classes,
                state.get(f"filters.{name}") or ANY,
                label,
                self.on_change_filter,
                space=3,
            )

    def _render_bulk(self, panel, mode, boxes=False):
        bulk = panel.h_stack("bulk", gap=1, align_y="center")
        for tag in pdata.TAGS:
            bulk.btn(
                f"tag_{tag}",
                label=f"Tag {tag}",
                variant="outlined",
                on_click=self.on_tag,
                params={"tag": tag},
            )
        if not boxes:  # a box's label is corrected on the box itself
            bulk.str(
                "accept_field",
                label="Accept into field",
                view=types.TextFieldView(
                    label="Accept into field", placeholder="new field name"
                ),
            )
            bulk.btn(
                "accept",
                label=(
                    "Accept pre-labels"
                    if mode == "prelabel"
                    else "Accept neighbors' labels"
                ),
                variant="outlined",
                on_click=self.on_accept,
            )
        bulk.btn(
            "show_all",
            label="Show all in grid",
            variant="contained",
            on_click=self.on_show_all,
        )
        panel.md(
            "Actions apply to every row of the list, not only those shown: "
            + "; ".join(f"`{t}`: {h}" for t, h in _TAG_HELP.items())
            + ".",
            name="bulk_md",
        )

    def _render_table(self, panel, state, mode):
        pred_label, score_label = _COLUMNS[mode]
        table = types.TableView(on_click_row=self.on_click_row)
        table.add_column("filename", label="File")
        table.add_column("truth", label="Ground truth")
        table.add_column("pred", label=pred_label)
        table.add_column("score", label=score_label)
        table.add_column("votes", label="Neighbors' vote")
        table.add_row_action(
            "open",
            self.on_open_sample,
            label="Open",
            icon="open_in_new",
            tooltip="Open this sample, its neighbors in the grid",
        )
        panel.list("rows", types.Object(), view=table)
        shown = len(state.row_ids or [])
        count = int(state.count or 0)
        if shown < count:
            more = panel.h_stack("more", gap=2, align_y="center")
            more.md(f"Showing the first {shown} of {count}", name="shown_md")
            if shown < MAX_ROWS:
                more.btn(
                    "show_more", label="Show more", on_click=self.on_show_more
                )

    def _render_charts(self, panel, state):
        controls = panel.h_stack("charts", gap=2, align_y="center")
        controls.bool(
            "normalize",
            label="Row-normalized",
            default=bool(state.get("charts.normalize")),
            view=types.SwitchView(label="Row-normalized"),
            on_change=self.on_change_charts,
        )
        controls.float(
            "target",
            label="Target precision",
            min=0.5,
            max=1.0,
            default=float(
                state.get("charts.target") or pdata.DEFAULT_TARGET_PRECISION
            ),
            view=types.FieldView(label="Target precision"),
            on_change=self.on_change_charts,
        )
        if state.get("source.eval_key"):
            controls.btn(
                "open_model_eval",
                label="Open in Model Evaluation",
                icon="ssid_chart",
                on_click=self.on_open_model_eval,
            )
        panel.plot(
            "confusion",
            label="Confusion matrix (click a cell to see its samples)",
            layout={
                "xaxis": {"title": {"text": "Pre-label"}, "type": "category"},
                "yaxis": {
                    "title": {"text": "Ground truth"},
                    "type": "category",
                    "autorange": "reversed",
                },
                "height": 420,
            },
            on_click=self.on_click_cell,
            # CSS sizes with units: the App reads a bare number as a
            # percentage of the panel for the grid cell (420 would be the
            # whole panel) but as pixels for the plot itself
            height="420px",
            width="100%",
        )
        panel.md(state.coverage_text or "", name="coverage_md")
        panel.plot(
            "coverage",
            label="Precision vs coverage of accepted pre-labels",
            layout={
                "xaxis": {
                    "title": {"text": "Coverage (share accepted)"},
                    "range": [0, 1.02],
                },
                "yaxis": {"title": {"text": "Precision"}},
                "showlegend": True,
                "height": 360,
            },
            height="360px",
            width="100%",
        )


# ---- helpers -------------------------------------------------------------


def _layout(panel):
    return types.Property(
        panel,
        view=types.GridView(
            orientation="vertical", gap=2, align_x="left", align_y="top"
        ),
    )


def _dropdown(parent, name, choices, value, label, on_change, space=None):
    view = types.DropdownView(label=label, space=space)
    for choice in choices:
        view.add_choice(choice, label=str(choice))
    parent.enum(
        name,
        list(choices),
        default=value,
        label=label,
        view=view,
        on_change=on_change,
    )


def _page(ctx):
    """Rows per page: ``page_size`` in the state, else :data:`PAGE`."""
    return int(ctx.panel.state.page_size or PAGE)


def _pick_row(row):
    """A pick as the table shows it."""
    return {
        "id": row["id"],
        "rank": row["rank"],
        "filename": row["filename"],
        "label": row["label"] if row["labeled"] else "(not yet)",
        "reason": row["reason"],
    }


def _accept_default(source):
    return f"{source.pred_field}_accepted"


def _category(value, classes):
    """The class a plotly click names: categories come back as strings,
    but a numeric-looking axis may send ``7`` or ``7.0``."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    value = str(value)
    return value if value in classes else None


def _heatmap(confusion, normalize):
    counts = confusion.counts
    z = confusion.normalized() if normalize else counts
    text = [
        [
            f"{z[i, j]:.2f}" if normalize else str(int(counts[i, j]))
            for j in range(counts.shape[1])
        ]
        for i in range(counts.shape[0])
    ]
    return [
        {
            "type": "heatmap",
            "z": z.tolist(),
            "x": confusion.classes,
            "y": confusion.classes,
            "text": text,
            "texttemplate": "%{text}",
            "customdata": counts.tolist(),
            "hovertemplate": (
                "truth %{y}, pre-label %{x}: %{customdata} samples"
                "<extra></extra>"
            ),
            "colorscale": "Oranges",
            "showscale": False,
        }
    ]


def _coverage_traces(curve, expected=None):
    traces = _expected_traces(expected) if expected is not None else []
    if curve.num_samples == 0:
        return traces
    traces += [
        {
            "type": "scatter",
            "mode": "lines+markers",
            "name": "accepted pre-labels",
            "x": curve.coverage.tolist(),
            "y": curve.precision.tolist(),
            "text": [f"{t:.3f}" for t in curve.thresholds],
            "hovertemplate": (
                "confidence ≥ %{text}<br>coverage %{x:.1%}"
                "<br>precision %{y:.2%}<extra></extra>"
            ),
        },
        {
            "type": "scatter",
            "mode": "lines",
            "name": f"target {curve.target:.1%}",
            "x": [0, 1],
            "y": [curve.target, curve.target],
            "line": {"dash": "dash"},
            "hoverinfo": "skip",
        },
    ]
    if curve.threshold is not None:
        traces.append(
            {
                "type": "scatter",
                "mode": "markers+text",
                "name": f"threshold {curve.threshold:.3f}",
                "x": [curve.coverage_at_target],
                "y": [curve.precision_at_target],
                "text": [f"≥ {curve.threshold:.3f}"],
                "textposition": "bottom right",
                "marker": {"size": 12, "symbol": "star"},
            }
        )
    return traces


def _expected_traces(expected):
    """The references' held-out curve and, for a run with an accept
    threshold, its expected point beside the measured one."""
    traces = [
        {
            "type": "scatter",
            "mode": "lines",
            "name": "expected (references)",
            "x": expected.coverage.tolist(),
            "y": expected.precision.tolist(),
            "text": [f"{t:.3f}" for t in expected.thresholds],
            "line": {"dash": "dot"},
            "hovertemplate": (
                "expected from the references<br>confidence ≥ %{text}"
                "<br>coverage %{x:.1%}<br>precision %{y:.2%}<extra></extra>"
            ),
        }
    ]
    if expected.expected_precision is not None:
        traces.append(
            {
                "type": "scatter",
                "mode": "markers",
                "name": "accepted: expected",
                "x": [expected.expected_coverage],
                "y": [expected.expected_precision],
                "marker": {"size": 11, "symbol": "circle-open"},
            }
        )
    if expected.measured_precision is not None:
        traces.append(
            {
                "type": "scatter",
                "mode": "markers",
                "name": "accepted: measured",
                "x": [expected.measured_coverage],
                "y": [expected.measured_precision],
                "marker": {"size": 11, "symbol": "diamond"},
            }
        )
    return traces
