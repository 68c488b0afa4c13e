"""What the operators share: their config, progress forwarding, secrets,
the form inputs that pick fields and runs, package errors shown in the form,
remembered defaults, and the Python one-liner behind each ``__call__``.

No workflow logic lives here: that is the ``prelabel`` package's job.
"""

import os
import re

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types
from fiftyone.operators.executor import ExecutionContext, ValidationContext

from prelabel import constants
from prelabel import progress as pprogress

PLUGIN_NAME = constants.PLUGIN_NAME

#: plugin secrets (fiftyone.yml), with environment variables as fallback
URL_SECRET = "PRELABEL_QDRANT_URL"
API_KEY_SECRET = "PRELABEL_QDRANT_API_KEY"

#: the execution store that remembers each operator's last parameters
STORE_NAME = "prelabel_operators"

#: package errors start with ``param=value``; that names the input to flag
_PARAM_RE = re.compile(r"^(\w+)=")


def uri(name):
    return f"{PLUGIN_NAME}/{name}"


def operator_config(
    name, label, description, icon, long=True, view_target=True
):
    """The config every prelabel operator uses: dynamic forms, immediate or
    delegated execution, delegated by default for the long ones."""
    return foo.OperatorConfig(
        name=name,
        label=label,
        description=description,
        icon=f"/assets/{icon}.svg",
        dynamic=True,
        allow_immediate_execution=True,
        allow_delegated_execution=True,
        default_choice_to_delegated=long,
        view_target=view_target,
    )


# ---- progress ---------------------------------------------------------


class ProgressReporter:
    """A ``progress(fraction, label)`` callback for the package that
    forwards to ``ctx.set_progress``.

    Forwards at most once per ``step`` of progress (plus the first and the
    last report), so an immediate run does not flood the App and a
    delegated one does not write its run document per batch.

    Args:
        ctx: the execution context
        step (0.01): the smallest change of fraction worth reporting
    """

    def __init__(self, ctx, step=0.01):
        self.ctx = ctx
        self.step = step
        self._last = None

    def __call__(self, fraction, label, force=False):
        fraction = min(max(float(fraction), 0.0), 1.0)
        last = self._last
        if not force and last is not None:
            if fraction - last < self.step and not (fraction >= 1.0 > last):
                return
        self._last = fraction
        self.ctx.set_progress(progress=fraction, label=label)

    def stage(self, start, span):
        """A callback for one stage of a job (``start`` to
        ``start + span`` of the whole); its first report always shows, so
        that each stage's label is seen."""
        first = [True]

        def report(fraction, label):
            force, first[0] = first[0], False
            self(fraction, label, force=force)

        return pprogress.sub(report, start, span)


# ---- secrets ----------------------------------------------------------


def secret(ctx, key):
    """A plugin secret, or the environment variable of the same name."""
    value = None
    try:
        value = ctx.secrets[key]
    except Exception:  # no secrets backend in this context
        value = None
    # ``SecretsDictionary`` returns a secret object on a lazy lookup
    value = getattr(value, "value", value)
    return value or os.environ.get(key) or None


def qdrant_credentials(ctx):
    """``(url, api_key)`` from the plugin secrets or the environment."""
    return secret(ctx, URL_SECRET), secret(ctx, API_KEY_SECRET)


def load_index(ctx, dataset, brain_key):
    """The prelabel similarity results of ``brain_key``, with the server
    credentials of this context filled in (they are never stored in the
    run)."""
    import prelabel

    results = prelabel.load_index(
        dataset,
        brain_key=brain_key,
        patches_field=run_patches_field(dataset, brain_key),
    )
    config = results.config
    if config.location == "server":
        url, api_key = qdrant_credentials(ctx)
        if config.url is None and url:
            config.url = url
        if config.api_key is None and api_key:
            config.api_key = api_key
    return results


# ---- form pieces ------------------------------------------------------


def header(inputs, name, label, description=None):
    inputs.view(
        name,
        types.Header(label=label, description=description, divider=True),
    )


def show_error(inputs, error):
    """Shows a package error in the form and blocks execution.

    The package starts its messages with ``param=...``: the input of that
    name is flagged; any other message (and that one too, so that it is
    seen) is shown as an error line under the inputs.
    """
    message = str(error)
    match = _PARAM_RE.match(message)
    prop = inputs.get_property(match.group(1)) if match else None
    if prop is not None:
        prop.invalid = True
        prop.error_message = message
    inputs.view(
        "error",
        types.Error(label="Cannot run yet", description=message),
        invalid=True,
        error_message=message,
    )
    return message


def run_check(inputs, fn, *args, **kwargs):
    """Runs a package check; a ``ValueError`` is shown in the form.

    Returns:
        ``(ok, value)``
    """
    try:
        return True, fn(*args, **kwargs)
    except ValueError as e:
        show_error(inputs, e)
        return False, None


def our_brain_keys(dataset):
    """The similarity runs of ``dataset`` made by prelabel's backend."""
    return dataset.list_brain_runs(
        type="similarity", method=constants.BACKEND_NAME
    )


def detection_fields(samples):
    """The fields whose boxes can be embedded, indexed and labeled."""
    schema = samples.get_field_schema(
        embedded_doc_type=(fo.Detections, fo.Detection)
    )
    return sorted(schema)


def run_patches_field(dataset, brain_key):
    """The patches field a prelabel index holds the boxes of, or None."""
    if brain_key and brain_key in our_brain_keys(dataset):
        return dataset.get_brain_info(brain_key).config.patches_field
    return None


def patches_field_input(inputs, samples, default, description):
    """The optional "Boxes" input: a Detections field, or empty for whole
    images (not shown when the dataset has no boxes)."""
    choices = detection_fields(samples)
    if not choices:
        return
    field_input(
        inputs,
        "patches_field",
        choices,
        choose(default, choices),
        "Boxes (patches field)",
        description,
    )


def label_field_input(inputs, dataset, brain_key, remembered, what, boxes):
    """The label field of the chosen index, or for an index of boxes a
    notice saying that the boxes' own labels are used (``what``: the
    label field's description; ``boxes``: the notice's end)."""
    patches = run_patches_field(dataset, brain_key)
    if patches:
        inputs.view(
            "boxes_notice",
            types.Notice(
                label=f"An index of the boxes of '{patches}': {boxes}"
            ),
        )
        return patches
    labels = classification_fields(dataset)
    field_input(
        inputs,
        "label_field",
        labels,
        run_label_field(dataset, brain_key)
        or choose(remembered.get("label_field"), labels),
        "Label field",
        what,
    )
    return None


def classification_fields(samples):
    schema = samples.get_field_schema(embedded_doc_type=fo.Classification)
    return sorted(schema)


def vector_fields(samples):
    schema = samples.get_field_schema()
    return sorted(
        name
        for name, field in schema.items()
        if isinstance(field, (fo.VectorField, fo.ArrayField))
    )


def choose(value, choices, fallback=None):
    """``value`` if it is one of ``choices``, else ``fallback``."""
    return value if value in choices else fallback


def field_input(
    inputs,
    name,
    choices,
    default,
    label,
    description,
    required=False,
    allow_new=False,
):
    """A field-name input: a dropdown of ``choices``, or an autocomplete
    that also takes a new name when ``allow_new``."""
    if allow_new:
        view = types.AutocompleteView(allow_user_input=True)
    else:
        view = types.Dropdown()
    for choice in choices:
        view.add_choice(choice, label=choice)
    return inputs.str(
        name,
        default=default,
        required=required,
        label=label,
        description=description,
        view=view,
    )


def default_brain_key(dataset, remembered):
    """The brain key used when none is given: the last one used, else
    ``prelabel_qdrant``, else the only (first) prelabel index."""
    keys = our_brain_keys(dataset)
    key = choose(remembered.get("brain_key"), keys)
    if key is None:
        key = choose(constants.DEFAULT_BRAIN_KEY, keys)
    if key is None:
        key = keys[0] if keys else constants.DEFAULT_BRAIN_KEY
    return key


def run_label_field(dataset, brain_key):
    """The label field a prelabel index stores, or None."""
    if brain_key and brain_key in our_brain_keys(dataset):
        return dataset.get_brain_info(brain_key).config.label_field
    return None


def index_params(ctx, remembered):
    """``brain_key`` and ``label_field`` as execution sees them: the chosen
    index (default the remembered or first one) and its label field."""
    p = ctx.params
    brain_key = p.get("brain_key") or default_brain_key(
        ctx.dataset, remembered
    )
    patches = run_patches_field(ctx.dataset, brain_key)
    return {
        "brain_key": brain_key,
        "label_field": (None if patches else p.get("label_field"))
        or run_label_field(ctx.dataset, brain_key)
        or constants.DEFAULT_LABEL_FIELD,
        "patches_field": patches,
    }


def reference_tag_input(inputs, dataset, remembered, description):
    """The optional dropdown of the tag that selects the references."""
    tags = sorted(dataset.distinct("tags"))
    field_input(
        inputs,
        "reference_tag",
        tags,
        choose(remembered.get("reference_tag"), tags),
        "Reference tag",
        description,
        required=False,
    )


def vote_input(inputs, remembered):
    """The radio group of the kNN vote (``constants.VOTES``)."""
    VOTES = constants.VOTES

    view = types.RadioGroup()
    view.add_choice("majority", label="Majority", description="One vote each")
    view.add_choice(
        "weighted",
        label="Distance-weighted",
        description="Closer neighbors weigh more",
    )
    inputs.enum(
        "vote",
        list(VOTES),
        default=choose(remembered.get("vote"), VOTES, "majority"),
        label="Vote",
        view=view,
    )


def overwrite_input(inputs, what):
    """The checkbox that lets a run replace a field prelabel did not write
    (``overwrite=True``). Never remembered: each run asks again."""
    inputs.bool(
        "overwrite",
        default=False,
        required=False,
        label="Overwrite (overwrite=True)",
        description=(
            f"Replace {what} even if prelabel did not write it (for "
            "example labels a person reviewed). The ground truth is never "
            "overwritten"
        ),
    )


def brain_key_input(ctx, inputs, remembered):
    """A dropdown of this dataset's prelabel indexes.

    When there is none, the form says so, offers the operator that makes
    one, and is invalid.

    Returns:
        the chosen brain key, or None
    """
    keys = our_brain_keys(ctx.dataset)
    if not keys:
        message = (
            "This dataset has no prelabel Qdrant index yet; run 'Sync "
            "Qdrant index' first"
        )
        inputs.view(
            "no_index",
            types.Warning(label="No index", description=message),
        )
        inputs.btn(
            "open_sync_index",
            label="Sync Qdrant index",
            on_click=uri("sync_index"),
            prompt=True,
        )
        inputs.str(
            "brain_key",
            required=True,
            label="Index (brain key)",
            invalid=True,
            error_message=message,
        )
        return None

    default = default_brain_key(ctx.dataset, remembered)
    field_input(
        inputs,
        "brain_key",
        keys,
        default,
        "Index (brain key)",
        "The prelabel similarity run whose Qdrant index is queried",
    )
    return ctx.params.get("brain_key", default)


def target_input(ctx, inputs, action):
    """The usual target choice (dataset / current view / selection).

    Returns:
        the target collection
    """
    inputs.view_target(
        ctx,
        action_description=action,
        require_flat=True,
    )
    return ctx.target_view(require_flat=True)


# ---- remembered defaults ----------------------------------------------


def remembered(ctx, op_name):
    """The parameters of this operator's last run on this dataset."""
    try:
        return dict(ctx.store(STORE_NAME).get(op_name) or {})
    except Exception:  # no dataset, or no store in this deployment
        return {}


def remember(ctx, op_name, params):
    try:
        ctx.store(STORE_NAME).set(op_name, dict(params))
    except Exception:  # remembering is a convenience, never a failure
        pass


# ---- after a run ------------------------------------------------------


def show_in_app(ctx, view=None, fields=None):
    """After an immediate run: reload the App and show the result."""
    if ctx.delegated:
        return
    ctx.ops.reload_dataset()
    if view is not None:
        ctx.ops.set_view(view)
    if fields:
        ctx.ops.set_active_fields(fields)


def summary_output(ctx, title, rows):
    """A small read-only summary of ``ctx.results``.

    Args:
        rows: ``(key, label)`` pairs; missing or None values are skipped
    """
    outputs = types.Object()
    results = ctx.results or {}
    for key, label in rows:
        value = results.get(key)
        if value is None:
            continue
        if isinstance(value, bool):
            outputs.bool(key, label=label)
        elif isinstance(value, int):
            outputs.int(key, label=label)
        elif isinstance(value, float):
            outputs.float(key, label=label)
        else:
            outputs.str(key, label=label)
    return types.Property(outputs, view=types.View(label=title))


# ---- Python ----------------------------------------------------------


def execute(operator, sample_collection, params, delegate=False):
    """What every operator's ``__call__`` does.

    Validates ``params`` exactly as the App form does and raises a
    ``ValueError`` with the form's message, then runs the operator with
    ``foo.execute_operator`` (or queues it when ``delegate``).

    Returns:
        an :class:`fiftyone.operators.executor.ExecutionResult`; its
        ``result`` is the summary dict of an immediate run
    """
    # None means "the default", as an empty input in the App does
    params = {k: v for k, v in params.items() if v is not None}
    view = sample_collection.view()
    request = {
        "dataset_name": view._root_dataset.name,
        "view": view._serialize(),
        "params": dict(params),
    }
    ctx = ExecutionContext(
        request_params=request,
        operator_uri=operator.uri,
        required_secrets=operator._plugin_secrets,
    )
    validation = ValidationContext(ctx, operator.resolve_input(ctx), operator)
    if validation.invalid:
        raise ValueError(form_error(validation))
    return foo.execute_operator(
        operator.uri,
        ctx=dict(view=view),
        params=dict(params),
        request_delegation=delegate,
    )


def form_error(validation):
    """The first error of a :class:`ValidationContext`, as a sentence."""
    error = validation.errors[0]
    if error.custom:
        return error.reason
    path = error.path.lstrip(".")
    return f"{path}: {error.reason}"
