"""Step 1 of the workflow: compute an embedding for every image.

Writes a ``VectorField`` (default ``embeddings``) on the target samples,
whose ``info`` records the model, its input size and weights. With
``skip_existing`` only samples without a vector are embedded, so an
interrupted run resumes where it stopped. Images that cannot be read are
skipped, tagged ``embedding_failed`` and counted (or, with
``skip_failures`` off, fail the run).
"""

import os

import fiftyone.operators as foo
import fiftyone.operators.types as types

from prelabel import constants

from . import _common as c

NAME = "compute_embeddings"


def _default_workers():
    return min(2, os.cpu_count() or 1)


def _params(ctx):
    """The parameters as execution sees them (absent ones defaulted)."""
    p = ctx.params
    return {
        "model": p.get("model") or constants.DEFAULT_MODEL,
        "embeddings_field": p.get("embeddings_field")
        or constants.DEFAULT_EMBEDDINGS_FIELD,
        "batch_size": p.get("batch_size") or 64,
        "num_workers": p.get("num_workers"),
        "skip_existing": p.get("skip_existing", True),
        "skip_failures": p.get("skip_failures", True),
        "image_size": p.get("image_size"),
        "overwrite": bool(p.get("overwrite", False)),
        "patches_field": p.get("patches_field") or None,
        "num_runs": p.get("num_runs") or 1,
    }


class ComputeEmbeddings(foo.Operator):
    @property
    def config(self):
        return c.operator_config(
            NAME,
            label="Compute embeddings",
            description=(
                "Embeds every image with a model of the prelabel registry "
                "and stores the vectors in a field"
            ),
            icon="compute_embeddings",
        )

    def resolve_input(self, ctx):
        from prelabel import embedding_coverage, list_models
        from prelabel.embeddings import (
            check_embeddings_output,
            check_image_collection,
        )
        from prelabel.models import check_model_name
        from prelabel.units import check_patches_field

        inputs = types.Object()
        last = c.remembered(ctx, NAME)

        c.header(inputs, "targets_header", "Images")
        target = c.target_input(ctx, inputs, "Embed")

        c.header(
            inputs,
            "model_header",
            "Embedding model",
            "Vectors of one field must all come from one model.",
        )
        models = list_models()
        model_view = types.Dropdown()
        for name in models:
            model_view.add_choice(name, label=name)
        inputs.enum(
            "model",
            models,
            default=c.choose(last.get("model"), models)
            or constants.DEFAULT_MODEL,
            required=False,
            label="Model",
            description=(
                "efficientnet_lite0 ships ImageNet weights; pixels is the "
                "resized image itself (fast, good for digits)"
            ),
            view=model_view,
        )
        inputs.int(
            "image_size",
            min=8,
            default=last.get("image_size"),
            required=False,
            label="Input size (pixels)",
            description=(
                "Side of the square image the model sees; empty for the "
                "model's default. Smaller is faster"
            ),
        )
        fields = c.vector_fields(ctx.dataset)
        c.field_input(
            inputs,
            "embeddings_field",
            fields,
            last.get("embeddings_field") or constants.DEFAULT_EMBEDDINGS_FIELD,
            "Embeddings field",
            "The vector field to write; a new name creates it",
            allow_new=True,
        )
        c.patches_field_input(
            inputs,
            ctx.dataset,
            last.get("patches_field"),
            "Embed the crop of each box of this field, into an attribute "
            "of each box; empty for whole images",
        )
        inputs.bool(
            "skip_existing",
            default=True,
            label="Skip samples that already have a vector",
            description=(
                "Embeds only what is missing, so an interrupted run resumes"
            ),
        )
        inputs.bool(
            "skip_failures",
            default=True,
            label="Skip images that cannot be read",
            description=(
                "Tags them 'embedding_failed' and embeds the rest; off, an "
                "unreadable image fails the run"
            ),
        )
        c.overwrite_input(inputs, "the embeddings field")

        c.header(inputs, "perf_header", "Speed")
        inputs.int(
            "batch_size",
            min=1,
            default=last.get("batch_size") or 64,
            label="Batch size",
            description="Images the model sees at once",
        )
        inputs.int(
            "num_workers",
            min=0,
            default=last.get("num_workers", _default_workers()),
            required=False,
            label="Decoding workers",
            description="Processes that decode images; 0 decodes in-process",
        )

        inputs.int(
            "num_runs",
            min=1,
            default=1,
            required=False,
            label="Delegated runs",
            description=(
                "Split the images missing a vector into this many "
                "delegated runs, so that as many workers (`fiftyone "
                "delegated launch`, on this machine or others) embed them "
                "at once; 1 is one job"
            ),
        )

        p = _params(ctx)
        if p["num_runs"] > 1 and not p["skip_existing"]:
            c.show_error(
                inputs,
                f"num_runs={p['num_runs']}: a recompute replaces the field "
                f"in one job; turn 'skip existing' on or use 1 delegated run",
            )
        ok, _ = c.run_check(inputs, check_model_name, p["model"])
        ok = ok and c.run_check(inputs, check_image_collection, target)[0]
        if p["patches_field"]:
            ok = (
                ok
                and c.run_check(
                    inputs, check_patches_field, target, p["patches_field"]
                )[0]
            )
            if ok:
                embedded, total = embedding_coverage(
                    target, p["embeddings_field"], p["patches_field"]
                )
                inputs.view(
                    "field_status",
                    types.Notice(
                        label=f"{total - embedded} boxes have no vector"
                    ),
                )
        elif (
            c.run_check(
                inputs,
                check_embeddings_output,
                ctx.dataset,
                p["embeddings_field"],
            )[0]
            and ok
        ):
            _describe_field(inputs, target, p["embeddings_field"])

        return types.Property(
            inputs, view=types.View(label="Compute embeddings")
        )

    def resolve_delegation(self, ctx):
        # a split only queues its runs: it runs at once, never in the queue
        if _params(ctx)["num_runs"] > 1:
            return False
        return None

    def resolve_run_name(self, ctx):
        part = ctx.params.get("slice")
        if part:
            return f"{NAME} ({_which(part)})"
        return NAME

    def execute(self, ctx):
        from prelabel import IdRange, compute_embeddings

        p = _params(ctx)
        target = ctx.target_view(require_flat=True)
        part = ctx.params.get("slice")
        if part is None and p["num_runs"] > 1:
            return _queue_runs(self, ctx, target, p)
        if part is not None:
            target = IdRange.from_dict(part).of(target)
        num = compute_embeddings(
            target,
            model=p["model"],
            embeddings_field=p["embeddings_field"],
            batch_size=p["batch_size"],
            num_workers=p["num_workers"],
            skip_existing=p["skip_existing"],
            skip_failures=p["skip_failures"],
            progress=c.ProgressReporter(ctx),
            image_size=p["image_size"],
            overwrite=p["overwrite"],
            patches_field=p["patches_field"],
        )
        if part is None:
            c.remember(ctx, NAME, {**p, "overwrite": False})
        c.show_in_app(ctx)
        from prelabel import embedding_coverage

        embedded, total = embedding_coverage(
            target, p["embeddings_field"], p["patches_field"]
        )
        return {
            **({"run": _which(part)} if part else {}),
            "embedded": int(num),
            "failed": num.num_failed,
            "num_targets": total,
            "with_embeddings": embedded,
            "embeddings_field": p["embeddings_field"],
            "model": p["model"],
        }

    def resolve_output(self, ctx):
        return c.summary_output(
            ctx,
            "Embeddings computed",
            [
                ("queued_runs", "Delegated runs queued"),
                ("to_embed", "Images to embed, split between them"),
                ("next_step", "Next"),
                ("run", "Run"),
                ("embedded", "Samples embedded in this run"),
                ("failed", "Unreadable images (tagged embedding_failed)"),
                ("with_embeddings", "Targets with a vector now"),
                ("num_targets", "Targets"),
                ("embeddings_field", "Field"),
                ("model", "Model"),
            ],
        )

    def __call__(
        self,
        sample_collection,
        model=constants.DEFAULT_MODEL,
        embeddings_field=constants.DEFAULT_EMBEDDINGS_FIELD,
        batch_size=64,
        num_workers=None,
        skip_existing=True,
        image_size=None,
        skip_failures=True,
        overwrite=False,
        patches_field=None,
        num_runs=1,
        delegate=False,
    ):
        """Computes embeddings of ``sample_collection``.

        Args:
            sample_collection: a dataset or view of images
            model ("efficientnet_lite0"): a name from
                :func:`prelabel.models.list_models`
            embeddings_field ("embeddings"): the vector field to write
            batch_size (64): images per batch
            num_workers (None): decoding processes (package default)
            skip_existing (True): embed only samples without a vector
            image_size (None): the model input size; its default if None
            skip_failures (True): skip (tag and count) unreadable images
                instead of failing the run
            overwrite (False): allow replacing a vector field prelabel did
                not write (every sample of the field is then recomputed)
            patches_field (None): embed the crops of the boxes of this
                Detections field, into an attribute of each box
            num_runs (1): split the samples missing a vector into this
                many delegated runs, queued at once, for as many workers
                (the result lists their ids); only with ``skip_existing``
            delegate (False): queue a delegated operation instead

        Returns:
            an ``ExecutionResult``; ``.result`` is the summary dict
        """
        params = dict(
            model=model,
            embeddings_field=embeddings_field,
            batch_size=batch_size,
            num_workers=num_workers,
            skip_existing=skip_existing,
            image_size=image_size,
            skip_failures=skip_failures,
            overwrite=overwrite,
            patches_field=patches_field,
            num_runs=num_runs,
        )
        return c.execute(self, sample_collection, params, delegate=delegate)


def _which(part):
    """``"2 of 4"``: which run of a split ``part`` is."""
    return f"{part['index']} of {part['count']}"


def _queue_runs(operator, ctx, target, p):
    """Prepares the field and queues one delegated run per slice of the
    samples missing a vector, through FiftyOne's own queue: each worker
    that claims one embeds its slice in place."""
    import fiftyone.operators as foo

    from prelabel import plan_embedding_runs

    busy = _split_runs_in_flight(operator, target, p["embeddings_field"])
    if busy:
        raise ValueError(
            f"num_runs={p['num_runs']}: {len(busy)} run(s) of an earlier "
            f"split into {p['embeddings_field']!r} are queued or running "
            f"({', '.join(busy)}); a new split would embed their samples "
            f"twice. Let them finish, or mark a dead one failed (`fiftyone "
            f"delegated fail <id>`), then split again"
        )
    runs = plan_embedding_runs(
        target,
        p["num_runs"],
        model=p["model"],
        embeddings_field=p["embeddings_field"],
        image_size=p["image_size"],
        overwrite=p["overwrite"],
        patches_field=p["patches_field"],
    )
    ids = []
    for i, run in enumerate(runs, start=1):
        part = {**run.to_dict(), "index": i, "count": len(runs)}
        queued = foo.execute_operator(
            operator.uri,
            ctx=dict(
                view=target.view(),
                delegation_target=ctx.delegation_target,
            ),
            params={**p, "num_runs": 1, "skip_existing": True, "slice": part},
            request_delegation=True,
        )
        ids.append(str(queued.result["id"]))
    c.remember(ctx, NAME, {**p, "overwrite": False})
    return {
        "queued_runs": len(ids),
        "run_ids": ids,
        "to_embed": sum(run.size for run in runs),
        "embeddings_field": p["embeddings_field"],
        "model": p["model"],
        "next_step": (
            "Each worker takes one run: `fiftyone delegated launch`"
            if ids
            else "Every target already has a vector"
        ),
    }


def _split_runs_in_flight(operator, target, field):
    """The ids of the queued or running slices of earlier splits of this
    dataset into ``field``."""
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionRunState

    service = DelegatedOperationService()
    busy = []
    for state in (ExecutionRunState.QUEUED, ExecutionRunState.RUNNING):
        for doc in service.list_operations(
            operator=operator.uri,
            dataset_name=target._root_dataset.name,
            run_state=state,
        ):
            params = doc.context.request_params.get("params") or {}
            name = params.get("embeddings_field") or (
                constants.DEFAULT_EMBEDDINGS_FIELD
            )
            if params.get("slice") and name == field:
                busy.append(str(doc.id))
    return busy


def _describe_field(inputs, target, field):
    """A line on what the field holds now (model, coverage)."""
    dataset = target._root_dataset
    existing = dataset.get_field(field)
    if existing is None:
        inputs.view(
            "field_status",
            types.Notice(label=f"'{field}' is new; it will be created"),
        )
        return
    info = dict(existing.info or {})
    done = target.exists(field).count()
    source = (
        f" by {info.get('model')} at {info.get('image_size')} px"
        if info.get("model")
        else ""
    )
    inputs.view(
        "field_status",
        types.Notice(
            label=(f"{done} of {len(target)} targets have '{field}'{source}"),
            description=(
                "Another model with 'skip existing' on is refused; turn "
                "it off to recompute every target"
            ),
        ),
    )
