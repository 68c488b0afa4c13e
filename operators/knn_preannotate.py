"""Step 3 of the workflow: pre-annotate the targets by a vote of their
nearest labeled neighbors in the Qdrant index.

Writes a ``Classification`` field (default ``prelabel``) on the target
samples (label, confidence, logits, votes, neighbor ids); never touches the
ground-truth field. Targets below ``min_confidence`` get no label and the
``needs_review`` tag. With an ``eval_key``, the pre-labels of targets that
have ground truth are evaluated and the evaluation is stored under that key.
"""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from prelabel import constants
from prelabel.constants import MODES

from . import _common as c

NAME = "knn_preannotate"


def _params(ctx, last):
    """The parameters as execution sees them (absent ones defaulted)."""
    p = ctx.params
    return {
        **c.index_params(ctx, last),
        "reference_tag": p.get("reference_tag") or None,
        "pred_field": p.get("pred_field") or constants.DEFAULT_PRED_FIELD,
        "k": p.get("k", constants.DEFAULT_K),
        "vote": p.get("vote") or "majority",
        "eval_key": p.get("eval_key") or None,
        "min_confidence": p.get("min_confidence"),
        "mode": p.get("mode") or "knn",
        "target_precision": p.get("target_precision") or None,
        "calibration_tag": p.get("calibration_tag") or None,
        "calibrate": bool(p.get("calibrate", False)),
        "propagate": bool(p.get("propagate", False)),
        "overwrite": bool(p.get("overwrite", False)),
    }


#: the arguments of ``preannotate`` (and its check) the form sets
_ARGS = (
    "label_field",
    "pred_field",
    "k",
    "vote",
    "min_confidence",
    "eval_key",
    "mode",
    "target_precision",
    "calibrate",
    "propagate",
    "overwrite",
    "patches_field",
)


def _kwargs(p):
    return {
        "reference": p["reference_tag"],
        "calibration_reference": p["calibration_tag"],
        **{name: p[name] for name in _ARGS},
    }


class KnnPreannotate(foo.Operator):
    @property
    def config(self):
        return c.operator_config(
            NAME,
            label="kNN pre-annotate",
            description=(
                "Labels the targets by a vote of their nearest labeled "
                "neighbors in the Qdrant index"
            ),
            icon="knn_preannotate",
        )

    def resolve_input(self, ctx):
        from prelabel.preannotate import check_preannotate

        inputs = types.Object()
        dataset = ctx.dataset
        last = c.remembered(ctx, NAME)

        c.header(inputs, "targets_header", "Samples to pre-annotate")
        targets = c.target_input(ctx, inputs, "Pre-annotate")

        c.header(
            inputs,
            "reference_header",
            "Who votes",
            "Labeled samples in the index vote for their neighbors.",
        )
        brain_key = c.brain_key_input(ctx, inputs, last)
        if brain_key is None:
            return _form(inputs)
        labels = c.classification_fields(dataset)
        patches = c.label_field_input(
            inputs,
            dataset,
            brain_key,
            last,
            "The labels that vote (the ones stored in the index); also "
            "the ground truth for evaluation",
            "each box of the targets gets a Detection in the prediction "
            "field, voted by its nearest labeled boxes",
        )
        c.reference_tag_input(
            inputs,
            dataset,
            last,
            "Only labeled samples with this tag vote; empty for every "
            "labeled sample in the index",
        )

        c.header(inputs, "vote_header", "Neighbors")
        inputs.int(
            "k",
            min=1,
            default=last.get("k") or constants.DEFAULT_K,
            label="Neighbors (k)",
            description="How many nearest labeled samples vote",
        )
        c.vote_input(inputs, last)
        inputs.float(
            "min_confidence",
            min=0.0,
            max=1.0,
            default=last.get("min_confidence"),
            required=False,
            label="Minimum confidence",
            description=(
                "Below this share of the vote no label is written and the "
                f"sample is tagged '{constants.REVIEW_TAG}'. Higher is "
                "stricter; empty labels everything"
            ),
        )

        _accept_inputs(ctx, inputs, last)

        c.header(inputs, "output_header", "Output")
        inputs.str(
            "pred_field",
            default=last.get("pred_field") or constants.DEFAULT_PRED_FIELD,
            required=False,
            label="Prediction field",
            description="The Classification field to write; replaced if "
            "prelabel wrote it, never the ground truth",
        )
        c.overwrite_input(inputs, "the prediction field")
        p = _params(ctx, last)
        if not patches:
            _eval_input(inputs, targets, labels, p, last)

        try:
            results = c.load_index(ctx, dataset, p["brain_key"])
            _, _, num_ref, _ = check_preannotate(
                targets, index=results, **_kwargs(p)
            )
        except ValueError as e:
            c.show_error(inputs, e)
            return _form(inputs)

        inputs.view(
            "summary",
            types.Notice(
                label=(
                    f"{len(targets)} targets; {num_ref} labeled "
                    + ("boxes" if patches else "samples")
                    + " vote"
                    + (
                        f" (tag '{p['reference_tag']}')"
                        if p["reference_tag"]
                        else ""
                    )
                )
            ),
        )
        return _form(inputs)

    def execute(self, ctx):
        from prelabel import preannotate

        dataset = ctx.dataset
        p = _params(ctx, c.remembered(ctx, NAME))
        targets = ctx.target_view(require_flat=True)
        results = c.load_index(ctx, dataset, p["brain_key"])
        out = preannotate(
            targets,
            index=results,
            progress=c.ProgressReporter(ctx),
            **_kwargs(p),
        )
        c.remember(ctx, NAME, {**p, "overwrite": False})

        pred = p["pred_field"]
        if p["patches_field"]:
            view = targets.to_patches(pred)
        else:
            view = targets.exists(pred)
        view = view.sort_by(f"{pred}.confidence", reverse=True)
        c.show_in_app(ctx, view=view, fields=[pred, p["label_field"]])
        return {
            "pred_field": pred,
            "num_targets": out.num_targets,
            "num_labeled": out.num_labeled,
            "num_review": out.num_review,
            "review_tag": constants.REVIEW_TAG if out.num_review else None,
            "num_classes": len(out.classes),
            "eval_key": out.eval_key if out.accuracy is not None else None,
            "accuracy": out.accuracy,
            "brain_key": out.brain_key or p["brain_key"],
            "num_accepted": out.num_accepted,
            "expected_coverage": out.expected_coverage,
            "promise": out.promise,
            "reference_accuracy": out.reference_accuracy,
            "ece": out.ece,
        }

    def resolve_output(self, ctx):
        return c.summary_output(
            ctx,
            "Pre-annotation done",
            [
                ("pred_field", "Prediction field"),
                ("num_targets", "Targets"),
                ("num_labeled", "Pre-labeled"),
                ("num_accepted", "Accepted without review"),
                ("expected_coverage", "Expected share accepted"),
                ("promise", "Precision of the accepted (95 % bounds)"),
                ("num_review", "Left for review"),
                ("review_tag", "Review tag"),
                ("num_classes", "Classes"),
                ("accuracy", "Accuracy on targets with ground truth"),
                ("eval_key", "Evaluation key (open in Model Evaluation)"),
                ("reference_accuracy", "Held-out accuracy on the references"),
                ("ece", "Calibration error on the references"),
                ("brain_key", "Index that voted"),
            ],
        )

    def __call__(
        self,
        sample_collection,
        brain_key=constants.DEFAULT_BRAIN_KEY,
        label_field=None,
        reference_tag=None,
        pred_field=constants.DEFAULT_PRED_FIELD,
        k=constants.DEFAULT_K,
        vote="majority",
        eval_key=None,
        min_confidence=None,
        mode="knn",
        target_precision=None,
        calibration_tag=None,
        calibrate=False,
        propagate=False,
        overwrite=False,
        delegate=False,
    ):
        """Pre-annotates ``sample_collection`` (the targets).

        Args:
            sample_collection: the targets, a dataset or view
            brain_key ("prelabel_qdrant"): the prelabel index to query
            label_field (None): the labels that vote; default the
                index's label field
            reference_tag (None): only labeled samples with this tag vote
            pred_field ("prelabel"): the Classification field to write
            k (15): neighbors that vote
            vote ("majority"): ``"majority"`` or ``"weighted"``
            eval_key (None): evaluate against ``label_field`` under this key
            min_confidence (None): below it, no label and the
                ``needs_review`` tag
            mode ("knn"): ``"knn"`` or ``"adapted"`` (embeddings adapted
                to the references' labels, indexed under
                ``<brain_key>_adapted``; see :func:`prelabel.preannotate`)
            target_precision (None): e.g. ``0.99``: accept the pre-labels
                the references say keep this precision, tag the rest
                ``needs_review``
            calibration_tag (None): only labeled samples with this tag
                measure the precision (e.g. the random picks,
                ``to_label_random``); default every labeled sample
            calibrate (False): write calibrated confidences
            propagate (False): spread labels over the neighbor graph when
                the references say it helps
            overwrite (False): allow ``pred_field`` to replace a field
                prelabel did not write
            delegate (False): queue a delegated operation instead

        Returns:
            an ``ExecutionResult``; ``.result`` is the summary dict
        """
        params = dict(
            brain_key=brain_key,
            label_field=label_field,
            reference_tag=reference_tag,
            pred_field=pred_field,
            k=k,
            vote=vote,
            eval_key=eval_key,
            min_confidence=min_confidence,
            mode=mode,
            target_precision=target_precision,
            calibration_tag=calibration_tag,
            calibrate=calibrate,
            propagate=propagate,
            overwrite=overwrite,
        )
        return c.execute(self, sample_collection, params, delegate=delegate)


def _form(inputs):
    return types.Property(inputs, view=types.View(label="kNN pre-annotate"))


def _eval_input(inputs, targets, labels, p, last):
    """The evaluation key, offered when the targets have ground truth."""
    has_truth = bool(
        p["label_field"] in labels
        and targets.exists(p["label_field"]).limit(1).count()
    )
    inputs.str(
        "eval_key",
        default=(
            (last.get("eval_key") or constants.DEFAULT_EVAL_KEY)
            if has_truth
            else None
        ),
        required=False,
        label="Evaluation key",
        description=(
            "Evaluates the pre-labels against the targets' ground "
            "truth and stores it under this key; empty to skip"
        ),
    )


def _accept_inputs(ctx, inputs, last):
    """The form's "accept without review" section: how targets are
    scored, and the precision their accepted pre-labels must keep."""
    c.header(
        inputs,
        "accept_header",
        "Accept without review",
        "Estimated from the labeled samples alone, each scored without "
        "its own label; the targets' ground truth is never read.",
    )
    mode_view = types.RadioGroup()
    mode_view.add_choice(
        "knn",
        label="Neighbors vote",
        description="The labeled neighbors in this index vote",
    )
    mode_view.add_choice(
        "adapted",
        label="Adapted embeddings",
        description=(
            "Learns in seconds a projection of the embeddings and a "
            "classifier from the labeled samples, indexes the adapted "
            "vectors under '<index>_adapted' and votes there; the most "
            "accurate, always calibrated"
        ),
    )
    inputs.enum(
        "mode",
        list(MODES),
        default=c.choose(last.get("mode"), MODES, "knn"),
        label="Method",
        view=mode_view,
    )
    inputs.float(
        "target_precision",
        min=0.5,
        max=0.9999,
        default=last.get("target_precision"),
        required=False,
        label="Accept at precision",
        description=(
            "e.g. 0.99: pre-labels whose confidence the labeled samples "
            "say keeps this precision are marked accepted; the others are "
            f"tagged '{constants.REVIEW_TAG}'. Empty: no threshold"
        ),
    )
    if ctx.params.get("target_precision", last.get("target_precision")):
        _calibration_tag_input(ctx, inputs, last)
    mode = ctx.params.get("mode") or last.get("mode")
    if mode != "adapted":  # always calibrated
        _calibrate_input(inputs, last)
    inputs.bool(
        "propagate",
        default=bool(last.get("propagate", False)),
        required=False,
        label="Spread over unlabeled neighbors",
        description=(
            "Propagate confident pre-labels through the neighbor graph of "
            "all samples, when the labeled samples say it helps"
        ),
        view=types.CheckboxView(),
    )


def _calibration_tag_input(ctx, inputs, last):
    """Which labeled samples check the precision: by default the random
    picks of "select for labeling", once the dataset has them."""
    fair = constants.FAIR_TAG
    has_fair = bool(ctx.dataset.match_tags(fair).limit(1).count())
    inputs.str(
        "calibration_tag",
        default=last.get("calibration_tag") or (fair if has_fair else None),
        required=False,
        label="Check precision on (tag)",
        description=(
            "Only labeled samples with this tag measure the precision "
            "(all still vote). Samples picked for being typical are right "
            "more often than their confidence says and would over-promise; "
            f"the random picks '{fair}' of 'Select for labeling' do not. "
            "Empty: every labeled sample"
        ),
    )


def _calibrate_input(inputs, last):
    inputs.bool(
        "calibrate",
        default=bool(last.get("calibrate", False)),
        required=False,
        label="Calibrated confidence",
        description=(
            "Write as confidence the probability that the pre-label is "
            "right (the vote's share is kept as vote_share)"
        ),
        view=types.CheckboxView(),
    )
