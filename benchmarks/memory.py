"""Memory: peak RSS of the whole pipeline.

1. ``python -m prelabel.demo`` at 10,000 MNIST images (dataset, embeddings,
   sync, pre-annotation, evaluation, report), on a fresh dataset so that
   nothing is cached but the PNG files; run under ``/usr/bin/time -v``.
2. Embeddings + sync + pre-annotation at 50,000 images: the 10,000 digits
   plus 40,000 synthetic ones (random affine transforms of the digits,
   seeded, written once as PNGs under ``~/.cache/prelabel/bench``).

Both run in a child process; besides the child's own peak RSS, its
process tree (the child and its DataLoader workers, not the shared MongoDB
service) is polled every 0.2 s and the largest sum is reported (PSS,
and the plain sum of RSS).

    python benchmarks/memory.py [--quick]     # quick: the demo at 1,000
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402
from common import fmt_mb, fmt_s  # noqa: E402

DEMO_DATASET = f"{common.PREFIX}demo"
BIG_DATASET = f"{common.PREFIX}memory-50k"
NUM_BIG = 50000
BIG_TRAIN = 0.25


def settings(quick: bool) -> dict:
    if quick:
        return {
            "demo_args": ["--max-samples", "1000", "--num-train", "250"],
            "demo_n": 1000,
            "big": False,
        }
    return {"demo_args": [], "demo_n": 10000, "big": True}


# ---- synthetic images ----------------------------------------------------


def affine_dir() -> str:
    from prelabel.constants import cache_dir

    return os.path.join(cache_dir(), "bench", "affine")


def ensure_affine_pngs(n: int) -> list[tuple[str, str]]:
    """``n`` random affine transforms of the MNIST digits as 28x28 PNGs,
    written once (seeded by their index; atomic writes)."""
    from PIL import Image

    from prelabel.datasets.mnist import load_mnist_arrays

    images, labels = load_mnist_arrays()
    folder = affine_dir()
    items = []
    for i in range(n):
        src = i % len(images)
        label = str(labels[src])
        path = os.path.join(folder, label, f"{i:06d}.png")
        items.append((path, label))
        if os.path.isfile(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        rng = np.random.default_rng([7, i])
        angle = np.deg2rad(rng.uniform(-15, 15))
        shear = np.deg2rad(rng.uniform(-10, 10))
        scale = rng.uniform(0.9, 1.1)
        tx, ty = rng.uniform(-2, 2, 2)
        # the inverse map (output -> input), about the image center
        a = np.cos(angle) / scale
        b = (np.sin(angle) + np.tan(shear)) / scale
        c = -np.sin(angle) / scale
        d = np.cos(angle) / scale
        cx = cy = 13.5
        coeffs = (
            a, b, cx - a * cx - b * cy - tx,
            c, d, cy - c * cx - d * cy - ty,
        )  # fmt: skip
        img = Image.fromarray(images[src]).transform(
            (28, 28), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR
        )
        tmp = f"{path}.tmp-{os.getpid()}"
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    return items


# ---- the 50k pipeline (child) --------------------------------------------


def child_big() -> dict:
    fo = common.fiftyone()
    import prelabel
    from prelabel.datasets.mnist import write_mnist_pngs
    from prelabel.embeddings import compute_embeddings

    out, stages = {}, {}
    t0 = time.perf_counter()
    items = write_mnist_pngs() + ensure_affine_pngs(NUM_BIG - 10000)
    rng = np.random.default_rng(9)
    train = rng.random(len(items)) < BIG_TRAIN
    common.delete_dataset(BIG_DATASET)
    dataset = fo.Dataset(BIG_DATASET)
    dataset.add_samples(
        [
            fo.Sample(
                filepath=path,
                tags=["train" if t else "test"],
                ground_truth=fo.Classification(label=label),
            )
            for (path, label), t in zip(items, train, strict=True)
        ],
        progress=False,
    )
    stages["dataset"] = time.perf_counter() - t0
    out["rss_dataset"] = common.self_peak_rss()

    t0 = time.perf_counter()
    compute_embeddings(
        dataset,
        model="efficientnet_lite0",
        embeddings_field="emb",
        image_size=112,
        progress=False,
    )
    stages["embeddings"] = time.perf_counter() - t0
    out["rss_embeddings"] = common.self_peak_rss()

    t0 = time.perf_counter()
    results = prelabel.sync_index(
        dataset,
        embeddings_field="emb",
        label_field="ground_truth",
        brain_key="bench",
        progress=False,
    )
    stages["sync"] = time.perf_counter() - t0
    out["rss_sync"] = common.self_peak_rss()

    t0 = time.perf_counter()
    res = prelabel.preannotate(
        dataset.match_tags("test"),
        index=results,
        reference="train",
        label_field="ground_truth",
        pred_field="prelabel",
        eval_key="prelabel_eval",
        progress=False,
    )
    stages["preannotate"] = time.perf_counter() - t0
    out["rss_preannotate"] = common.self_peak_rss()
    out["stages"] = stages
    out["n"] = len(dataset)
    out["num_train"] = int(train.sum())
    out["accuracy"] = res.accuracy
    return out


# ---- the parent ----------------------------------------------------------


def parse_time_v(text: str) -> int | None:
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return int(m.group(1)) * 1024 if m else None


def parse_demo(text: str) -> dict:
    stages = {}
    in_times = False
    for line in text.splitlines():
        if line.startswith("== Time per stage"):
            in_times = True
            continue
        m = re.match(r"^\s*(\w+):\s+([\d.]+) s$", line)
        if in_times and m:
            stages[m.group(1)] = float(m.group(2))
    acc = re.search(r"== Accuracy: ([\d.]+)", text)
    return {"stages": stages, "accuracy": float(acc.group(1)) if acc else None}


def run_demo(cfg) -> dict:
    common.delete_dataset(DEMO_DATASET)
    cmd = [common.PY, "-m", "prelabel.demo", "--dataset", DEMO_DATASET]
    cmd += cfg["demo_args"]
    if os.path.exists("/usr/bin/time"):
        cmd = ["/usr/bin/time", "-v"] + cmd
    try:
        m = common.run_measured(cmd)
    finally:
        leftovers = index_paths(DEMO_DATASET)
        common.delete_dataset(DEMO_DATASET)
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
    if m["returncode"] != 0:
        raise RuntimeError(f"the demo failed:\n{m['tail']}")
    m["time_v_rss"] = parse_time_v(m["output"])
    m.update(parse_demo(m["output"]))
    return m


def index_paths(name: str) -> list[str]:
    """The embedded index folders of a dataset's runs (to remove them if
    the brain run's cleanup did not)."""
    fo = common.fiftyone()
    if not fo.dataset_exists(name):
        return []
    from prelabel.constants import home_dir

    dataset = fo.load_dataset(name)
    # the default folder of the dataset's indexes (lock files stay there)
    paths = [os.path.join(home_dir(), "indexes", str(dataset._doc.id))]
    for key in dataset.list_brain_runs():
        try:
            path = dataset.get_brain_info(key).config.path
        except Exception:
            path = None
        if path:
            paths.append(path)
    return paths


def run_big() -> dict:
    t0 = time.perf_counter()
    ensure_affine_pngs(NUM_BIG - 10000)
    prep = time.perf_counter() - t0
    cmd = [common.PY, os.path.abspath(__file__), "--child-big"]
    try:
        m = common.run_measured(cmd)
    finally:
        leftovers = index_paths(BIG_DATASET)
        common.delete_dataset(BIG_DATASET)
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
    if m["returncode"] != 0 or m["result"] is None:
        raise RuntimeError(f"the 50k pipeline failed:\n{m['tail']}")
    m["prep_s"] = prep
    return m


def run(quick: bool) -> dict:
    cfg = settings(quick)
    rows, notes = [], []
    print(f"  the demo at {cfg['demo_n']:,} images")
    demo = run_demo(cfg)
    st = demo["stages"]
    rows.append(
        [
            f"`python -m prelabel.demo` at {cfg['demo_n']:,} images "
            "(fresh dataset)",
            fmt_mb(demo["time_v_rss"] or demo["peak_rss"]),
            fmt_mb(demo["peak_tree_pss"]),
            fmt_mb(demo["peak_tree_rss"]),
            fmt_s(demo["seconds"]),
            ", ".join(f"{k} {fmt_s(v)} s" for k, v in st.items()),
        ]
    )
    if cfg["big"]:
        print(f"  embeddings + sync + pre-annotation at {NUM_BIG:,} images")
        big = run_big()
        r = big["result"]
        rows.append(
            [
                f"embeddings + sync + pre-annotation at {r['n']:,} images "
                f"({r['num_train']:,} labeled references)",
                fmt_mb(r["rss_preannotate"]),
                fmt_mb(big["peak_tree_pss"]),
                fmt_mb(big["peak_tree_rss"]),
                fmt_s(big["seconds"]),
                ", ".join(f"{k} {fmt_s(v)} s" for k, v in r["stages"].items()),
            ]
        )
        notes.append(
            "At 50,000 images, the child's peak RSS after each stage: "
            f"dataset {fmt_mb(r['rss_dataset'])} MB, embeddings "
            f"{fmt_mb(r['rss_embeddings'])} MB, sync {fmt_mb(r['rss_sync'])}"
            f" MB, pre-annotation {fmt_mb(r['rss_preannotate'])} MB. "
            "Pre-annotation accuracy on "
            f"the unlabeled {r['n'] - r['num_train']:,}: "
            f"{r['accuracy']:.3f}. The 40,000 synthetic PNGs were made "
            f"once (this run: {fmt_s(big['prep_s'])} s to check or write "
            "them)."
        )
    desc = (
        "Peak resident memory of the pipeline run as a child process. "
        "*Peak RSS* is the main process's (`/usr/bin/time -v` for the demo, "
        "`VmHWM` for the 50k run); *process tree* adds its DataLoader "
        "workers, polled every 0.2 s (the MongoDB service FiftyOne shares "
        "between processes is not counted), as PSS (pages the forked "
        "workers share with the main process counted once) and as the plain "
        "sum of RSS (shared pages counted in every process, an upper "
        "bound). The 50k images are the 10,000 "
        "MNIST digits and 40,000 random affine transforms of them (rotation "
        "up to 15 degrees, shear up to 10, scale 0.9-1.1, shift up to 2 px, "
        "seeded), EfficientNet-Lite0 at 112 px, a quarter of them labeled "
        "references. One run each."
    )
    if quick:
        desc += " QUICK: the demo at 1,000 images; the 50k run is skipped."
    return common.section(
        "Memory: the whole pipeline (issue 5, item 7)",
        desc,
        [
            common.table(
                "",
                [
                    "run",
                    "peak RSS MB",
                    "process tree peak PSS MB",
                    "process tree peak RSS sum MB",
                    "wall s",
                    "stages",
                ],
                rows,
            )
        ],
        notes,
        reproduce="python benchmarks/memory.py"
        + (" --quick" if quick else ""),
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child-big":
        common.emit(child_big())
        sys.exit(0)
    sys.exit(common.main_for(run))
