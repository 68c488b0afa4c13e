"""Step 4 of the workflow: find labels that are probably wrong.

For each labeled target sample, its labeled neighbors in the Qdrant index
vote (leave-one-out: a sample never votes for itself). Writes a float
field (default ``mistake_score``: 1 - the share of the vote for the
sample's own label; higher = more likely mislabeled) and a Classification
field ``<score_field>_label`` with the neighbors' majority label; never
touches the labels under test. The App then shows the most suspicious
samples first.
"""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from prelabel import constants
from prelabel.constants import METHODS

from . import _common as c

NAME = "find_label_mistakes"


def _params(ctx, last):
    """The parameters as execution sees them (absent ones defaulted)."""
    p = ctx.params
    return {
        **c.index_params(ctx, last),
        "k": p.get("k", constants.DEFAULT_K),
        "score_field": p.get("score_field") or constants.DEFAULT_SCORE_FIELD,
        "vote": p.get("vote") or "majority",
        "method": p.get("method") or "loo",
        "overwrite": bool(p.get("overwrite", False)),
    }


def _kwargs(p):
    """The arguments of ``find_label_mistakes`` (and its check)."""
    keys = (
        "label_field",
        "k",
        "score_field",
        "vote",
        "method",
        "overwrite",
        "patches_field",
    )
    return {name: p[name] for name in keys}


class FindLabelMistakes(foo.Operator):
    @property
    def config(self):
        return c.operator_config(
            NAME,
            label="Find label mistakes",
            description=(
                "Scores every labeled sample by how much its neighbors "
                "disagree with its label"
            ),
            icon="find_label_mistakes",
        )

    def resolve_input(self, ctx):
        from prelabel.mistakes import check_find_label_mistakes

        inputs = types.Object()
        dataset = ctx.dataset
        last = c.remembered(ctx, NAME)

        c.header(
            inputs,
            "targets_header",
            "Samples to check",
            "Only samples with a label are scored.",
        )
        targets = c.target_input(ctx, inputs, "Check the labels of")

        c.header(inputs, "index_header", "Neighbors")
        brain_key = c.brain_key_input(ctx, inputs, last)
        if brain_key is None:
            return _form(inputs)
        patches = c.label_field_input(
            inputs,
            dataset,
            brain_key,
            last,
            "The labels under test (the ones stored in the index)",
            "every labeled box is scored by its nearest labeled boxes",
        )
        inputs.int(
            "k",
            min=1,
            default=last.get("k") or constants.DEFAULT_K,
            label="Neighbors (k)",
            description="How many nearest labeled samples vote",
        )
        method_view = types.RadioGroup()
        method_view.add_choice(
            "loo",
            label="Neighbors vote",
            description=(
                "The sample's labeled neighbors in this index vote; it "
                "never votes for itself"
            ),
        )
        method_view.add_choice(
            "adapted",
            label="Adapted",
            description=(
                "The neighbors' vote in a whitened space, averaged with a "
                "classifier that never saw the sample's label: sharper, "
                "computed in memory (up to ~100k labeled samples)"
            ),
        )
        inputs.enum(
            "method",
            list(METHODS),
            default=c.choose(last.get("method"), METHODS, "loo"),
            label="Method",
            view=method_view,
        )
        method = ctx.params.get("method") or last.get("method")
        if method != "adapted":  # the adapted method does not vote
            c.vote_input(inputs, last)

        c.header(inputs, "output_header", "Output")
        inputs.str(
            "score_field",
            default=last.get("score_field") or constants.DEFAULT_SCORE_FIELD,
            required=False,
            label="Score field",
            description=(
                "Float field to write: higher means more likely "
                "mislabeled. The neighbors' label goes to "
                "<score field>_label"
            ),
        )
        c.overwrite_input(inputs, "the score and neighbors' label fields")

        p = _params(ctx, last)
        try:
            results = c.load_index(ctx, dataset, p["brain_key"])
            check_find_label_mistakes(targets, index=results, **_kwargs(p))
        except ValueError as e:
            c.show_error(inputs, e)
            return _form(inputs)

        if patches:
            what = "labeled boxes"
            num = targets.count(f"{patches}.detections.label")
        else:
            what = "labeled samples"
            num = targets.exists(p["label_field"]).count()
        inputs.view(
            "summary",
            types.Notice(label=f"{num} {what} will be scored"),
        )
        return _form(inputs)

    def execute(self, ctx):
        from prelabel import find_label_mistakes, suspicious_labels

        dataset = ctx.dataset
        p = _params(ctx, c.remembered(ctx, NAME))
        targets = ctx.target_view(require_flat=True)
        results = c.load_index(ctx, dataset, p["brain_key"])
        out = find_label_mistakes(
            targets,
            index=results,
            progress=c.ProgressReporter(ctx),
            **_kwargs(p),
        )
        c.remember(ctx, NAME, {**p, "overwrite": False})

        view = suspicious_labels(targets, out.score_field)
        fields = [p["label_field"], out.label_field, out.score_field]
        c.show_in_app(ctx, view=view, fields=[f for f in fields if f])
        return {
            "score_field": out.score_field,
            "neighbors_field": out.label_field,
            "num_scored": out.num_scored,
            "num_disagree": out.num_disagree,
            "brain_key": p["brain_key"],
        }

    def resolve_output(self, ctx):
        return c.summary_output(
            ctx,
            "Labels scored",
            [
                ("num_scored", "Samples scored"),
                ("num_disagree", "Neighbors' majority disagrees"),
                ("score_field", "Score field (sort descending)"),
                ("neighbors_field", "Neighbors' label field"),
            ],
        )

    def __call__(
        self,
        sample_collection,
        brain_key=constants.DEFAULT_BRAIN_KEY,
        label_field=None,
        k=constants.DEFAULT_K,
        score_field=constants.DEFAULT_SCORE_FIELD,
        vote="majority",
        method="loo",
        overwrite=False,
        delegate=False,
    ):
        """Scores the labels of ``sample_collection``.

        Args:
            sample_collection: the samples to check, a dataset or view
            brain_key ("prelabel_qdrant"): the prelabel index to query
            label_field (None): the labels under test; default the index's
                label field
            k (15): neighbors that vote
            score_field ("mistake_score"): the float field to write
            vote ("majority"): ``"majority"`` or ``"weighted"``
            method ("loo"): ``"loo"`` or ``"adapted"`` (see
                :func:`prelabel.find_label_mistakes`)
            overwrite (False): allow the output fields to replace fields
                prelabel did not write
            delegate (False): queue a delegated operation instead

        Returns:
            an ``ExecutionResult``; ``.result`` is the summary dict
        """
        params = dict(
            brain_key=brain_key,
            label_field=label_field,
            k=k,
            score_field=score_field,
            vote=vote,
            method=method,
            overwrite=overwrite,
        )
        return c.execute(self, sample_collection, params, delegate=delegate)


def _form(inputs):
    return types.Property(inputs, view=types.View(label="Find label mistakes"))
