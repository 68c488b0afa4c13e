"""What every benchmark script shares: the result format, timing, the data,
exact kNN, recall, FiftyOne datasets, peak memory of a subprocess.

A benchmark module has ``run(quick: bool) -> Section`` and, run alone,
prints its tables (``python benchmarks/<name>.py [--quick]``).
:mod:`run` calls every module in one process and writes ``BENCHMARKS.md``.

A ``Section`` is a plain dict, so that other scripts (``quality.py``) can
return one without importing this module::

    {
        "title": "kNN pre-annotation throughput",
        "description": "what is measured, on what data (markdown)",
        "tables": [
            {
                "title": "10,000 reference points",
                "columns": ["method", "targets/s", ...],
                "rows": [["ours", "1,234", ...], ...],   # strings
                "notes": ["one markdown paragraph each", ...],
            },
        ],
        "notes": ["markdown paragraphs after the tables", ...],
        "reproduce": "python benchmarks/knn_throughput.py",
        "load": {"start": [1.0, 1.1, 1.2], "end": [...]},   # set by run.py
        "seconds": 123.4,                                   # set by run.py
    }
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
os.environ.setdefault("PYTHONUNBUFFERED", "1")

import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(REPO, "benchmarks")
if REPO not in sys.path:
    sys.path.insert(0, REPO)

PY = sys.executable
#: every dataset a benchmark creates starts with this
PREFIX = "bench-"
#: neighbors that vote, as in the article and the package default
K = 15
#: where the real features come from (what `make demo` computes and caches)
MNIST_DATASET = "mnist-prelabel"
MNIST_FIELD = "emb_efficientnet_lite0_112"
#: a child process prints its result on one line starting with this
JSON_MARK = "BENCH_JSON "


# ---- results -------------------------------------------------------------


def section(title, description, tables, notes=(), reproduce=""):
    return {
        "title": title,
        "description": description,
        "tables": list(tables),
        "notes": list(notes),
        "reproduce": reproduce,
    }


def table(title, columns, rows, notes=()):
    return {
        "title": title,
        "columns": list(columns),
        "rows": [[str(c) for c in row] for row in rows],
        "notes": list(notes),
    }


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(c) for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def section_markdown(sec: dict, level: int = 2) -> str:
    h = "#" * level
    out = [f"{h} {sec['title']}", ""]
    if sec.get("description"):
        out += [sec["description"].strip(), ""]
    for tab in sec.get("tables", []):
        if tab.get("title"):
            out += [f"{h}# {tab['title']}", ""]
        out += [markdown_table(tab["columns"], tab["rows"]), ""]
        for note in tab.get("notes", []):
            out += [note.strip(), ""]
    for note in sec.get("notes", []):
        out += [note.strip(), ""]
    extra = []
    if sec.get("seconds") is not None:
        extra.append(f"took {sec['seconds']:.0f} s")
    if sec.get("load"):
        start, end = sec["load"]["start"], sec["load"]["end"]
        extra.append(
            "load average (1/5/15 min) at start "
            + "/".join(f"{x:.2f}" for x in start)
            + ", at end "
            + "/".join(f"{x:.2f}" for x in end)
        )
    if sec.get("reproduce"):
        extra.append(f"reproduce: `{sec['reproduce']}`")
    if extra:
        out += ["<sub>" + "; ".join(extra) + "</sub>", ""]
    return "\n".join(out)


def main_for(run: Callable[[bool], dict], argv=None) -> int:
    """The ``__main__`` of a benchmark module: run it, print markdown."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="also write the section here")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    sec = run(args.quick)
    sec["seconds"] = time.perf_counter() - t0
    sec["load"] = {"start": load_start, "end": os.getloadavg()}
    print()
    print(section_markdown(sec))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(sec, f, indent=1)
    return 0


# ---- formatting ----------------------------------------------------------


def fmt_int(x) -> str:
    return f"{x:,.0f}"


def fmt_rate(x) -> str:
    if x is None:
        return "n/a"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_s(x) -> str:
    if x is None:
        return "n/a"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 0.1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fmt_mb(nbytes) -> str:
    return f"{nbytes / 2**20:,.0f}"


def fmt_ratio(ours, other) -> str:
    """``2.5x`` (ours is faster) or ``0.40x`` (slower), ours / other."""
    if not ours or not other:
        return "n/a"
    r = ours / other
    return f"{r:.1f}x" if r >= 1 else f"{r:.2f}x"


# ---- timing --------------------------------------------------------------


def timed(fn: Callable, *args, **kwargs):
    """``(seconds, result)`` of one call."""
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t0, result


def median_time(fn: Callable, repeats: int, setup: Callable | None = None):
    """Runs ``setup()`` (untimed) then ``fn()`` (timed) ``repeats`` times.

    Returns:
        ``(median seconds, list of seconds, last result)``
    """
    times, result = [], None
    for _ in range(max(1, repeats)):
        if setup is not None:
            setup()
        dt, result = timed(fn)
        times.append(dt)
    return statistics.median(times), times, result


def load() -> tuple[float, float, float]:
    return os.getloadavg()


# ---- the machine ---------------------------------------------------------


def machine_info() -> dict:
    import platform

    import psutil

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": psutil.virtual_memory().total / 2**30,
        "os": platform.platform(),
        "load": os.getloadavg(),
    }


def versions() -> dict:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in (
        "fiftyone",
        "fiftyone-brain",
        "qdrant-edge-py",
        "qdrant-client",
        "torch",
        "torchvision",
        "numpy",
    ):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# ---- FiftyOne ------------------------------------------------------------


def fiftyone():
    import fiftyone as fo

    fo.config.show_progress_bars = False
    return fo


def delete_dataset(name: str) -> None:
    """Deletes a dataset and the indexes of its brain runs, if it exists."""
    fo = fiftyone()
    if not fo.dataset_exists(name):
        return
    dataset = fo.load_dataset(name)
    for key in dataset.list_brain_runs():
        try:
            dataset.delete_brain_run(key)
        except Exception as e:  # a half-made run of another backend
            print(f"  (could not clean up brain run {key!r}: {e})")
    dataset.delete()


def vector_dataset(
    name: str,
    vectors: np.ndarray,
    labels: Sequence[str],
    tags: Sequence[str],
    field: str = "emb",
):
    """A fresh dataset of ``len(vectors)`` samples (no image files): a
    ``ground_truth`` Classification, one tag and an embedding each."""
    fo = fiftyone()
    delete_dataset(name)
    dataset = fo.Dataset(name)
    n = len(vectors)
    samples = [
        fo.Sample(
            filepath=f"/nonexistent/{name}/{i:07d}.png",
            tags=[tags[i]],
            ground_truth=fo.Classification(label=str(labels[i])),
        )
        for i in range(n)
    ]
    ids = dataset.add_samples(samples, progress=False)
    for start in range(0, n, 10000):
        chunk = ids[start : start + 10000]
        dataset.set_values(
            field,
            dict(zip(chunk, vectors[start : start + 10000], strict=True)),
            key_field="id",
        )
    return dataset


def real_features() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The 10,000 real MNIST EfficientNet-Lite0 (112 px) features.

    They are what ``make demo`` computes and caches in the dataset
    ``mnist-prelabel``; computed here the same way if missing.

    Returns:
        ``(vectors (10000, 1280) float32, labels, filepaths)``
    """
    fo = fiftyone()
    dataset = None
    if fo.dataset_exists(MNIST_DATASET):
        dataset = fo.load_dataset(MNIST_DATASET)
    if (
        dataset is None
        or not dataset.has_sample_field(MNIST_FIELD)
        or len(dataset.exists(MNIST_FIELD, False))
    ):
        from prelabel.datasets import load_mnist_dataset
        from prelabel.embeddings import compute_embeddings

        print(f"  computing the demo's features into {MNIST_DATASET} ...")
        dataset = load_mnist_dataset(name=MNIST_DATASET, progress=False)
        compute_embeddings(
            dataset,
            model="efficientnet_lite0",
            embeddings_field=MNIST_FIELD,
            image_size=112,
            progress=False,
        )
    vecs, labels, paths = dataset.values(
        [MNIST_FIELD, "ground_truth.label", "filepath"]
    )
    X = np.stack([np.asarray(v, dtype=np.float32) for v in vecs])
    return X, np.asarray(labels), list(paths)


def noisy_copies(X: np.ndarray, seed: int, rel: float) -> np.ndarray:
    """Copies of ``X`` plus isotropic Gaussian noise whose norm is about
    ``rel`` times each vector's norm (seeded)."""
    rng = np.random.default_rng(seed)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    sigma = rel * norms / np.sqrt(X.shape[1])
    noise = rng.standard_normal(X.shape, dtype=np.float32)
    return (X + sigma * noise).astype(np.float32)


def median_nn_distance(X: np.ndarray, sample: int = 2000) -> float:
    """Median distance, between unit vectors, of a point to its nearest
    other point (on a sample of points)."""
    Xn = normalize(X)
    S = Xn[:sample] @ Xn.T
    S[np.arange(min(sample, len(X))), np.arange(min(sample, len(X)))] = -1
    return float(np.median(np.sqrt(np.maximum(0.0, 2 - 2 * S.max(1)))))


# ---- exact kNN and recall ------------------------------------------------


def normalize(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


def exact_knn(
    Q: np.ndarray,
    R: np.ndarray,
    k: int,
    block: int = 1000,
    normalized: bool = False,
):
    """Exact cosine kNN by blockwise matmul + argpartition.

    Returns:
        ``(indices (nq, k) into R, similarities (nq, k))``, closest first
    """
    if not normalized:
        Q, R = normalize(Q), normalize(R)
    nq = len(Q)
    idx = np.empty((nq, k), dtype=np.int64)
    sims = np.empty((nq, k), dtype=np.float32)
    for start in range(0, nq, block):
        S = Q[start : start + block] @ R.T
        part = np.argpartition(-S, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(S, part, axis=1)
        order = np.argsort(-ps, axis=1, kind="stable")
        idx[start : start + block] = np.take_along_axis(part, order, axis=1)
        sims[start : start + block] = np.take_along_axis(ps, order, axis=1)
    return idx, sims


def recall_at_k(approx: Sequence[Sequence], exact: Sequence[Sequence], k):
    """Mean share of the exact ``k`` nearest found among the approximate
    ``k`` (ids of any hashable type)."""
    if not len(exact):
        return float("nan")
    hits = [
        len(set(list(a)[:k]) & set(list(e)[:k])) / k
        for a, e in zip(approx, exact, strict=True)
    ]
    return float(np.mean(hits))


# ---- subprocesses and memory ---------------------------------------------


def _excluded(proc) -> bool:
    """The shared MongoDB service is not part of what we measure."""
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:
        return True
    return "mongod" in cmd or "service/main.py" in cmd


def run_measured(cmd: Sequence[str], poll: float = 0.2, env=None):
    """Runs ``cmd``, polling the RSS of it and its descendants (but not
    the MongoDB service), and parses the child's JSON result line.

    Returns:
        dict with ``returncode``, ``seconds``, ``peak_rss`` (the main
        process), ``peak_tree_rss`` (main + descendants, summed at each
        poll; pages shared by forked workers counted once per process),
        ``peak_tree_pss`` (the same in proportional set size: shared
        pages split between the processes sharing them), ``result``
        (the child's JSON line or None), ``output`` (all it printed) and
        ``tail`` (the last lines of it)
    """
    import psutil

    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    out = tempfile.TemporaryFile(mode="w+")
    t0 = time.perf_counter()
    proc = psutil.Popen(
        list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO
    )
    peak = {"main": 0, "tree": 0, "tree_pss": 0}
    stop = threading.Event()

    def pss(p) -> int:
        try:
            return p.memory_full_info().pss
        except (psutil.Error, AttributeError):
            return 0

    def watch():
        while not stop.is_set():
            try:
                main = proc.memory_info().rss
                tree, tree_pss = main, pss(proc)
                for child in proc.children(recursive=True):
                    if _excluded(child):
                        continue
                    try:
                        tree += child.memory_info().rss
                        tree_pss += pss(child)
                    except psutil.Error:
                        pass
                peak["main"] = max(peak["main"], main)
                peak["tree"] = max(peak["tree"], tree)
                peak["tree_pss"] = max(peak["tree_pss"], tree_pss)
            except psutil.Error:
                pass
            stop.wait(poll)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    returncode = proc.wait()
    stop.set()
    watcher.join()
    seconds = time.perf_counter() - t0
    out.seek(0)
    text = out.read()
    result = None
    for line in text.splitlines():
        if line.startswith(JSON_MARK):
            result = json.loads(line[len(JSON_MARK) :])
    return {
        "returncode": returncode,
        "seconds": seconds,
        "peak_rss": peak["main"],
        "peak_tree_rss": peak["tree"],
        "peak_tree_pss": peak["tree_pss"],
        "result": result,
        "tail": "\n".join(text.splitlines()[-25:]),
        "output": text,
    }


class AnonPeak:
    """Polls this process's anonymous memory (``RssAnon``: the heap,
    without the files it maps) and keeps the peak."""

    def __init__(self, poll: float = 0.1):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._poll = poll

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self._stop.wait(self._poll)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def emit(result: dict) -> None:
    """What a child process reports to :func:`run_measured`."""
    print(JSON_MARK + json.dumps(result), flush=True)


def self_peak_rss() -> int:
    """This process's peak RSS in bytes since it started its program.

    Read from ``VmHWM`` in ``/proc/self/status``, not ``ru_maxrss``: Linux
    carries ``ru_maxrss`` over ``fork`` + ``exec``, so a child started by a
    large parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
