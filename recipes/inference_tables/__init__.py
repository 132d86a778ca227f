"""Tables of ``recipes/inference.py``: one module per model, each putting the inference strategies side by side.

Every table module exposes ``TITLE`` (the section heading of ``results.md``) and
``run(preset, out, data_dir, seed) -> TableResult``, where ``preset`` is ``"smoke"`` (seconds, on
generated data, no download), ``"cpu"`` (real data, the whole recipe within about an hour on two
cores) or ``"full"``, ``out`` is the recipe's output folder and ``data_dir`` is ``$LATENTNLP_DATA``
(``None`` under ``smoke``).  The driver runs the tables, writes one ``results.md``,
``metrics.jsonl`` and ``config.json``, and reports every check as measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TableResult:
    """What one table hands back to the driver.

    Attributes:
        markdown: the table's section of ``results.md``: the measured table beside the published
            one where there is one, and notes on what was measured.
        checks: ``(check, passed, detail)`` for each check of the table, passed as measured.
        figures: PNG files written by the table, relative to the recipe's output folder.
        metrics: rows for ``metrics.jsonl``, each with a ``"table"`` key naming the table.
        config: the table's settings, recorded in ``config.json``.
    """

    markdown: str
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
