"""Closing the loop: choose what a person labels next.

Picks the samples whose labels should settle the most pre-labels: a fair
sample spread over the data until a pre-annotation accepts something (only
a fair sample can vouch for its precision), then where the last
pre-annotation left most for review, with a fair share. Tags them
``to_label`` (the fair ones also ``to_label_random``), saves a view of
them and writes the reason of each pick and every sample's outlier score.
Shows the picks and the forecast of what labeling them is expected to do.
"""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from prelabel import constants

from . import _common as c

NAME = "select_for_labeling"


def _params(ctx, last):
    """The parameters as execution sees them (absent ones defaulted)."""
    p = ctx.params
    return {
        **c.index_params(ctx, last),
        "budget": p.get("budget") or last.get("budget") or 100,
        "strategy": p.get("strategy") or "auto",
        "random_share": p.get("random_share", constants.FAIR_SHARE),
        "tag": p.get("tag") or constants.LABEL_NEXT_TAG,
        "overwrite": bool(p.get("overwrite", False)),
    }


def _kwargs(p):
    """The arguments of ``select_for_labeling`` (and its check)."""
    keys = (
        "budget",
        "label_field",
        "strategy",
        "random_share",
        "tag",
        "overwrite",
    )
    out = {name: p[name] for name in keys}
    out["view_name"] = p["tag"]
    return out


class SelectForLabeling(foo.Operator):
    @property
    def config(self):
        return c.operator_config(
            NAME,
            label="Select samples to label next",
            description=(
                "Picks the samples whose labels should settle the most "
                "pre-labels, tags them and says why"
            ),
            icon="select_for_labeling",
        )

    def resolve_input(self, ctx):
        from prelabel.selection import check_select_for_labeling

        inputs = types.Object()
        dataset = ctx.dataset
        last = c.remembered(ctx, NAME)

        c.header(
            inputs,
            "targets_header",
            "Pick from",
            "Labeled samples are never picked.",
        )
        targets = c.target_input(ctx, inputs, "Pick from")

        c.header(inputs, "index_header", "Neighbors")
        brain_key = c.brain_key_input(ctx, inputs, last)
        if brain_key is None:
            return _form(inputs)
        inputs.str(
            "label_field",
            default=c.run_label_field(dataset, brain_key),
            required=False,
            label="Label field",
            description=(
                "The Classification field a person labels (it may not "
                "exist yet at a cold start)"
            ),
        )
        inputs.int(
            "budget",
            min=1,
            default=last.get("budget") or 100,
            label="How many samples",
        )
        strategy_view = types.RadioGroup()
        strategy_view.add_choice(
            "auto",
            label="Auto",
            description=(
                "Where the last pre-annotation doubted most, or typical "
                "samples when there is none yet"
            ),
        )
        strategy_view.add_choice(
            "typical",
            label="Typical",
            description="Centers of dense regions no label is near yet",
        )
        strategy_view.add_choice(
            "uncertain",
            label="Uncertain",
            description="Where the last pre-annotation left most for review",
        )
        strategy_view.add_choice(
            "random", label="Random", description="Uniformly at random"
        )
        inputs.enum(
            "strategy",
            list(constants.STRATEGIES),
            default="auto",
            label="Strategy",
            view=strategy_view,
        )
        inputs.float(
            "random_share",
            min=0.0,
            max=1.0,
            default=constants.FAIR_SHARE,
            label="Random share",
            description=(
                "Picked at random and tagged "
                f"'{constants.FAIR_TAG}': once labeled, pass "
                "that tag as the calibration reference of pre-annotation "
                "to keep its precision promise honest"
            ),
        )
        inputs.str(
            "tag",
            default=constants.LABEL_NEXT_TAG,
            required=False,
            label="Tag (and saved view)",
        )
        c.overwrite_input(inputs, "the reason and outlier fields")

        p = _params(ctx, last)
        try:
            results = c.load_index(ctx, dataset, p["brain_key"])
            _, strategy, pred_field = check_select_for_labeling(
                targets, index=results, **_kwargs(p)
            )
        except ValueError as e:
            c.show_error(inputs, e)
            return _form(inputs)
        said = f"{p['budget']} samples will be picked ({strategy}"
        if pred_field:
            said += f", from the doubts of '{pred_field}'"
        inputs.view("summary", types.Notice(label=said + ")"))
        return _form(inputs)

    def execute(self, ctx):
        from prelabel import select_for_labeling

        dataset = ctx.dataset
        p = _params(ctx, c.remembered(ctx, NAME))
        targets = ctx.target_view(require_flat=True)
        results = c.load_index(ctx, dataset, p["brain_key"])
        out = select_for_labeling(
            targets,
            index=results,
            progress=c.ProgressReporter(ctx),
            **_kwargs(p),
        )
        c.remember(ctx, NAME, {**p, "overwrite": False})
        c.show_in_app(
            ctx,
            view=dataset.load_saved_view(out.view_name),
            fields=["label_next_reason", "outlier_score"],
        )
        fc = out.forecast
        return {
            "num_picked": len(out.ids),
            "strategy": out.strategy,
            "num_random": out.num_random,
            "num_top_up": out.num_top_up or None,
            "tag": out.tag,
            "num_outliers": out.num_outliers,
            "forecast": fc.text if fc else None,
            "accepted_next": fc.accepted_next if fc else None,
            "first_reason": out.reasons[0] if out.reasons else None,
        }

    def resolve_output(self, ctx):
        return c.summary_output(
            ctx,
            "Samples to label next",
            [
                ("num_picked", "Picked"),
                ("strategy", "Strategy"),
                ("num_random", "Of them at random (unbiased share)"),
                ("num_top_up", "Of them filling the budget (too few doubts)"),
                ("tag", "Tag and saved view"),
                ("num_outliers", "Outliers left out"),
                ("forecast", "Forecast"),
                ("first_reason", "Why the first pick"),
            ],
        )

    def __call__(
        self,
        sample_collection,
        brain_key=constants.DEFAULT_BRAIN_KEY,
        label_field=None,
        budget=100,
        strategy="auto",
        random_share=0.2,
        tag="to_label",
        overwrite=False,
        delegate=False,
    ):
        """Picks the next samples of ``sample_collection`` to label.

        Args:
            sample_collection: the samples to pick from, a dataset or view
            brain_key ("prelabel_qdrant"): the prelabel index to read
            label_field (None): the field a person labels; default the
                index's label field
            budget (100): how many samples to pick
            strategy ("auto"): ``"auto"``, ``"typical"``, ``"uncertain"``
                or ``"random"`` (see :func:`prelabel.select_for_labeling`)
            random_share (0.2): the share picked at random
            tag ("to_label"): the tag of the picks and their saved view
            overwrite (False): allow the output fields to replace fields
                prelabel did not write
            delegate (False): queue a delegated operation instead

        Returns:
            an ``ExecutionResult``; ``.result`` is the summary dict
        """
        params = dict(
            brain_key=brain_key,
            label_field=label_field,
            budget=budget,
            strategy=strategy,
            random_share=random_share,
            tag=tag,
            overwrite=overwrite,
        )
        return c.execute(self, sample_collection, params, delegate=delegate)


def _form(inputs):
    return types.Property(
        inputs, view=types.View(label="Select samples to label next")
    )
