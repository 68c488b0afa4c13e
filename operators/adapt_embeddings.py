"""Step 2b of the workflow (optional): adapt the embeddings of an index to
the labels.

Learns from the labeled samples alone, in seconds on a CPU, a projection
of the frozen embeddings and a classifier (see ``prelabel.adapt``), writes
the adapted vectors to ``<embeddings field>_adapted`` for every embedded
sample and indexes them under ``<brain key>_adapted``. Pre-annotating from
that index (or with the "Adapted embeddings" method of kNN pre-annotate,
which does all of this itself) votes with the classifier and calibrates.
Unlabeled samples give their embeddings, never a label.
"""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from prelabel import constants

from . import _common as c

NAME = "adapt_embeddings"


def _params(ctx, last):
    """The parameters as execution sees them (absent ones defaulted)."""
    p = ctx.params
    return {
        **c.index_params(ctx, last),
        "reference_tag": p.get("reference_tag") or None,
        "overwrite": bool(p.get("overwrite", False)),
    }


class AdaptEmbeddings(foo.Operator):
    @property
    def config(self):
        return c.operator_config(
            NAME,
            label="Adapt embeddings to labels",
            description=(
                "Learns from the labeled samples a projection of the "
                "embeddings and indexes the adapted vectors"
            ),
            icon="adapt_embeddings",
            view_target=False,
        )

    def resolve_input(self, ctx):
        from prelabel.adapt import check_adapt_index

        inputs = types.Object()
        dataset = ctx.dataset
        last = c.remembered(ctx, NAME)

        c.header(
            inputs,
            "index_header",
            "Embeddings to adapt",
            "Every embedded sample of the dataset gets an adapted vector; "
            "only the labeled samples' labels are read.",
        )
        brain_key = c.brain_key_input(ctx, inputs, last)
        if brain_key is None:
            return _form(inputs)
        labels = c.classification_fields(dataset)
        c.field_input(
            inputs,
            "label_field",
            labels,
            c.run_label_field(dataset, brain_key)
            or c.choose(last.get("label_field"), labels),
            "Label field",
            "The labels that train the projection",
        )
        c.reference_tag_input(
            inputs,
            dataset,
            last,
            "Only labeled samples with this tag train it; empty for every "
            "labeled sample",
        )
        c.overwrite_input(inputs, "the adapted embeddings field")

        p = _params(ctx, last)
        try:
            results = c.load_index(ctx, dataset, p["brain_key"])
            results, refs = check_adapt_index(
                dataset,
                results,
                p["reference_tag"],
                p["label_field"],
                p["overwrite"],
            )
        except ValueError as e:
            c.show_error(inputs, e)
            return _form(inputs)
        if refs is None:
            c.show_error(
                inputs,
                ValueError(
                    f"index {p['brain_key']!r} already holds adapted "
                    "embeddings; choose the index of the frozen ones"
                ),
            )
            return _form(inputs)

        emb = results.config.embeddings_field
        inputs.view(
            "summary",
            types.Notice(
                label=(
                    f"{len(refs)} labeled samples train it; writes "
                    f"'{emb}_adapted' and the index "
                    f"'{p['brain_key']}_adapted'"
                )
            ),
        )
        return _form(inputs)

    def execute(self, ctx):
        from prelabel import adapt_index, adapter_record

        dataset = ctx.dataset
        p = _params(ctx, c.remembered(ctx, NAME))
        results = c.load_index(ctx, dataset, p["brain_key"])
        adapted = adapt_index(
            dataset,
            results,
            reference=p["reference_tag"],
            label_field=p["label_field"],
            progress=c.ProgressReporter(ctx),
            overwrite=p["overwrite"],
        )
        c.remember(ctx, NAME, {**p, "overwrite": False})

        field = adapted.config.embeddings_field
        record = adapter_record(dataset, field) or {}
        if not ctx.delegated:
            ctx.ops.reload_dataset()
        return {
            "brain_key": adapted.key,
            "embeddings_field": field,
            "num_reference": record.get("num_reference"),
            "num_classes": len(record.get("classes") or []),
            "dim": record.get("dim"),
            "reference_accuracy": record.get("reference_accuracy"),
        }

    def resolve_output(self, ctx):
        return c.summary_output(
            ctx,
            "Embeddings adapted",
            [
                ("brain_key", "Index of the adapted embeddings"),
                ("embeddings_field", "Adapted embeddings field"),
                ("num_reference", "Labeled samples it learned from"),
                ("num_classes", "Classes"),
                ("dim", "Dimensions"),
                (
                    "reference_accuracy",
                    "Cross-fitted accuracy on the labeled samples",
                ),
            ],
        )

    def __call__(
        self,
        sample_collection,
        brain_key=constants.DEFAULT_BRAIN_KEY,
        label_field=None,
        reference_tag=None,
        overwrite=False,
        delegate=False,
    ):
        """Adapts the embeddings of an index to the labels.

        Args:
            sample_collection: the dataset (or any view of it: every
                embedded sample of the dataset is adapted)
            brain_key ("prelabel_qdrant"): the prelabel index of the
                frozen embeddings
            label_field (None): the labels that train it; default the
                index's label field
            reference_tag (None): only labeled samples with this tag train
                it
            overwrite (False): allow the adapted field to replace a field
                prelabel did not write
            delegate (False): queue a delegated operation instead

        Returns:
            an ``ExecutionResult``; ``.result`` is the summary dict
        """
        params = dict(
            brain_key=brain_key,
            label_field=label_field,
            reference_tag=reference_tag,
            overwrite=overwrite,
        )
        return c.execute(self, sample_collection, params, delegate=delegate)


def _form(inputs):
    return types.Property(
        inputs, view=types.View(label="Adapt embeddings to labels")
    )
