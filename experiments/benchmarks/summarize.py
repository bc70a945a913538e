"""Ratios across several benchmark runs: ``python experiments/benchmarks/summarize.py RUN.json [RUN.json ...]``.

One run's medians already compare the contenders side by side, but on a
shared machine the ratios themselves drift from run to run (the load of the
neighbours changes between the comparisons). This prints, for every ratio of
every comparison, its value in each run and the median over the runs, and for
every target how many runs met it, as Markdown (``--out FILE`` also writes it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def load(paths) -> list:
    runs = []
    for p in paths:
        payload = json.loads(Path(p).read_text())
        if "benchmarks" not in payload.get("results", {}):
            raise ValueError(f"{p} is not a benchmark results file (no results.benchmarks).")
        runs.append(payload)
    return runs


def summarize(runs: list) -> str:
    """Markdown: a table of every ratio (one column per run, then the median) and the targets."""
    n = len(runs)
    head = "| comparison | setting | ratio | " + " | ".join(f"run {i + 1}" for i in range(n)) + " | median |"
    lines = [head, "|" + "---|" * (n + 4)]
    first = runs[0]["results"]["benchmarks"]
    for name, rows in first.items():
        for j, r in enumerate(rows):
            for ratio in r["ratios"]:
                values = []
                for run in runs:
                    try:
                        values.append(run["results"]["benchmarks"][name][j]["ratios"][ratio])
                    except (KeyError, IndexError):
                        values.append(None)
                present = [v for v in values if v is not None]
                cells = " | ".join("-" if v is None else f"{v:.3g}" for v in values)
                med = f"{np.median(present):.3g}" if present else "-"
                lines.append(f"| {name} | `{r['setting']}` | {ratio} | {cells} | **{med}** |")
    lines += [
        "",
        "| target | setting | measured | " + " | ".join(f"run {i + 1}" for i in range(n)) + " | median | met in |",
        "|" + "---|" * (n + 5),
    ]
    for t0 in runs[0]["results"]["targets"]:
        values, mets = [], []
        for run in runs:
            match = [
                t
                for t in run["results"]["targets"]
                if (t["benchmark"], t["setting"], t["ratio"]) == (t0["benchmark"], t0["setting"], t0["ratio"])
            ]
            values.append(match[0]["value"] if match else None)
            mets.append(match[0]["met"] if match else None)
        present = [v for v in values if v is not None]
        cells = " | ".join("-" if v is None else f"{v:.3g}" for v in values)
        lines.append(
            f"| {t0['what']} ({t0['target']}) | `{t0['setting']}` | {t0['ratio']} | {cells} | **{np.median(present):.3g}** "
            f"| {sum(bool(m) for m in mets)}/{n} runs |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="results.json files of full runs")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = parser.parse_args(argv)
    for p in args.runs:
        if not p.is_file():
            raise SystemExit(f"no such results file: {p}")
    text = summarize(load(args.runs))
    print(text)
    if args.out is not None:
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)
    return text


if __name__ == "__main__":
    main()
