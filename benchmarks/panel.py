"""The mistakes panel's response times, as a table: runs
``benchmarks/mistakes_panel.py`` (a synthetic pre-annotated dataset,
the panel driven through FiftyOne's operator machinery like the App does)
in a child process and reads its lines.

    python benchmarks/panel.py [--quick]
"""

from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import fmt_int  # noqa: E402

SCRIPT = os.path.join(common.BENCH_DIR, "mistakes_panel.py")
LINE = re.compile(r"^(.*?)\s+median\s+([\d.]+) ms\s+max\s+([\d.]+) ms$")


def settings(quick: bool) -> dict:
    if quick:
        return {"samples": 2000, "repeat": 2}
    return {"samples": 10000, "repeat": 5}


def run(quick: bool) -> dict:
    cfg = settings(quick)
    cmd = [
        common.PY,
        SCRIPT,
        "--num-samples",
        str(cfg["samples"]),
        "--repeat",
        str(cfg["repeat"]),
    ]
    m = common.run_measured(cmd)
    if m["returncode"] != 0:
        raise RuntimeError(f"mistakes_panel.py failed:\n{m['tail']}")
    rows, built = [], None
    for line in m["output"].splitlines():
        match = LINE.match(line.strip())
        if match:
            rows.append([match.group(1), match.group(2), match.group(3)])
        b = re.search(r"built in ([\d.]+) s", line)
        if b:
            built = b.group(1)
    if not rows:
        raise RuntimeError(f"no timings in the output:\n{m['tail']}")
    desc = (
        f"A synthetic dataset of {fmt_int(cfg['samples'])} samples with "
        "what `preannotate` and `find_label_mistakes` write (10 % of the "
        "votes wrong), built "
        + (f"in {built} s " if built else "")
        + "and deleted afterwards; each App event is sent through "
        "FiftyOne's operator machinery as the App sends it and timed end "
        "to end (the panel's queries, its render, the serialization of "
        f"what goes back), median and slowest of {cfg['repeat']}. There is "
        "no alternative to compare with: FiftyOne has no such panel."
    )
    return common.section(
        "Mistakes panel response times",
        desc,
        [common.table("", ["App event", "median ms", "slowest ms"], rows, [])],
        reproduce=" ".join(["python benchmarks/mistakes_panel.py"] + cmd[2:]),
    )


if __name__ == "__main__":
    sys.exit(common.main_for(run))
