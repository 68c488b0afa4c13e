"""Step 2 of the workflow: put the embeddings (and reference labels) in a
Qdrant index.

Creates or updates a FiftyOne similarity run (``brain_key``) of prelabel's
backend on the whole dataset: an embedded Qdrant Edge index on disk
(default) or a collection on a Qdrant server. Only what changed since the
last sync is sent. Can compute missing embeddings first, in the same run.

The server URL and API key come from the plugin secrets
``PRELABEL_QDRANT_URL`` / ``PRELABEL_QDRANT_API_KEY`` (or environment
variables of those names); the API key is never a form field and never
stored in the run.
"""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from prelabel import constants

from . import _common as c

NAME = "sync_index"
LOCATIONS = ("embedded", "server")


def _params(ctx):
    """The parameters as execution sees them (absent ones defaulted)."""
    p = ctx.params
    label_field = p.get("label_field", constants.DEFAULT_LABEL_FIELD)
    return {
        "brain_key": p.get("brain_key") or constants.DEFAULT_BRAIN_KEY,
        "embeddings_field": p.get("embeddings_field")
        or constants.DEFAULT_EMBEDDINGS_FIELD,
        "label_field": label_field or None,
        "location": p.get("location") or "embedded",
        "url": p.get("url") or None,
        "compute_missing": bool(p.get("compute_missing", False)),
        "model": p.get("model") or constants.DEFAULT_MODEL,
        "image_size": p.get("image_size"),
        "rebuild": bool(p.get("rebuild", False)),
        "patches_field": p.get("patches_field") or None,
    }


class SyncIndex(foo.Operator):
    @property
    def config(self):
        return c.operator_config(
            NAME,
            label="Sync Qdrant index",
            description=(
                "Creates or updates the Qdrant index of the dataset's "
                "embeddings and labels (a similarity run)"
            ),
            icon="sync_index",
            view_target=False,
        )

    def resolve_input(self, ctx):
        from prelabel import embedding_coverage, list_models
        from prelabel.embeddings import check_embeddings_output
        from prelabel.indexing import check_sync_index
        from prelabel.models import check_model_name
        from prelabel.units import check_patches_field

        inputs = types.Object()
        dataset = ctx.dataset
        last = c.remembered(ctx, NAME)
        ours = c.our_brain_keys(dataset)
        url_secret, api_key = c.qdrant_credentials(ctx)

        c.header(
            inputs,
            "index_header",
            "Index",
            "The index mirrors the whole dataset; re-running sends only "
            "what changed.",
        )
        c.field_input(
            inputs,
            "brain_key",
            ours,
            last.get("brain_key") or constants.DEFAULT_BRAIN_KEY,
            "Brain key",
            "A new key creates an index; an existing one is updated",
            allow_new=True,
        )
        p = _params(ctx)
        run = None
        if p["brain_key"] in dataset.list_brain_runs():
            run = dataset.get_brain_info(p["brain_key"]).config

        vectors = c.vector_fields(dataset)
        labels = c.classification_fields(dataset)
        emb_default = (
            getattr(run, "embeddings_field", None)
            or last.get("embeddings_field")
            or constants.DEFAULT_EMBEDDINGS_FIELD
        )
        label_default = getattr(run, "label_field", None) or c.choose(
            last.get("label_field"),
            labels,
            c.choose(constants.DEFAULT_LABEL_FIELD, labels),
        )
        c.field_input(
            inputs,
            "embeddings_field",
            vectors,
            emb_default,
            "Embeddings field",
            "The vector field to index",
            allow_new=True,
        )
        c.patches_field_input(
            inputs,
            dataset,
            getattr(run, "patches_field", None) or last.get("patches_field"),
            "Index the boxes of this field (one point per box, with its "
            "own label; the embeddings field is then an attribute of each "
            "box); empty for whole images",
        )
        if not p["patches_field"]:
            c.field_input(
                inputs,
                "label_field",
                labels,
                label_default,
                "Label field",
                "Classification labels stored with the vectors: the votes "
                "of pre-annotation",
                required=False,
            )

        if run is not None and getattr(run, "method", None) == (
            constants.BACKEND_NAME
        ):
            inputs.view(
                "run_status",
                types.Notice(
                    label=(
                        f"Updates the {run.location} index of "
                        f"'{run.embeddings_field}'"
                    )
                ),
            )
            _rebuild_input(inputs, dataset, p["brain_key"])
        elif run is None:
            _location_inputs(inputs, p, url_secret, api_key)

        # missing embeddings: offer to compute them first, in this run
        emb, boxes = p["embeddings_field"], p["patches_field"]
        if boxes:
            check = (check_patches_field, dataset, boxes)
        else:
            check = (check_embeddings_output, dataset, emb)
        if not c.run_check(inputs, *check)[0]:
            return _form(inputs)
        embedded, total = embedding_coverage(dataset, emb, boxes)
        num_missing = total - embedded
        if num_missing:
            empty = embedded == 0
            inputs.view(
                "missing_embeddings",
                types.Warning(
                    label=(
                        f"'{emb}' does not exist"
                        if empty
                        and not boxes
                        and dataset.get_field(emb) is None
                        else f"{num_missing} of {total} "
                        f"{'boxes' if boxes else 'samples'} have no '{emb}'"
                    ),
                    description=(
                        "Compute them first in this run, or run 'Compute "
                        "embeddings'"
                        + ("" if empty else "; without them they are left out")
                    ),
                ),
            )
            inputs.bool(
                "compute_missing",
                default=False,
                label="Compute missing embeddings first",
                description="Embeds the samples without a vector, then syncs",
            )
            if p["compute_missing"]:
                models = list_models()
                model_view = types.Dropdown()
                for name in models:
                    model_view.add_choice(name, label=name)
                inputs.enum(
                    "model",
                    models,
                    default=constants.DEFAULT_MODEL,
                    label="Model",
                    description="The model to embed with",
                    view=model_view,
                )
                inputs.int(
                    "image_size",
                    min=8,
                    required=False,
                    label="Input size (pixels)",
                    description="Empty for the model's default",
                )
                if not c.run_check(inputs, check_model_name, p["model"])[0]:
                    return _form(inputs)

        if (
            p["location"] == "server"
            and run is None
            and not (p["url"] or url_secret)
        ):
            message = (
                "url: no Qdrant server URL; set the plugin secret "
                f"{c.URL_SECRET} or type the URL"
            )
            prop = inputs.get_property("url")
            if prop is not None:
                prop.invalid = True
                prop.error_message = message
            c.show_error(inputs, message)
            return _form(inputs)

        pending = p["compute_missing"] and num_missing > 0
        try:
            check_sync_index(
                dataset,
                embeddings_field=emb,
                label_field=p["label_field"],
                brain_key=p["brain_key"],
                url=p["url"] or url_secret,
                api_key=api_key,
                require_embeddings=not pending,
                patches_field=boxes,
            )
        except ValueError as e:
            c.show_error(inputs, e)
        except Exception as e:  # e.g. a server that cannot be reached
            c.show_error(inputs, f"Could not check the index: {e}")
        return _form(inputs)

    def execute(self, ctx):
        from prelabel import compute_embeddings, sync_index

        p = _params(ctx)
        dataset = ctx.dataset
        url_secret, api_key = c.qdrant_credentials(ctx)
        reporter = c.ProgressReporter(ctx)
        sync_progress = reporter
        embedded = 0
        if p["compute_missing"]:
            embedded = compute_embeddings(
                dataset,
                model=p["model"],
                embeddings_field=p["embeddings_field"],
                skip_existing=True,
                progress=reporter.stage(0.0, 0.7),
                image_size=p["image_size"],
                patches_field=p["patches_field"],
            )
            sync_progress = reporter.stage(0.7, 0.3)

        server = p["location"] == "server" or (
            p["brain_key"] in dataset.list_brain_runs()
        )
        results = sync_index(
            dataset,
            embeddings_field=p["embeddings_field"],
            label_field=p["label_field"],
            brain_key=p["brain_key"],
            url=(p["url"] or url_secret) if server else None,
            api_key=api_key if server else None,
            progress=sync_progress,
            rebuild=p["rebuild"],
            patches_field=p["patches_field"],
        )
        stats = results.last_sync
        c.remember(
            ctx,
            NAME,
            {k: v for k, v in p.items() if k not in ("url", "rebuild")},
        )
        c.show_in_app(ctx)
        return {
            "brain_key": p["brain_key"],
            "location": results.config.location,
            "embedded": embedded,
            "added": stats.added,
            "updated_vectors": stats.updated_vectors,
            "updated_payloads": stats.updated_payloads,
            "deleted": stats.deleted,
            "repaired": stats.repaired,
            "unchanged": stats.unchanged,
            "skipped": stats.skipped,
            "index_size": results.total_index_size,
        }

    def resolve_output(self, ctx):
        return c.summary_output(
            ctx,
            "Index synced",
            [
                ("brain_key", "Brain key"),
                ("location", "Where"),
                ("index_size", "Points in the index"),
                ("embedded", "Embeddings computed first"),
                ("added", "Added"),
                ("updated_vectors", "Vectors updated"),
                ("updated_payloads", "Labels/tags updated"),
                ("deleted", "Deleted"),
                ("repaired", "Repaired (damaged points written again)"),
                ("unchanged", "Unchanged"),
                ("skipped", "Skipped (no embedding)"),
            ],
        )

    def __call__(
        self,
        sample_collection,
        embeddings_field=constants.DEFAULT_EMBEDDINGS_FIELD,
        brain_key=constants.DEFAULT_BRAIN_KEY,
        label_field=constants.DEFAULT_LABEL_FIELD,
        url=None,
        location=None,
        compute_missing=False,
        model=constants.DEFAULT_MODEL,
        image_size=None,
        rebuild=False,
        patches_field=None,
        delegate=False,
    ):
        """Creates or updates the Qdrant index of the dataset of
        ``sample_collection``.

        Args:
            sample_collection: a dataset or a view of it (the whole dataset
                is indexed)
            embeddings_field ("embeddings"): the vector field to index
            brain_key ("prelabel_qdrant"): the similarity run to create or
                update
            label_field ("ground_truth"): the Classification field whose
                labels go in the index; None for none
            url (None): a Qdrant server URL (default: the plugin secret
                ``PRELABEL_QDRANT_URL``); the API key is read from
                ``PRELABEL_QDRANT_API_KEY``, never passed here
            location (None): ``"embedded"`` or ``"server"``; ``"server"``
                when a ``url`` is given
            compute_missing (False): compute missing embeddings first
            model ("efficientnet_lite0"): the model for ``compute_missing``
            image_size (None): its input size
            rebuild (False): delete the run's index and build it again
                (the way out of a damaged index)
            patches_field (None): index the boxes of this Detections
                field (``embeddings_field`` is then an attribute of each
                box; the boxes' own labels are stored)
            delegate (False): queue a delegated operation instead

        Returns:
            an ``ExecutionResult``; ``.result`` is the summary dict
        """
        if location is None:
            location = "server" if url else "embedded"
        params = dict(
            embeddings_field=embeddings_field,
            brain_key=brain_key,
            label_field=label_field,
            location=location,
            url=url,
            compute_missing=compute_missing,
            model=model,
            image_size=image_size,
            rebuild=rebuild,
            patches_field=patches_field,
        )
        return c.execute(self, sample_collection, params, delegate=delegate)


def _rebuild_input(inputs, dataset, brain_key):
    """The rebuild checkbox, with a warning when the index is damaged."""
    from prelabel import check_index

    try:
        health = check_index(dataset, brain_key, sample_size=32)
    except Exception as e:  # e.g. a server that cannot be reached
        health = None
        inputs.view(
            "index_unreadable",
            types.Warning(
                label="Could not check the index", description=str(e)
            ),
        )
    if health is not None and not health.ok:
        inputs.view(
            "index_damaged",
            types.Warning(
                label="The index is damaged",
                description=f"{health.problems[0]}; rebuild it from the "
                "dataset (tick below)",
            ),
        )
    inputs.bool(
        "rebuild",
        default=False,
        label="Rebuild from the dataset",
        description=(
            "Deletes this run's index (only prelabel's own files) and "
            "builds it again from the embeddings: the way out of a "
            "damaged index"
        ),
    )


def _location_inputs(inputs, p, url_secret, api_key):
    """Where a new index lives; the server's credentials are secrets."""
    radio = types.RadioGroup()
    radio.add_choice(
        "embedded",
        label="Embedded",
        description="Qdrant Edge in a folder on this machine; no server",
    )
    radio.add_choice(
        "server",
        label="Qdrant server",
        description="A collection on a Qdrant server or Qdrant Cloud",
    )
    inputs.enum(
        "location",
        list(LOCATIONS),
        default="embedded",
        label="Where the index lives",
        view=radio,
    )
    if p["location"] != "server":
        return
    inputs.str(
        "url",
        default=url_secret,
        required=False,
        label="Server URL",
        description=(
            f"Default: the plugin secret {c.URL_SECRET}. The API key is "
            f"read from the secret {c.API_KEY_SECRET}, never typed here"
        ),
    )
    inputs.view(
        "api_key_status",
        types.Notice(
            label=(
                f"API key: set ({c.API_KEY_SECRET})"
                if api_key
                else f"API key: none ({c.API_KEY_SECRET} is not set)"
            )
        ),
    )


def _form(inputs):
    return types.Property(inputs, view=types.View(label="Sync Qdrant index"))
