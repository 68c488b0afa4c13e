"""The plugin as FiftyOne runs it: loaded from a plugins directory by
FiftyOne's plugin system, every operator executed on real images through
``foo.execute_operator`` (immediately and delegated, the latter run to
completion by FiftyOne's own delegated-operation service), the forms
resolved with real execution contexts.

Progress is observed where FiftyOne sends it: an immediate run's
``ctx.set_progress`` becomes ``console_log`` requests of its executor, a
delegated run's goes to ``DelegatedOperationService.set_progress``.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import fiftyone as fo
import fiftyone.brain as fob
import fiftyone.operators as foo
import fiftyone.plugins as fop
import pytest
from bson import ObjectId
from conftest import make_digits_dataset
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import (
    ExecutionContext,
    ExecutionError,
    ExecutionRunState,
)
from fiftyone.operators.registry import OperatorRegistry

from prelabel import constants

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = "@prelabel/qdrant"
#: what a plugin install needs besides ``pip install`` of the package
PLUGIN_FILES = (
    "fiftyone.yml",
    "__init__.py",
    "operators",
    "panels",
    "assets",
)
#: the synthetic module name FiftyOne imports the plugin under
PLUGIN_MODULE = "fiftyone.plugins.orgs.prelabel.qdrant"
OPERATORS = (
    "compute_embeddings",
    "sync_index",
    "adapt_embeddings",
    "knn_preannotate",
    "find_label_mistakes",
    "select_for_labeling",
    "open_mistakes_panel",
)
PIXELS = dict(model="pixels", image_size=12, num_workers=0)
_PROGRESS = re.compile(r"^Progress: (\S+) - (.*)$")


def uri(name):
    return f"{PLUGIN}/{name}"


@pytest.fixture(scope="module", autouse=True)
def plugins_dir(session_dir):
    """A plugins dir holding this repo as a plugin (a symlink, as a
    developer installs it); FiftyOne reads ``plugins_dir`` on every
    lookup, so setting the config here is enough."""
    path = os.path.join(session_dir, "plugins")
    os.makedirs(path, exist_ok=True)
    link = os.path.join(path, "prelabel-qdrant")
    if not os.path.islink(link):
        os.symlink(REPO, link)
    old = fo.config.plugins_dir
    fo.config.plugins_dir = path
    yield path
    fo.config.plugins_dir = old


@pytest.fixture
def small_dataset(digit_images):
    """120 real digits: 60 tagged ``train``, 60 ``test``."""
    dataset = make_digits_dataset(digit_images, n=120)
    yield dataset
    if fo.dataset_exists(dataset.name):
        dataset.delete()


@pytest.fixture
def indexed(small_dataset):
    """The small dataset with pixel embeddings and a prelabel index,
    made by the plugin's own operators."""
    run("compute_embeddings", small_dataset, **PIXELS)
    run("sync_index", small_dataset)
    return small_dataset


def run(name, samples, request_delegation=False, **params):
    result = foo.execute_operator(
        uri(name),
        ctx=dict(view=samples.view()),
        params=params,
        request_delegation=request_delegation,
    )
    assert result.error is None, result.error
    return result


def requests(result):
    return result.executor.to_json()["requests"]


def progress_of(result):
    """``(fraction, label)`` of each ``ctx.set_progress`` of an immediate
    run, as FiftyOne forwarded it (console logs for the App)."""
    out = []
    for req in requests(result):
        if req["operator_uri"] == "console_log":
            match = _PROGRESS.match(req["params"]["message"])
            if match:
                out.append((float(match.group(1)), match.group(2)))
    return out


def triggered(result, op_name):
    return [
        r["params"] for r in requests(result) if r["operator_uri"] == op_name
    ]


def form(name, samples, **params):
    """The operator's form for ``params``, resolved as the App does."""
    operator = foo.get_operator(uri(name))
    view = samples.view()
    ctx = ExecutionContext(
        request_params={
            "dataset_name": view._root_dataset.name,
            "view": view._serialize(),
            "params": params,
        },
        operator_uri=operator.uri,
        required_secrets=operator._plugin_secrets,
    )
    prop = operator.resolve_type(ctx, "inputs")
    prop.to_json()  # what the App receives must serialize
    return prop.type.properties


def errors(properties):
    return {
        name: prop.error_message
        for name, prop in properties.items()
        if prop.invalid
    }


class RecordingService(DelegatedOperationService):
    """FiftyOne's delegated-operation service, noting each progress
    report it stores."""

    def __init__(self):
        super().__init__()
        self.progress = []

    def set_progress(self, doc_id, progress):
        self.progress.append((progress.progress, progress.label))
        return super().set_progress(doc_id, progress)


def assert_progress(progress, label):
    fractions = [f for f, _ in progress]
    assert fractions, "no progress was reported"
    assert fractions == sorted(fractions)
    assert fractions[-1] == pytest.approx(1.0)
    assert any(label in lbl for _, lbl in progress)


# ---- the plugin --------------------------------------------------------


def test_plugin_is_found_by_its_manifest_and_registers_every_operator():
    names = [p.name for p in fop.list_plugins()]
    assert PLUGIN in names
    definition = fop.get_plugin(PLUGIN)
    assert set(definition.secrets) == {
        "PRELABEL_QDRANT_URL",
        "PRELABEL_QDRANT_API_KEY",
    }
    assert OperatorRegistry().list_errors() == []

    listed = {op.uri: op for op in foo.list_operators(builtin=False)}
    for name in OPERATORS:
        operator = listed[uri(name)]
        config = operator.config
        assert config.dynamic
        assert config.allow_immediate_execution
        icon = os.path.join(REPO, config.icon.lstrip("/"))
        assert os.path.isfile(icon), icon
        assert callable(operator)
        assert set(operator._plugin_secrets) == set(definition.secrets)
    for name in OPERATORS[:5]:
        config = listed[uri(name)].config
        assert config.allow_delegated_execution
        assert config.default_choice_to_delegated
    # opening a panel needs the App: immediate only
    assert not listed[
        uri("open_mistakes_panel")
    ].config.allow_delegated_execution


def test_plugin_installs_by_copying_its_files(tmp_path, small_dataset):
    """What ``fiftyone plugins download`` leaves: the plugin files in a
    folder of the plugins dir; the logic comes from the installed
    ``prelabel`` package."""
    plugin = tmp_path / "plugins" / "prelabel"
    plugin.mkdir(parents=True)
    for name in PLUGIN_FILES:
        src = os.path.join(REPO, name)
        if os.path.isdir(src):
            shutil.copytree(
                src,
                plugin / name,
                ignore=shutil.ignore_patterns("__pycache__"),
            )
        else:
            shutil.copy(src, plugin / name)

    old = fo.config.plugins_dir
    fo.config.plugins_dir = str(tmp_path / "plugins")
    # the plugin's submodules must come from the copy, not from an
    # earlier load of the repo in this process
    forget_plugin_modules()
    try:
        (found,) = [p for p in fop.list_plugins() if p.name == PLUGIN]
        assert os.path.realpath(found.directory) == str(plugin)
        assert OperatorRegistry().list_errors() == []
        uris = {op.uri for op in foo.list_operators(builtin=False)}
        assert {uri(n) for n in OPERATORS} <= uris
        assert "mistakes_panel" in {
            op.name for op in foo.list_operators(type="panel")
        }
        loaded = sys.modules[PLUGIN_MODULE + ".operators"].__file__
        assert loaded.startswith(str(plugin))
        result = run("compute_embeddings", small_dataset, **PIXELS)
        assert result.result["embedded"] == len(small_dataset)
    finally:
        fo.config.plugins_dir = old
        forget_plugin_modules()


def forget_plugin_modules():
    for name in list(sys.modules):
        if name == PLUGIN_MODULE or name.startswith(PLUGIN_MODULE + "."):
            del sys.modules[name]


# ---- compute_embeddings ------------------------------------------------


def test_compute_embeddings_writes_vectors_and_reports_progress(
    small_dataset,
):
    result = run("compute_embeddings", small_dataset, **PIXELS)

    field = small_dataset.get_field("embeddings")
    assert isinstance(field, fo.VectorField)
    assert field.info["model"] == "pixels"
    vectors = small_dataset.values("embeddings")
    assert all(v is not None and len(v) == 144 for v in vectors)
    assert result.result == {
        "embedded": 120,
        "num_targets": 120,
        "with_embeddings": 120,
        "embeddings_field": "embeddings",
        "model": "pixels",
        "failed": 0,
    }
    assert_progress(progress_of(result), "Embedding images with pixels")
    assert triggered(result, "reload_dataset")

    # skip_existing: a second run has nothing to do
    again = run("compute_embeddings", small_dataset, **PIXELS)
    assert again.result["embedded"] == 0


def test_compute_embeddings_on_selected_samples_with_efficientnet(
    small_dataset,
):
    selected = small_dataset.take(6, seed=1).values("id")
    result = foo.execute_operator(
        uri("compute_embeddings"),
        ctx=dict(view=small_dataset.view(), selected=selected),
        params=dict(
            model="efficientnet_lite0",
            image_size=32,
            num_workers=0,
            embeddings_field="eff",
            view_target="SELECTED_SAMPLES",
        ),
    )
    assert result.result["embedded"] == 6
    embedded = small_dataset.exists("eff")
    assert sorted(embedded.values("id")) == sorted(selected)
    assert {len(v) for v in embedded.values("eff")} == {1280}


def test_compute_embeddings_form(small_dataset):
    props = form("compute_embeddings", small_dataset)
    assert props["model"].default == "efficientnet_lite0"
    assert "pixels" in props["model"].type.values
    assert errors(props) == {}

    props = form(
        "compute_embeddings", small_dataset, embeddings_field="ground_truth"
    )
    assert "not a VectorField" in errors(props)["embeddings_field"]


#: a FiftyOne delegated worker that takes one queued run of a dataset (as
#: ``fiftyone delegated launch`` does, claiming it through FiftyOne's
#: queue so that two workers never run the same one) and reports it
WORKER = """
import json, os, signal, sys
import fiftyone as fo
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionRunState

if os.environ.get("KILL_AT_WRITE"):
    # the worker dies as its run writes its first vectors
    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    fo.Dataset.set_values = killed

service = DelegatedOperationService()
for op in service.list_operations(
    dataset_name=sys.argv[1], run_state=ExecutionRunState.QUEUED
):
    result = service.execute_operation(op)
    if result is not None:
        print(json.dumps({"id": str(op.id), "error": result.error}))
        break
"""


def test_compute_embeddings_split_between_two_workers(
    small_dataset, plugins_dir
):
    done = small_dataset.limit(20)
    run("compute_embeddings", done, **PIXELS)
    before = done.values("embeddings")

    # the split itself runs at once, even when asked to be delegated
    queued = run(
        "compute_embeddings",
        small_dataset,
        request_delegation=True,
        num_runs=2,
        **PIXELS,
    )

    assert not queued.delegated
    assert queued.result["queued_runs"] == 2
    assert queued.result["to_embed"] == 100
    run_ids = queued.result["run_ids"]
    service = DelegatedOperationService()
    docs = [service.get(ObjectId(i)) for i in run_ids]
    assert [d.run_state for d in docs] == [ExecutionRunState.QUEUED] * 2
    assert [d.label for d in docs] == [
        "compute_embeddings (1 of 2)",
        "compute_embeddings (2 of 2)",
    ]
    assert len(small_dataset.exists("embeddings")) == 20
    # a second split while these wait would embed their samples twice
    with pytest.raises(ExecutionError, match="2 run.*queued or running"):
        run("compute_embeddings", small_dataset, num_runs=3, **PIXELS)

    env = dict(os.environ, FIFTYONE_PLUGINS_DIR=plugins_dir)
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, small_dataset.name],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    reports = []
    for worker in workers:
        out, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))

    # each worker ran one run, and each run ran once
    assert sorted(r["id"] for r in reports) == sorted(run_ids)
    assert [r["error"] for r in reports] == [None, None]
    results = [service.get(ObjectId(i)).result.result for i in run_ids]
    assert [r["run"] for r in results] == ["1 of 2", "2 of 2"]
    assert [r["embedded"] for r in results] == [50, 50]
    small_dataset.reload()
    vectors = small_dataset.values("embeddings")
    assert all(v is not None and len(v) == 144 for v in vectors)
    assert all(
        (a == b).all()
        for a, b in zip(before, done.values("embeddings"), strict=True)
    )

    # nothing left: nothing queued
    again = run("compute_embeddings", small_dataset, num_runs=2, **PIXELS)
    assert again.result["queued_runs"] == 0
    assert again.result["next_step"] == "Every target already has a vector"


def _worker(dataset, plugins_dir, **env):
    return subprocess.run(
        [sys.executable, "-c", WORKER, dataset.name],
        env=dict(os.environ, FIFTYONE_PLUGINS_DIR=plugins_dir, **env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_killed_worker_leaves_its_slice_to_a_new_split(
    small_dataset, plugins_dir
):
    queued = run("compute_embeddings", small_dataset, num_runs=2, **PIXELS)

    dead = _worker(small_dataset, plugins_dir, KILL_AT_WRITE="1")
    assert dead.returncode == -signal.SIGKILL, dead.stderr
    done = _worker(small_dataset, plugins_dir)
    assert done.returncode == 0, done.stderr
    finished = json.loads(done.stdout.strip().splitlines()[-1])["id"]
    (first,) = set(queued.result["run_ids"]) - {finished}

    # the dead run still reads as running: a new split waits for it
    service = DelegatedOperationService()
    assert service.get(ObjectId(first)).run_state == (
        ExecutionRunState.RUNNING
    )
    with pytest.raises(ExecutionError, match=f"1 run.*{first}"):
        run("compute_embeddings", small_dataset, num_runs=2, **PIXELS)
    small_dataset.reload()
    assert len(small_dataset.exists("embeddings")) == 60

    # marked failed (`fiftyone delegated fail`), its slice is split again
    service.set_failed(ObjectId(first))
    again = run("compute_embeddings", small_dataset, num_runs=2, **PIXELS)
    assert again.result["to_embed"] == 60
    for _ in again.result["run_ids"]:
        assert _worker(small_dataset, plugins_dir).returncode == 0
    small_dataset.reload()
    assert len(small_dataset.exists("embeddings", False)) == 0


def test_a_split_run_does_not_recompute(small_dataset):
    props = form(
        "compute_embeddings",
        small_dataset,
        num_runs=2,
        skip_existing=False,
        **PIXELS,
    )
    assert "in one job" in errors(props)["num_runs"]
    op = foo.get_operator(uri("compute_embeddings"))
    with pytest.raises(ValueError, match="num_runs=2"):
        op(small_dataset, skip_existing=False, num_runs=2, **PIXELS)
    assert not small_dataset.has_field("embeddings")


# ---- sync_index ----------------------------------------------------------


def test_sync_index_offers_to_compute_missing_embeddings(small_dataset):
    props = form("sync_index", small_dataset)
    assert "missing_embeddings" in props
    assert "compute_missing" in props
    assert "does not exist" in errors(props)["embeddings_field"]
    # the API key is a secret, never a form field
    assert "api_key" not in props

    props = form(
        "sync_index", small_dataset, compute_missing=True, model="pixels"
    )
    assert errors(props) == {}
    assert props["model"].default == "efficientnet_lite0"

    result = run(
        "sync_index",
        small_dataset,
        compute_missing=True,
        model="pixels",
        image_size=12,
    )
    assert result.result["embedded"] == 120
    assert result.result["added"] == 120
    assert result.result["index_size"] == 120
    assert result.result["location"] == "embedded"
    progress = progress_of(result)
    assert_progress(progress, "Syncing index")
    assert any("Embedding" in label for _, label in progress)

    assert small_dataset.list_brain_runs() == ["prelabel_qdrant"]
    info = small_dataset.get_brain_info("prelabel_qdrant")
    assert info.config.method == "prelabel_qdrant"
    assert info.config.label_field == "ground_truth"

    # re-running sends only what changed
    sample = small_dataset.first()
    sample.ground_truth.label = (
        "0" if sample.ground_truth.label != "0" else "1"
    )
    sample.save()
    again = run("sync_index", small_dataset)
    assert again.result["updated_payloads"] == 1
    assert again.result["added"] == 0


def test_sync_index_form_checks(indexed, monkeypatch):
    indexed.add_sample_field(
        "dets", fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections
    )
    props = form("sync_index", indexed, label_field="dets")
    assert "holds Detections, not Classification" in (
        errors(props)["label_field"]
    )

    props = form("sync_index", indexed, embeddings_field="other")
    assert "does not exist" in errors(props)["embeddings_field"]

    # an existing run of another backend
    fob.compute_similarity(
        indexed, embeddings="embeddings", brain_key="sk", backend="sklearn"
    )
    props = form("sync_index", indexed, brain_key="sk")
    assert "another backend" in errors(props)["brain_key"]

    # a server index needs a URL, from the plugin secret or the form
    monkeypatch.delenv("PRELABEL_QDRANT_URL", raising=False)
    props = form("sync_index", indexed, brain_key="new", location="server")
    assert "PRELABEL_QDRANT_URL" in errors(props)["url"]
    monkeypatch.setenv("PRELABEL_QDRANT_URL", "http://qdrant.example:6333")
    props = form("sync_index", indexed, brain_key="new", location="server")
    assert props["url"].default == "http://qdrant.example:6333"
    assert errors(props) == {}

    with pytest.raises(ValueError, match="another backend"):
        foo.get_operator(uri("sync_index"))(indexed, brain_key="sk")


# ---- knn_preannotate -----------------------------------------------------


def test_knn_preannotate_immediate(indexed):
    targets = indexed.match_tags("test")
    result = run(
        "knn_preannotate",
        targets,
        brain_key="prelabel_qdrant",
        label_field="ground_truth",
        reference_tag="train",
        pred_field="prelabel",
        k=5,
        vote="majority",
        eval_key="prelabel_eval",
    )
    out = result.result
    assert out["num_targets"] == 60
    assert out["num_labeled"] == 60
    assert out["eval_key"] == "prelabel_eval"
    assert out["accuracy"] > 0.6  # 60 references, 10 classes

    preds = targets.values("prelabel")
    assert all(isinstance(p, fo.Classification) for p in preds)
    assert all(0 < p.confidence <= 1 for p in preds)
    assert len(indexed.match_tags("train").exists("prelabel")) == 0
    assert indexed.list_evaluations() == ["prelabel_eval"]
    info = indexed.get_evaluation_info("prelabel_eval")
    assert info.config.pred_field == "prelabel"
    assert info.config.gt_field == "ground_truth"

    assert_progress(progress_of(result), "Pre-annotating")
    (set_view,) = triggered(result, "set_view")
    stages = [s["_cls"].rsplit(".", 1)[-1] for s in set_view["view"]]
    assert stages[-2:] == ["Exists", "SortBy"]
    assert triggered(result, "reload_dataset")
    assert triggered(result, "set_active_fields")[0]["fields"] == [
        "prelabel",
        "ground_truth",
    ]

    # the form remembers this run
    props = form("knn_preannotate", targets)
    assert props["k"].default == 5
    assert props["reference_tag"].default == "train"
    assert props["eval_key"].default == "prelabel_eval"


def test_knn_preannotate_call_wrapper_and_min_confidence(indexed):
    op = foo.get_operator(uri("knn_preannotate"))
    result = op(
        indexed.match_tags("test"),
        brain_key="prelabel_qdrant",
        reference_tag="train",
        pred_field="strict",
        k=7,
        min_confidence=0.99,
    )
    out = result.result
    assert out["num_labeled"] + out["num_review"] == 60
    assert out["num_review"] > 0
    assert out["eval_key"] is None
    review = indexed.match_tags("needs_review")
    assert len(review) == out["num_review"]
    assert len(review.exists("strict")) == 0
    assert indexed.list_evaluations() == []


def test_knn_preannotate_form_and_python_checks(indexed):
    targets = indexed.match_tags("test")
    op = foo.get_operator(uri("knn_preannotate"))
    base = dict(brain_key="prelabel_qdrant", reference_tag="train", k=5)
    indexed.add_sample_field(
        "dets", fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections
    )

    cases = [
        (dict(k=500), "k", "larger than the reference set"),
        (dict(reference_tag="nope"), "error", "reference set is empty"),
        (dict(pred_field="ground_truth"), "pred_field", "ground-truth"),
        (dict(pred_field="dets"), "pred_field", "holds Detections"),
        (dict(label_field="dets"), "label_field", "index stores labels"),
        (dict(brain_key="missing"), "brain_key", "is not a run of"),
        (dict(eval_key="1bad"), "eval_key", "not a valid name"),
    ]
    for change, prop, message in cases:
        params = {**base, **change}
        props = form("knn_preannotate", targets, **params)
        found = errors(props)
        assert message in found.get(prop, ""), (change, found)
        assert message in found["error"]
        with pytest.raises(ValueError, match=re.escape(message)):
            op(targets, **params)
        with pytest.raises(ExecutionError, match=re.escape(message)):
            foo.execute_operator(
                uri("knn_preannotate"),
                ctx=dict(view=targets),
                params=params,
            )
    assert not indexed.has_field("prelabel")

    # a run of another backend
    fob.compute_similarity(
        indexed, embeddings="embeddings", brain_key="sk", backend="sklearn"
    )
    props = form("knn_preannotate", targets, **{**base, "brain_key": "sk"})
    assert "another backend" in errors(props)["brain_key"]
    # the dropdown offers prelabel indexes only
    choices = [c.value for c in props["brain_key"].view.choices]
    assert choices == ["prelabel_qdrant"]

    # targets embedded with another model than the index's (the samples
    # outside the targets lose their vectors: one model per field)
    from prelabel.embeddings import compute_embeddings

    compute_embeddings(
        targets,
        model="pixels",
        image_size=8,
        skip_existing=False,
        overwrite=True,
        progress=False,
        num_workers=0,
    )
    props = form("knn_preannotate", targets, **base)
    assert "64-d but the index holds 144-d" in errors(props)["error"]


def test_knn_preannotate_accepts_what_the_references_say_is_safe(indexed):
    targets = indexed.match_tags("test")
    result = run(
        "knn_preannotate",
        targets,
        reference_tag="train",
        k=5,
        mode="adapted",
        target_precision=0.9,
        eval_key="ev",
    )
    out = result.result
    # voted in the index of adapted embeddings, made on the way
    assert out["brain_key"] == "prelabel_qdrant_adapted"
    assert "prelabel_qdrant_adapted" in indexed.list_brain_runs()
    assert indexed.has_field("embeddings_adapted")
    assert out["num_labeled"] == 60
    assert out["num_accepted"] + out["num_review"] == 60
    assert 0.0 <= out["expected_coverage"] <= 1.0
    assert 0.0 <= out["ece"] <= 1.0 and out["reference_accuracy"] > 0.5
    is_accepted = fo.ViewField("prelabel.accepted") == True  # noqa: E712
    accepted = targets.match(is_accepted)
    assert len(accepted) == out["num_accepted"]
    assert len(indexed.match_tags("needs_review")) == out["num_review"]
    # the calibrated confidence is written, the vote's share beside it
    pred = targets.first().prelabel
    assert pred.raw_confidence is not None and pred.vote_share is not None

    # the form offers the choices and remembers them
    props = form("knn_preannotate", targets)
    assert [c.value for c in props["mode"].view.choices] == [
        "knn",
        "adapted",
    ]
    assert props["mode"].default == "adapted"
    assert props["target_precision"].default == 0.9
    # a bad target says what is wrong, in the form and from Python
    props = form(
        "knn_preannotate", targets, reference_tag="train", target_precision=2
    )
    assert "target_precision must be a number" in errors(props)["error"]
    op = foo.get_operator(uri("knn_preannotate"))
    with pytest.raises(ValueError, match="target_precision: Value must be"):
        op(targets, reference_tag="train", target_precision=2)


def test_knn_preannotate_checks_precision_on_the_random_picks(indexed):
    """Once 'Select for labeling' has tagged random picks, the form
    offers them as the samples that check the precision (all still
    vote), and the run measures its threshold on them alone."""
    targets = indexed.match_tags("test")
    fair = constants.FAIR_TAG
    props = form("knn_preannotate", targets, target_precision=0.8)
    assert props["calibration_tag"].default is None  # none tagged yet
    train = indexed.match_tags("train")
    train.take(40, seed=0).tag_samples(fair)
    try:
        props = form("knn_preannotate", targets, target_precision=0.8)
        assert props["calibration_tag"].default == fair
        out = run(
            "knn_preannotate",
            targets,
            reference_tag="train",
            k=5,
            pred_field="checked",
            target_precision=0.8,
            calibration_tag=fair,
        ).result
        run_record = indexed.info["prelabel_runs"]["checked"]
        assert run_record["calibration_reference"] == fair
        assert run_record["num_calibration"] == 40
        assert out["num_labeled"] == 60
        # a tag that no voting sample carries is refused in the form
        props = form(
            "knn_preannotate",
            targets,
            reference_tag="train",
            target_precision=0.8,
            calibration_tag="nope",
        )
        assert "calibration_reference selects none" in errors(props)["error"]
    finally:
        indexed.untag_samples([fair, constants.REVIEW_TAG])
        if indexed.has_field("checked"):
            indexed.delete_sample_field("checked")


def test_adapt_embeddings_operator_makes_an_index_to_vote_in(indexed):
    result = run("adapt_embeddings", indexed, reference_tag="train")
    out = result.result
    assert out["brain_key"] == "prelabel_qdrant_adapted"
    assert out["embeddings_field"] == "embeddings_adapted"
    assert out["num_reference"] == 60 and out["num_classes"] == 10
    assert 0.0 < out["reference_accuracy"] <= 1.0
    assert_progress(progress_of(result), "adapted")
    # every embedded sample got an adapted vector, in the new index
    assert len(indexed.exists("embeddings_adapted")) == 120
    info = indexed.get_brain_info("prelabel_qdrant_adapted")
    assert info.config.embeddings_field == "embeddings_adapted"
    # pre-annotate from it through the usual operator
    voted = run(
        "knn_preannotate",
        indexed.match_tags("test"),
        brain_key="prelabel_qdrant_adapted",
        reference_tag="train",
        k=5,
    ).result
    assert voted["num_labeled"] == 60

    props = form(
        "adapt_embeddings", indexed, brain_key="prelabel_qdrant_adapted"
    )
    assert "already holds adapted embeddings" in errors(props)["error"]
    props = form("adapt_embeddings", indexed, reference_tag="nope")
    assert "label at least 4 samples" in errors(props)["error"]
    op = foo.get_operator(uri("adapt_embeddings"))
    with pytest.raises(ValueError, match="label at least 4 samples"):
        op(indexed, reference_tag="nope")


def test_knn_preannotate_without_index_warns(small_dataset):
    props = form("knn_preannotate", small_dataset)
    assert "no_index" in props
    assert "no prelabel Qdrant index" in errors(props)["brain_key"]
    assert props["open_sync_index"].view.operator == uri("sync_index")


def test_knn_preannotate_delegated_runs_to_completion(indexed):
    targets = indexed.match_tags("test")
    queued = run(
        "knn_preannotate",
        targets,
        request_delegation=True,
        brain_key="prelabel_qdrant",
        reference_tag="train",
        k=5,
        eval_key="ev",
    )
    assert queued.delegated
    assert queued.result["run_state"] == ExecutionRunState.QUEUED
    assert not indexed.has_field("prelabel")

    service = RecordingService()
    (done,) = service.execute_queued_operations(dataset_name=indexed.name)
    assert done.error is None, done.error
    assert done.result["num_labeled"] == 60
    assert done.result["eval_key"] == "ev"

    doc = service.get(queued.result["id"])
    assert doc.run_state == ExecutionRunState.COMPLETED
    assert doc.result.result["accuracy"] == done.result["accuracy"]
    assert doc.status.progress == pytest.approx(1.0)
    assert_progress(service.progress, "Pre-annotating")

    indexed.reload()
    assert len(indexed.exists("prelabel")) == 60
    assert indexed.list_evaluations() == ["ev"]


# ---- find_label_mistakes -------------------------------------------------


def test_find_label_mistakes_ranks_flipped_labels_first(indexed):
    # flip five labels, then bring the index's payloads up to date
    # the same five every run (take(seed=...) draws on random sample keys)
    flipped = indexed.match_tags("train").sort_by("filepath").limit(5)
    for sample in flipped:
        old = sample.ground_truth.label
        sample.ground_truth.label = str((int(old) + 5) % 10)
        sample.save()
    flipped_ids = set(flipped.values("id"))
    synced = run("sync_index", indexed)
    assert synced.result["updated_payloads"] == 5

    op = foo.get_operator(uri("find_label_mistakes"))
    result = op(indexed, brain_key="prelabel_qdrant", k=5)
    out = result.result
    assert out["num_scored"] == 120
    assert out["score_field"] == "mistake_score"
    assert out["neighbors_field"] == "mistake_score_label"
    assert out["num_disagree"] >= 4

    assert _in_top(indexed, flipped_ids, 10) >= 4
    assert_progress(progress_of(result), "Scoring labels")
    (set_view,) = triggered(result, "set_view")
    assert set_view["view"][-1]["_cls"].endswith("SortBy")

    props = form("find_label_mistakes", indexed, score_field="ground_truth")
    assert "would overwrite" in errors(props)["score_field"]
    props = form("find_label_mistakes", indexed, k=500)
    assert "larger than the reference set" in errors(props)["k"]


def test_select_for_labeling_tags_the_picks_and_forecasts(indexed):
    # a pre-annotation to doubt: the test half, from the train half,
    # with an accept threshold (what a forecast starts from)
    run(
        "knn_preannotate",
        indexed.match_tags("test"),
        reference_tag="train",
        k=5,
        target_precision=0.9,  # leaves more than 12 for review
    )
    op = foo.get_operator(uri("select_for_labeling"))
    unlabeled = indexed.match_tags("test")
    # the test half counts as unlabeled: hide its labels
    unlabeled.set_field("ground_truth", None).save()
    result = op(indexed, budget=12, strategy="uncertain", random_share=0.25)
    out = result.result
    assert out["num_picked"] == 12 and out["num_random"] == 3
    assert out["strategy"] == "uncertain"
    assert out["forecast"].startswith("labeling 12 more")
    picked = indexed.match_tags("to_label")
    assert len(picked) == 12
    assert not picked.exists("ground_truth")
    assert len(indexed.load_saved_view("to_label")) == 12
    (set_view,) = triggered(result, "set_view")
    assert set_view["view"]
    assert_progress(progress_of(result), "neighbor graph")

    props = form("select_for_labeling", indexed, strategy="smart")
    assert "strategy" in errors(props)["strategy"]
    props = form("select_for_labeling", indexed, random_share=2.0)
    assert "random_share" in errors(props)["random_share"]


def test_select_for_labeling_delegated(indexed):
    indexed.match_tags("test").set_field("ground_truth", None).save()
    queued = run(
        "select_for_labeling", indexed, request_delegation=True, budget=5
    )
    assert queued.delegated
    assert not indexed.match_tags("to_label")

    service = RecordingService()
    (done,) = service.execute_queued_operations(dataset_name=indexed.name)
    assert done.error is None, done.error
    assert done.result["num_picked"] == 5
    assert done.result["strategy"] == "spread"
    assert_progress(service.progress, "neighbor graph")
    picked = indexed.match_tags("to_label")
    assert len(picked) == 5 and not picked.exists("ground_truth")


def test_find_label_mistakes_adapted_method(indexed):
    # the same five every run (take(seed=...) draws on random sample keys)
    flipped = indexed.match_tags("train").sort_by("filepath").limit(5)
    for sample in flipped:
        old = sample.ground_truth.label
        sample.ground_truth.label = str((int(old) + 5) % 10)
        sample.save()
    run("sync_index", indexed)
    out = run("find_label_mistakes", indexed, k=5, method="adapted").result
    assert out["num_scored"] == 120
    assert _in_top(indexed, set(flipped.values("id")), 10) >= 4
    props = form("find_label_mistakes", indexed)
    assert props["method"].default == "adapted"
    props = form("find_label_mistakes", indexed, method="nope")
    assert "method" in errors(props)


def _in_top(dataset, ids, n, field="mistake_score"):
    """How many of ``ids`` score at least the ``n``-th highest score (a
    tie at the cut counts: the vote of 5 neighbors has few values)."""
    cut = sorted(dataset.values(field), reverse=True)[n - 1]
    return sum(s >= cut for s in dataset.select(list(ids)).values(field))


def test_find_label_mistakes_delegated(indexed):
    op = foo.get_operator(uri("find_label_mistakes"))
    queued = op(
        indexed.match_tags("train"),
        k=5,
        score_field="suspicion",
        delegate=True,
    )
    assert queued.delegated
    service = RecordingService()
    (done,) = service.execute_queued_operations(dataset_name=indexed.name)
    assert done.error is None, done.error
    assert service.get(queued.result["id"]).run_state == "completed"
    assert done.result["num_scored"] == 60
    assert_progress(service.progress, "Scoring labels")
    indexed.reload()
    assert len(indexed.exists("suspicion")) == 60


# ---- open_mistakes_panel -------------------------------------------------


def test_open_mistakes_panel(indexed):
    props = form("open_mistakes_panel", indexed)
    assert "nothing to review yet" in errors(props)["error"]

    run(
        "knn_preannotate",
        indexed.match_tags("test"),
        reference_tag="train",
        k=5,
        eval_key="ev",
    )
    run("find_label_mistakes", indexed, k=5)
    props = form("open_mistakes_panel", indexed)
    assert props["pred_field"].default == "prelabel"
    assert props["eval_key"].default == "ev"
    assert props["score_field"].default == "mistake_score"
    assert errors(props) == {}

    op = foo.get_operator(uri("open_mistakes_panel"))
    result = op(indexed, pred_field="prelabel", eval_key="ev")
    (opened,) = triggered(result, "open_panel")
    assert opened["name"] == "mistakes_panel"
    assert opened["state"] == {
        "pred_field": "prelabel",
        "gt_field": "ground_truth",
        "eval_key": "ev",
        "score_field": "mistake_score",
    }
    assert result.result == {"panel": "mistakes_panel", **opened["state"]}

    with pytest.raises(ValueError, match="not an evaluation"):
        op(indexed, pred_field="prelabel", eval_key="nope")
    with pytest.raises(ValueError, match="does not exist"):
        op(indexed, pred_field="nothing")
    with pytest.raises(ValueError, match="not a score written"):
        op(indexed, score_field="ground_truth")


def test_a_person_s_field_needs_the_overwrite_box(indexed):
    """A field prelabel did not write is refused in the form, naming the
    input and the box that allows it; with the box ticked the run
    replaces it, and the box is never remembered."""
    targets = indexed.match_tags("test")
    reviewed = {
        sid: fo.Classification(label="reviewed")
        for sid in targets.values("id")
    }
    indexed.set_values("gt_reviewed", reviewed, key_field="id")
    base = {"brain_key": "prelabel_qdrant", "pred_field": "gt_reviewed"}
    props = form("knn_preannotate", targets, **base)
    assert "overwrite=True" in errors(props)["pred_field"]
    with pytest.raises(ValueError, match="pred_field='gt_reviewed'"):
        foo.get_operator(uri("knn_preannotate"))(
            targets, pred_field="gt_reviewed", k=5
        )
    assert set(indexed.distinct("gt_reviewed.label")) == {"reviewed"}

    assert not errors(form("knn_preannotate", targets, **base, overwrite=True))
    run("knn_preannotate", targets, **base, k=5, overwrite=True)
    assert "reviewed" not in indexed.distinct("gt_reviewed.label")
    assert form("knn_preannotate", targets)["overwrite"].default is False


def test_sync_index_form_shows_a_damaged_index_and_rebuilds_it(indexed):
    config = indexed.get_brain_info("prelabel_qdrant").config
    with open(os.path.join(config.path, "index.json"), "w") as f:
        f.write("garbled")
    props = form("sync_index", indexed, brain_key="prelabel_qdrant")
    assert "index_damaged" in props
    with pytest.raises(Exception, match="rebuild=True"):
        run("sync_index", indexed, brain_key="prelabel_qdrant")
    result = run(
        "sync_index", indexed, brain_key="prelabel_qdrant", rebuild=True
    )
    assert result.result["added"] == len(indexed)
    props = form("sync_index", indexed, brain_key="prelabel_qdrant")
    assert "index_damaged" not in props


# ---- boxes --------------------------------------------------------------

#: an index of the boxes of the tiled digits
BOX_SYNC = dict(
    patches_field="detections", embeddings_field="box_vec", brain_key="boxes"
)


@pytest.fixture
def tiled(digit_images, session_dir):
    """60 real digits tiled into larger images, one box each: half of
    the boxes labeled (``reference``), 10 % of those mislabeled."""
    from prelabel.datasets.tiles import make_tiled_dataset, write_tiles

    tiles = write_tiles(
        digit_images[:60], os.path.join(session_dir, "op-tiles"), canvas=64
    )
    dataset = make_tiled_dataset(
        tiles, f"prelabel-test-op-tiles-{os.getpid()}", wrong_share=0.1
    )
    yield dataset
    dataset.delete_brain_runs()
    dataset.delete()


def test_the_operators_work_on_boxes(tiled):
    """Box embeddings, an index of boxes, box pre-labels and box label
    mistakes, each through its operator; the forms follow the index."""
    props = form("compute_embeddings", tiled)
    assert "patches_field" in props
    out = run(
        "compute_embeddings",
        tiled,
        patches_field="detections",
        embeddings_field="box_vec",
        **PIXELS,
    ).result
    assert (out["embedded"], out["with_embeddings"]) == (60, 60)

    props = form("sync_index", tiled, **BOX_SYNC)
    assert "label_field" not in props
    assert not errors(props)
    out = run("sync_index", tiled, **BOX_SYNC).result
    assert out["index_size"] == 60

    targets = tiled.match_tags("reference", bool=False)
    props = form("knn_preannotate", targets, brain_key="boxes")
    assert "label_field" not in props and "eval_key" not in props
    assert "boxes_notice" in props and not errors(props)
    result = run(
        "knn_preannotate",
        targets,
        brain_key="boxes",
        pred_field="box_pre",
        k=5,
        target_precision=0.9,
    )
    assert result.result["num_targets"] == len(targets)
    (set_view,) = triggered(result, "set_view")
    stages = [s["_cls"].rsplit(".", 1)[-1] for s in set_view["view"]]
    assert "ToPatches" in stages
    preds = targets.values("box_pre.detections", unwind=True)
    assert len(preds) == len(targets)
    assert all(isinstance(p, fo.Detection) and p.source_id for p in preds)

    props = form("find_label_mistakes", tiled, brain_key="boxes")
    assert "label_field" not in props and not errors(props)
    result = run(
        "find_label_mistakes",
        tiled,
        brain_key="boxes",
        score_field="box_mistakes",
        k=5,
    )
    out = result.result
    assert out["num_scored"] == len(tiled.match_tags("reference"))
    assert out["neighbors_field"] is None
    (set_view,) = triggered(result, "set_view")
    stages = [s["_cls"].rsplit(".", 1)[-1] for s in set_view["view"]]
    assert stages[-2:] == ["ToPatches", "SortBy"]


def test_sync_index_computes_missing_box_embeddings(tiled):
    props = form(
        "sync_index",
        tiled,
        patches_field="detections",
        embeddings_field="box_vec",
        brain_key="boxes",
    )
    assert (
        "60 of 60 boxes have no 'box_vec'"
        in props["missing_embeddings"].view.label
    )
    out = run(
        "sync_index",
        tiled,
        **BOX_SYNC,
        compute_missing=True,
        model="pixels",
        image_size=12,
    ).result
    assert (out["embedded"], out["added"], out["index_size"]) == (60, 60, 60)
    config = tiled.get_brain_info("boxes").config
    assert (config.patches_field, config.label_field) == (
        "detections",
        "detections",
    )
