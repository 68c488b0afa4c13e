"""Step 5 of the workflow: review the mistakes.

Opens the plugin's ``mistakes_panel`` in the App on a prediction field
and, optionally, an evaluation key and the score field of
``find_label_mistakes``; they are passed as the panel's initial state
(``pred_field``, ``gt_field``, ``eval_key``, ``score_field``). Writes
nothing. Only runs immediately: a delegated run has no App to open a
panel in.
"""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from prelabel import constants
from prelabel import panel_data as pdata

from . import _common as c

NAME = "open_mistakes_panel"
PANEL_NAME = "mistakes_panel"
#: the operator whose last score field is the default
MISTAKES_OP = "find_label_mistakes"


def _gt_field(dataset, pred_field, eval_key):
    """The ground-truth field: the evaluation's, else the one the
    pre-annotation run voted with."""
    if eval_key and eval_key in dataset.list_evaluations():
        return dataset.get_evaluation_info(eval_key).config.gt_field
    runs = pdata.prelabel_runs(dataset)
    return (runs.get(pred_field) or {}).get("label_field")


def _pred_fields(dataset):
    """The fields prelabel pre-annotated; if none, the Classification
    fields that are not the labels of a prelabel index."""
    fields = c.classification_fields(dataset)
    runs = pdata.prelabel_runs(dataset)
    ours = [f for f in fields if f in runs]
    if ours:
        return ours
    others = {
        c.run_label_field(dataset, key) for key in c.our_brain_keys(dataset)
    }
    others.update(f"{name}_label" for name in _score_fields(dataset))
    return [f for f in fields if f not in others]


def _score_fields(dataset):
    """Float fields written by find_label_mistakes (with their
    ``<score_field>_label`` companion)."""
    return pdata.find_sources(dataset)["suspicious"]


def _default_pred_field(dataset, last):
    """The last pre-annotated field, else ``prelabel``, else the first."""
    fields = _pred_fields(dataset)
    first = fields[0] if fields else None
    return c.choose(
        last.get("pred_field"),
        fields,
        c.choose(constants.DEFAULT_PRED_FIELD, fields, first),
    )


def _default_score_field(dataset, last):
    scores = _score_fields(dataset)
    return c.choose(
        last.get("score_field"),
        scores,
        c.choose(constants.DEFAULT_SCORE_FIELD, scores),
    )


class OpenMistakesPanel(foo.Operator):
    @property
    def config(self):
        config = c.operator_config(
            NAME,
            label="Open mistakes panel",
            description=(
                "Shows the pre-labels and labels most likely wrong, most "
                "confident first"
            ),
            icon="open_mistakes_panel",
            long=False,
            view_target=False,
        )
        config.allow_delegated_execution = False
        return config

    def resolve_input(self, ctx):
        from prelabel.validation import check_classification_field

        inputs = types.Object()
        dataset = ctx.dataset
        last = c.remembered(ctx, "knn_preannotate")

        c.header(
            inputs,
            "panel_header",
            "Mistakes panel",
            "Pick the pre-labels to review.",
        )
        preferred = _pred_fields(dataset)
        default_pred = _default_pred_field(dataset, last)
        c.field_input(
            inputs,
            "pred_field",
            preferred,
            default_pred,
            "Prediction field",
            "The Classification field of pre-labels to review",
            required=False,
        )
        scores = _score_fields(dataset)
        c.field_input(
            inputs,
            "score_field",
            scores,
            _default_score_field(dataset, c.remembered(ctx, MISTAKES_OP)),
            "Score field",
            "The scores of 'Find label mistakes', for the suspicious "
            "labels view; empty for none",
        )
        score_field = ctx.params.get("score_field")
        if score_field and score_field not in scores:
            c.show_error(
                inputs,
                f"score_field={score_field!r} is not a score written by "
                "Find label mistakes; run it first or leave this empty",
            )
            return _form(inputs)

        pred_field = ctx.params.get("pred_field") or default_pred
        if not pred_field:
            if not (score_field or scores):
                c.show_error(
                    inputs,
                    "pred_field: nothing to review yet; run kNN "
                    "pre-annotate or Find label mistakes first",
                )
            return _form(inputs)
        ok, _ = c.run_check(
            inputs,
            check_classification_field,
            dataset,
            pred_field,
            "pred_field",
        )
        if not ok:
            return _form(inputs)

        evals = [
            key
            for key in dataset.list_evaluations()
            if dataset.get_evaluation_info(key).config.pred_field == pred_field
        ]
        c.field_input(
            inputs,
            "eval_key",
            evals,
            c.choose(last.get("eval_key"), evals, evals[0] if evals else None),
            "Evaluation key",
            "An evaluation of these pre-labels, for the confusion matrix; "
            "empty for none",
            required=False,
        )
        eval_key = ctx.params.get("eval_key")
        if eval_key and eval_key not in evals:
            c.show_error(
                inputs,
                f"eval_key={eval_key!r} is not an evaluation of "
                f"'{pred_field}' on this dataset; run kNN pre-annotate "
                "with an evaluation key",
            )
        return _form(inputs)

    def execute(self, ctx):
        dataset = ctx.dataset
        pred_field = ctx.params.get("pred_field") or _default_pred_field(
            dataset, c.remembered(ctx, "knn_preannotate")
        )
        eval_key = ctx.params.get("eval_key") or None
        score_field = ctx.params.get("score_field") or _default_score_field(
            dataset, c.remembered(ctx, MISTAKES_OP)
        )
        state = {
            "pred_field": pred_field,
            "gt_field": _gt_field(dataset, pred_field, eval_key),
            "eval_key": eval_key,
            "score_field": score_field,
        }
        ctx.ops.open_panel(PANEL_NAME, state=state)
        return {"panel": PANEL_NAME, **state}

    def __call__(
        self,
        sample_collection,
        pred_field=None,
        eval_key=None,
        score_field=None,
    ):
        """Opens the mistakes panel (in an App connected to this process's
        operator executor; from plain Python it only validates and
        returns the panel state).

        Args:
            sample_collection: a dataset or view (its dataset is used)
            pred_field (None): the pre-labels to review; default the last
                pre-annotated field
            eval_key (None): an evaluation of ``pred_field``
            score_field (None): a score field of find_label_mistakes;
                default the last one written

        Returns:
            an ``ExecutionResult``; ``.result`` is the panel state
        """
        params = dict(
            pred_field=pred_field, eval_key=eval_key, score_field=score_field
        )
        return c.execute(self, sample_collection, params)


def _form(inputs):
    return types.Property(inputs, view=types.View(label="Open mistakes panel"))
