"""The tutorials' inference strategies side by side: exact gradients, sampling, conjugacy and EM.

    python recipes/inference.py --preset smoke                  # seconds, on generated data
    python recipes/inference.py --preset cpu                    # real data, about an hour on 2 cores
    python recipes/inference.py --preset cpu --table mixture    # one table (repeat --table for more)

One table per model, each a module of ``recipes/inference_tables`` (``TITLE`` and
``run(preset, out, data_dir, seed) -> TableResult``); the driver runs those of :data:`TABLES`
whose module exists (all of them, or those named by ``--table``) and writes, in ``--out``,
``results.md`` (each table's section, then every check as measured), ``metrics.jsonl`` (the
tables' rows, each naming its table), ``config.json`` (the preset, the seed, each table's
settings) and the tables' PNG plots.  Models are trained by the library's trainer in folders under
``--out/<table>``; a finished run is reused (``--overwrite``: the tables' folders are deleted
first).  ``smoke`` reads no data; ``cpu`` and ``full`` read ``$LATENTNLP_DATA`` (or ``--data``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))  # the tables: inference_tables.<name>

import torch  # noqa: E402

PRESETS = ("smoke", "cpu", "full")
TABLES = ("mixture", "bernoulli_factor", "hmm", "digits", "topics")


def available_tables() -> list[str]:
    """The names of :data:`TABLES` whose module exists."""
    return [name for name in TABLES if importlib.util.find_spec(f"inference_tables.{name}") is not None]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="smoke")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default recipes/results/inference-PRESET)"
    )
    parser.add_argument("--table", action="append", choices=TABLES, help="run only this table (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=None, help="corpus root (default $LATENTNLP_DATA)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--overwrite", action="store_true", help="delete the tables' training runs first")
    return parser.parse_args(argv)


def write_results(out: Path, preset: str, sections: list[tuple[str, str, object]]) -> None:
    lines = [
        f"# Inference strategies side by side (preset `{preset}`)",
        "",
        "Written by `recipes/inference.py`; every number below was measured by this run.",
    ]
    for name, title, result in sections:
        lines += ["", f"## {title}", "", result.markdown]
        lines += [f"\n![{name}]({figure})" for figure in result.figures]
    lines += ["", "## Checks", "", "| table | check | result | measured |", "|---|---|---|---|"]
    for name, _, result in sections:
        for check, passed, detail in result.checks:
            lines.append(f"| {name} | {check} | {'pass' if passed else 'FAIL'} | {detail} |")
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> dict:
    """Run the tables; returns ``{name: TableResult}``."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or HERE / "results" / f"inference-{args.preset}"
    out.mkdir(parents=True, exist_ok=True)
    data_dir = None
    if args.preset != "smoke":
        data_dir = args.data or (Path(os.environ["LATENTNLP_DATA"]) if os.environ.get("LATENTNLP_DATA") else None)
    names = [n for n in available_tables() if not args.table or n in args.table]
    missing = sorted(set(args.table or ()) - set(names))
    if missing:
        raise SystemExit(f"no module for table(s) {missing} in {HERE / 'inference_tables'}")
    results, sections, timings = {}, [], {}
    for name in names:
        module = importlib.import_module(f"inference_tables.{name}")
        if args.overwrite and (out / name).is_dir():
            shutil.rmtree(out / name)
        print(f"[{name}] {module.TITLE}", flush=True)
        tic = time.time()
        result = module.run(args.preset, out, data_dir, args.seed)
        timings[name] = time.time() - tic
        results[name] = result
        sections.append((name, module.TITLE, result))
    write_results(out, args.preset, sections)
    with open(out / "metrics.jsonl", "w", encoding="utf-8") as f:
        for _, _, result in sections:
            for row in result.metrics:
                f.write(json.dumps(row) + "\n")
    config = {
        "preset": args.preset,
        "seed": args.seed,
        "data": "$LATENTNLP_DATA" if data_dir is not None else None,
        "tables": {name: result.config for name, result in results.items()},
        "seconds": timings,
        "torch": torch.__version__,
    }
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    failed = [(n, c) for n, _, r in sections for c, ok, _ in r.checks if not ok]
    print(f"wrote {out / 'results.md'}; {len(failed)} failed check(s)" + (f": {failed}" if failed else ""))
    return results


if __name__ == "__main__":
    main()
