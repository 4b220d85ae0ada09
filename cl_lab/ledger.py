"""The claims ledger: every claim of every chapter, measured at seeds 0–9, kept as data in ``ledger/``.

One CSV per chapter (``ledger/NN_<stem>.csv``), one row per claim and seed, written by
``bash scripts/preflight.sh --seeds 0-9 --ledger``. From it:

    python -m cl_lab.ledger page           # docs/ledger.md: per claim, min / median / max, failing seeds, margin
    python -m cl_lab.ledger missing        # claims in the notebooks that the ledger has never measured
    python -m cl_lab.ledger weak [05]     # claims failing at a seed or with under one sd of margin
    python -m cl_lab.ledger rebound 05 --claim OLD --to NEW --low 3   # a bound restated on the values measured
    python -m cl_lab.ledger drop 05 --claim OLD   # a claim the chapter no longer makes

In a chapter, ``spread("08", claim)`` gives the per-seed values and ``strip_plot("08", [claim, ...])`` draws
them, read from the ledger without re-running. ``cl_lab.check`` asks ``calibrated_seeds`` whether a failed
claim should raise (a seed the ledger holds) or print the ledger's range and let the notebook go on.

Columns, in the claim's units (``cl_lab.check.ClaimRecord``): ``value`` is what was measured (for ``greater``
the gap a − b), ``low`` / ``high`` its bounds (empty: none), ``margin`` the room to the nearest bound (negative:
failed). ``notebook_hash`` fingerprints the chapter's code cells, so a changed chapter is measured again.
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import json
import math
import re
import statistics
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEDGER_DIR = ROOT / "ledger"
NOTEBOOKS = ROOT / "notebooks"
PAGE = ROOT / "docs" / "ledger.md"
DEFAULT_SEEDS = tuple(range(10))  # the seeds a chapter counts as calibrated at until its ledger exists
FIELDS = ("seed", "notebook_hash", "order", "claim", "occurrence", "kind", "always", "value", "low", "high",
          "margin", "status", "measured", "bound", "note")
VIEW_TAG = "ledger-view"  # a code cell that only reads the ledger: outside the fingerprint
CHECKS = {"at_least": 2, "at_most": 2, "between": 3, "greater": 2, "close": 2, "true": 1}  # claim's position


# --- reading and writing the CSV files ------------------------------------------------------------------------

def ledger_path(chapter: str, ledger_dir: Path | None = None) -> Path | None:
    """The ledger file of ``chapter`` ("07" or "07_classil_head_bias"), or None when there is none yet."""
    matches = sorted((ledger_dir or LEDGER_DIR).glob(f"{chapter[:2]}_*.csv"))
    return matches[0] if matches else None


def _number(text: str) -> float:
    return float(text) if text else math.nan


def _cell(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else str(value)


def read(chapter: str, ledger_dir: Path | None = None) -> list[dict]:
    """Every row of ``chapter``'s ledger with numbers as numbers ([] when it has no ledger yet)."""
    path = ledger_path(chapter, ledger_dir)
    if path is None:
        return []
    with open(path, newline="", encoding="utf-8") as source:
        rows = list(csv.DictReader(source))
    for row in rows:
        row["seed"], row["order"], row["occurrence"] = int(row["seed"]), int(row["order"]), int(row["occurrence"])
        row["always"] = row["always"] == "True"
        for key in ("value", "low", "high", "margin"):
            row[key] = _number(row[key])
    return rows


def write_rows(path: Path, rows: Iterable[dict]) -> None:
    """Write ``rows`` to ``path`` sorted by seed, then by the order the chapter checked them (atomically)."""
    rows = sorted(rows, key=lambda r: (int(r["seed"]), int(r["order"])))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".csv.partial")
    with open(partial, "w", newline="", encoding="utf-8") as sink:
        writer = csv.DictWriter(sink, FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _cell(r[k]) for k in FIELDS} for r in rows)
    partial.replace(path)


def rows_from_records(records_json: Path, seed: int, notebook_hash: str) -> list[dict]:
    """The ledger rows of one run, from the JSON that ``check`` wrote under ``CL_LAB_LEDGER_OUT``."""
    records = json.loads(records_json.read_text(encoding="utf-8"))
    return [{**{k: r[k] for k in FIELDS if k in r}, "seed": seed, "notebook_hash": notebook_hash, "order": i}
            for i, r in enumerate(records)]


def store(path: Path, seed: int, rows: list[dict]) -> None:
    """Put one run's rows into the ledger file ``path``, replacing what it held for ``seed``."""
    kept = []
    if path.exists():
        with open(path, newline="", encoding="utf-8") as source:
            kept = [r for r in csv.DictReader(source) if int(r["seed"]) != seed]
    write_rows(path, kept + rows)


def has_run(path: Path, seed: int, notebook_hash: str) -> bool:
    """Whether ``path`` already holds ``seed`` measured on the notebook with this hash (a resumed run skips it)."""
    if not path.exists():
        return False
    with open(path, newline="", encoding="utf-8") as source:
        return any(int(r["seed"]) == seed and r["notebook_hash"] == notebook_hash for r in csv.DictReader(source))


BOUND_ARGUMENTS = {"at_least": 1, "at_most": 1, "between": 1, "greater": 1}  # args from this index are bounds


class _BlankCheckLiterals(ast.NodeTransformer):
    """Blanks the literal arguments of ``check.*`` calls (bounds), the claim sentence (f-strings too), the numbers
    inside a bound argument (``naive.old + 0.05``) and drops literal keywords (``margin=``, ``always=``): none of
    them changes what is measured."""

    def visit_Call(self, node: ast.Call) -> ast.Call:
        self.generic_visit(node)
        if _is_check_call(node):
            first_bound = BOUND_ARGUMENTS.get(node.func.attr, len(node.args))
            sentence = CHECKS[node.func.attr]  # the claim's position: a sentence, even an f-string, measures nothing
            node.args = [ast.Constant(...) if i == sentence else _blank_if_literal(a) if i < first_bound
                         else _blank_numbers(a) for i, a in enumerate(node.args)]
            node.keywords = [k for k in node.keywords
                             if k.arg != "claim" and _blank_if_literal(k.value) is k.value]  # literal ones go
        return node


def _blank_numbers(node: ast.expr) -> ast.expr:
    """A bound argument with the numbers it adds or multiplies blanked (``n.old + 0.05``); names, calls and
    subscripts are kept: they are measured."""
    if _blank_if_literal(node) is not node:  # 0.5, -0.05, 1 / 100
        return ast.Constant(...)
    for child in ast.walk(node):
        if isinstance(child, ast.BinOp):
            for side in ("left", "right"):
                setattr(child, side, _blank_if_literal(getattr(child, side)))
    return node


def _blank_if_literal(node: ast.expr) -> ast.expr:
    reads_something = any(isinstance(n, (ast.Name, ast.Attribute, ast.Call, ast.Subscript)) for n in ast.walk(node))
    return node if reads_something else ast.Constant(...)


def _without_magics(source: str) -> str:
    """A code cell's Python: its IPython magic and shell lines (``%…``, ``!…``) dropped."""
    return "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))


def _measurement_code(source: str) -> str:
    """A code cell as the claims measure it: magics dropped, the check calls' literal bounds and sentences blanked."""
    try:
        tree = ast.parse(_without_magics(source))
    except SyntaxError:
        return source
    return ast.unparse(_BlankCheckLiterals().visit(tree))


def notebook_hash(path: Path) -> str:
    """A fingerprint of what a notebook's code measures: its code cells, with the literal bounds and sentences of
    its ``check.*`` calls blanked. Prose edits, a bound or sentence restated after the ledger (``rebound``), and
    cells tagged ``ledger-view`` (they only draw what the ledger holds, e.g. ``strip_plot``) leave it unchanged;
    any other code change means the chapter is measured again."""
    import nbformat

    return _fingerprint(nbformat.read(path, as_version=4))


def _fingerprint(nb) -> str:
    measuring = [c for c in nb.cells if c.cell_type == "code" and VIEW_TAG not in c.metadata.get("tags", [])]
    code = "\n\x00".join(_measurement_code(c.source) for c in measuring)
    return hashlib.sha256(code.encode("utf-8")).hexdigest()[:12]


# --- a claim removed or turned into a printed line: nothing measured changed --------------------------------------

def _is_report(stmt: ast.stmt) -> bool:
    """A statement that only reports: ``check.*(…)``, ``_ = check.*(…)`` or ``print(…)``."""
    value = stmt.value if isinstance(stmt, (ast.Expr, ast.Assign)) else None
    if not isinstance(value, ast.Call):
        return False
    return _is_check_call(value) or (isinstance(value.func, ast.Name) and value.func.id == "print")


class _DropReports(ast.NodeTransformer):
    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if isinstance(body, list) and body and all(isinstance(s, ast.stmt) for s in body):
                setattr(node, field, [s for s in body if not _is_report(s)] or [ast.Pass()])
        return node


def computation_code(nb) -> list[str]:
    """A notebook's measuring code cells with every reporting statement (checks, prints) and comment dropped."""
    return [ast.unparse(_DropReports().visit(ast.parse(_without_magics(c.source)))) for c in nb.cells
            if c.cell_type == "code" and VIEW_TAG not in c.metadata.get("tags", [])]


def restamp(chapter: str, measured_source: str, ledger_dir: Path | None = None,
            notebooks: Path | None = None) -> int:
    """Give a chapter's ledger rows the current fingerprint when the notebook they measured (``measured_source``,
    e.g. ``git show HEAD:notebooks/NN_x.ipynb``) computes exactly what the current one does: only check calls and
    prints were removed, added or changed. Refuses otherwise. Returns the number of rows re-stamped."""
    import nbformat

    path = _existing_ledger(chapter, ledger_dir)
    current_path = (notebooks or NOTEBOOKS) / f"{path.stem}.ipynb"
    measured = nbformat.reads(measured_source, as_version=4)
    rows = read(path.stem, ledger_dir)
    measured_hash = _fingerprint(measured)
    if {r["notebook_hash"] for r in rows} != {measured_hash}:
        raise ValueError(f"the ledger of {path.stem} did not measure that notebook (fingerprint {measured_hash})")
    if computation_code(measured) != computation_code(nbformat.read(current_path, as_version=4)):
        raise ValueError(f"{path.stem} now computes something else: re-run the ledger instead of re-stamping")
    current = notebook_hash(current_path)
    write_rows(path, [{**r, "notebook_hash": current} for r in rows])
    return len(rows)


# --- restating a claim's bound against the values already measured ----------------------------------------------

def _bound_label(kind: str, low: float, high: float, row: dict) -> str:
    if kind == "at_least":
        return f"≥ {low:.4g}"
    if kind == "at_most":
        return f"≤ {high:.4g}"
    if kind == "between":
        return f"in [{low:.4g}, {high:.4g}]"
    if kind == "greater":
        b = _number(row["measured"]) - row["value"]
        return f"> {b:.4g}" + (f" + {low:.4g}" if low else "")
    raise ValueError(f"kind {kind!r} cannot be rebounded; allowed: at_least, at_most, between, greater")


def rebound_rows(rows: list[dict], claim: str, new_claim: str, low: float | None = None,
                 high: float | None = None, shift: float = 0.0) -> list[dict]:
    """The rows with ``claim`` restated as ``new_claim`` against new bounds, judged on the values already measured.
    ``shift`` moves a bound that is an expression (``naive.old + 0.05`` → ``+ 0.1``: shift 0.05) at every seed.

    Valid only when the notebook measures the same thing as before (its ``notebook_hash`` is unchanged): a bound
    does not change what a run measures, so re-running the seeds would give the same values."""
    matched = [r for r in rows if r["claim"] == claim]
    if not matched:
        raise KeyError(f"claim {claim!r} is not in the ledger; the rows hold: {sorted({r['claim'] for r in rows})}")
    out = []
    for row in rows:
        if row["claim"] != claim:
            out.append(row)
            continue
        new_low = (row["low"] if low is None else low) + shift
        new_high = (row["high"] if high is None else high) + shift
        value = row["value"]
        margins = [value - new_low if not math.isnan(new_low) else math.inf,
                   new_high - value if not math.isnan(new_high) else math.inf]
        margin = min(margins)
        passed = margin > 0 if row["kind"] == "greater" else margin >= 0
        out.append({**row, "claim": new_claim, "low": new_low, "high": new_high, "margin": margin,
                    "status": "passed" if passed else "FAILED",
                    "bound": _bound_label(row["kind"], new_low, new_high, row), "note": "bound restated"})
    return out


def _existing_ledger(chapter: str, ledger_dir: Path | None) -> Path:
    path = ledger_path(chapter, ledger_dir)
    if path is None:
        raise FileNotFoundError(f"chapter {chapter!r} has no ledger file yet")
    return path


def drop(chapter: str, claim: str, ledger_dir: Path | None = None) -> int:
    """Remove a claim the chapter no longer makes from its ledger file; returns the number of rows removed."""
    path = _existing_ledger(chapter, ledger_dir)
    rows = read(path.stem, ledger_dir)
    kept = [r for r in rows if r["claim"] != claim]
    if len(kept) == len(rows):
        raise KeyError(f"claim {claim!r} is not in the ledger of {path.stem}")
    write_rows(path, kept)
    return len(rows) - len(kept)


def rebound(chapter: str, claim: str, new_claim: str, low: float | None = None, high: float | None = None,
            ledger_dir: Path | None = None, notebooks: Path | None = None, shift: float = 0.0) -> int:
    """Apply ``rebound_rows`` to a chapter's ledger file, refusing when the notebook now measures something else.
    Returns the number of rows restated."""
    path = _existing_ledger(chapter, ledger_dir)
    current = notebook_hash((notebooks or NOTEBOOKS) / f"{path.stem}.ipynb")
    rows = read(path.stem, ledger_dir)
    stale = sorted({r["seed"] for r in rows if r["claim"] == claim and r["notebook_hash"] != current})
    if stale:
        raise ValueError(f"seeds {seed_span(stale)} measured an older version of {path.stem}: re-run the ledger "
                         "for them instead of restating the bound")
    write_rows(path, rebound_rows(rows, claim, new_claim, low, high, shift))
    return sum(r["claim"] == claim for r in rows)


# --- what the checks and the chapters read -------------------------------------------------------------------

def calibrated_seeds(chapter: str, ledger_dir: Path | None = None) -> frozenset[int]:
    """The seeds ``chapter``'s ledger holds; seeds 0–9 while it has no ledger yet."""
    rows = read(chapter, ledger_dir)
    return frozenset(r["seed"] for r in rows) if rows else frozenset(DEFAULT_SEEDS)


def spread(chapter: str, claim: str, occurrence: int = 0, ledger_dir: Path | None = None) -> dict[int, float]:
    """{seed: measured value} of one claim (its ``occurrence``-th check in its cell), from the ledger."""
    values = {r["seed"]: r["value"] for r in read(chapter, ledger_dir)
              if r["claim"] == claim and r["occurrence"] == occurrence and r["status"] != "skipped"}
    if not values:
        raise KeyError(f"the ledger of chapter {chapter} has no claim {claim!r} (occurrence {occurrence}); "
                       "run: bash scripts/preflight.sh --seeds 0-9 --ledger " + chapter[:2])
    return dict(sorted(values.items()))


def seed_span(seeds: Iterable[int]) -> str:
    """0, 1, 2, 3, 5 → "0–3, 5"."""
    seeds, parts = sorted(set(seeds)), []
    for s in seeds:
        if parts and s == parts[-1][1] + 1:
            parts[-1][1] = s
        else:
            parts.append([s, s])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in parts)


def describe_range(chapter: str, claim: str, occurrence: int = 0, ledger_dir: Path | None = None) -> str:
    """"seeds 0–9 gave 0.14–0.31": what the ledger measured for a claim, for a failure at another seed."""
    try:
        values = spread(chapter, claim, occurrence, ledger_dir)
    except KeyError:
        return "the ledger has not measured this claim yet"
    return f"seeds {seed_span(values)} gave {_fmt(min(values.values()))}–{_fmt(max(values.values()))}"


def strip_plot(chapter: str, claims: list[str], ax=None, ledger_dir: Path | None = None):
    """One row per claim: a dot per seed from the ledger, the claim's bound(s) dashed, failing seeds red."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 0.6 + 0.5 * len(claims)))
    rows = read(chapter, ledger_dir)
    if not rows:  # an installed copy without the repository's ledger/ folder: say so, do not stop Run All
        message = f"no claims ledger for chapter {chapter} under {ledger_dir or LEDGER_DIR}: see docs/ledger.md"
        print(message)
        ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=8, transform=ax.transAxes)
        ax.set_axis_off()
        return ax
    for y, claim in enumerate(claims):
        mine = [r for r in rows if r["claim"] == claim and r["occurrence"] == 0 and r["status"] != "skipped"]
        if not mine:
            raise KeyError(f"the ledger of chapter {chapter} has no claim {claim!r}")
        ax.scatter([r["value"] for r in mine], [y] * len(mine), s=22, zorder=3,
                   c=["tab:red" if r["status"] == "FAILED" else "tab:blue" for r in mine])
        for key in ("low", "high"):
            bounds = {r[key] for r in mine if not math.isnan(r[key])}
            if len(bounds) == 1:  # a fixed bound; a bound that moves with the seed (greater's b) is in the margin
                ax.plot([bounds.pop()] * 2, [y - 0.3, y + 0.3], "k--", lw=1)
    ax.set_yticks(range(len(claims)), [_shorten(c) for c in claims])
    ax.invert_yaxis()
    ax.set_xlabel(f"measured at seeds {seed_span(r['seed'] for r in rows)} (dashed: the claim's bound)")
    return ax


def _shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _fmt(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.3g}"


# --- the page ---------------------------------------------------------------------------------------------------

@dataclass
class ClaimSummary:
    """One claim over the seeds the ledger holds."""

    claim: str
    occurrence: int
    kind: str
    always: bool
    values: dict[int, float]
    failed: list[int]
    worst_margin: float  # the smallest margin over the seeds (negative: failed somewhere)
    sd: float  # standard deviation of the measured value over the seeds
    bound: str

    @property
    def margin_in_sd(self) -> float:
        """The worst margin in standard deviations of the value (inf when the value does not move)."""
        if math.isnan(self.worst_margin):
            return math.nan
        if self.sd == 0:
            return math.copysign(math.inf, self.worst_margin) if self.worst_margin else 0.0
        return self.worst_margin / self.sd

    def sort_key(self) -> tuple:
        relative = self.margin_in_sd
        return (self.always, -len(self.failed), math.inf if math.isnan(relative) else relative, self.worst_margin)


def _bound_text(rows: list[dict]) -> str:
    """The bound in the claim's units, e.g. "≥ 0.9", "in [3, 8]", "a − b > 0.1"; a moving bound as its range."""
    kind = rows[0]["kind"]

    def side(key: str) -> str:
        found = sorted({r[key] for r in rows if not math.isnan(r[key])})
        if not found:
            return ""
        return _fmt(found[0]) if len(found) == 1 else f"{_fmt(found[0])}…{_fmt(found[-1])}"

    low, high = side("low"), side("high")
    return {"at_least": f"≥ {low}", "at_most": f"≤ {high}", "between": f"in [{low}, {high}]",
            "greater": f"a − b > {low}", "close": f"in [{low}, {high}]", "true": "true"}.get(kind, rows[0]["bound"])


def summarize(rows: list[dict]) -> list[ClaimSummary]:
    """Each claim's summary over its seeds, failing and thinnest-margin claims first (identities last)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if r["status"] != "skipped":
            groups.setdefault((r["claim"], r["occurrence"]), []).append(r)
    out = []
    for (claim, occurrence), mine in groups.items():
        values = {r["seed"]: r["value"] for r in mine}
        margins = [r["margin"] for r in mine if not math.isnan(r["margin"])]
        out.append(ClaimSummary(
            claim, occurrence, mine[0]["kind"], mine[0]["always"], values,
            sorted(r["seed"] for r in mine if r["status"] == "FAILED"), min(margins) if margins else math.nan,
            statistics.stdev(values.values()) if len(values) > 1 else 0.0, _bound_text(mine)))
    return sorted(out, key=ClaimSummary.sort_key)


def suggested_bound(summary: ClaimSummary) -> str:
    """A bound one standard deviation outside the seeds' range (to be rounded out by hand into the prose)."""
    values = list(summary.values.values())
    low, high = min(values) - summary.sd, max(values) + summary.sd
    return {"at_least": f"≥ {_fmt(low)}", "at_most": f"≤ {_fmt(high)}", "between": f"in [{_fmt(low)}, {_fmt(high)}]",
            "greater": f"a − b > {_fmt(low)}"}.get(summary.kind, "state it as moving with the seed")


def weak_claims(chapter: str, ledger_dir: Path | None = None) -> list[ClaimSummary]:
    """The lesson claims of ``chapter`` that fail at some seed or keep under one standard deviation of margin
    (``close`` claims only when they fail: their reference moves with the seed, so the value's sd says nothing)."""
    return [c for c in summarize(read(chapter, ledger_dir))
            if not c.always and (c.failed or (c.kind != "close" and not math.isnan(c.margin_in_sd)
                                              and c.margin_in_sd < 1))]


def _markdown(text: str) -> str:
    """A claim sentence safe inside a Markdown table cell (no table breaks, HTML, emphasis or math)."""
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")
    return re.sub(r"([*_$`])", r"\\\1", text)


def chapter_section(stem: str, rows: list[dict], current_hash: str | None) -> list[str]:
    seeds = sorted({r["seed"] for r in rows})
    stale = sorted({r["seed"] for r in rows if current_hash and r["notebook_hash"] != current_hash})
    claims = summarize(rows)
    failing = sum(bool(c.failed) for c in claims)
    lines = [f"## [{stem}](../notebooks/{stem}.ipynb)", "",
             f"Seeds {seed_span(seeds)} ({len(seeds)} runs); {len(claims)} claims, {failing} failing at some seed."]
    if stale:
        which = f"{'Seed' if len(stale) == 1 else 'Seeds'} {seed_span(stale)}"
        lines[-1] += f" {which} ran an older version of the notebook: run the ledger again to measure the current one."
    lines += ["", "| claim | bound | min | median | max | failed at seeds | worst margin | margin / sd |",
              "|---|---|---|---|---|---|---|---|"]
    for c in claims:
        values = list(c.values.values())
        name = _markdown(c.claim) + (f" (check {c.occurrence + 1})" if c.occurrence else "")
        name += " ≡" if c.always else ""
        short = f" (measured at {len(values)} of {len(seeds)} seeds)" if len(values) < len(seeds) else ""
        relative = "—" if math.isnan(c.margin_in_sd) or math.isinf(c.margin_in_sd) else f"{c.margin_in_sd:.1f}"
        lines.append(f"| {name}{short} | {_markdown(c.bound)} | {_fmt(min(values))} | "
                     f"{_fmt(statistics.median(values))} | {_fmt(max(values))} | {seed_span(c.failed) or 'none'} | "
                     f"{_fmt(c.worst_margin)} | {relative} |")
    return lines + [""]


INTRO = """# The claims ledger

Every quantitative sentence of the workbook is a `check.*` call. This page is generated from `ledger/`, where
`bash scripts/preflight.sh --seeds 0-9 --ledger` records what each claim measured at each seed; regenerate it
with `python -m cl_lab.ledger page`.

Per chapter, one row per claim: the bound, the measured value's min / median / max over the seeds, the seeds
where the claim failed, and the worst seed's margin to the bound, in the claim's units (negative: it failed
there). *margin / sd* divides that margin by the value's standard deviation over the seeds: a lesson claim
should keep at least 1. For `greater` the value is the gap a − b. ≡ marks an exact identity. Failing and
thinnest-margin claims come first.
"""


def page(ledger_dir: Path | None = None, notebooks: Path | None = None) -> str:
    """The Markdown of docs/ledger.md from every chapter's ledger file."""
    ledger_dir, notebooks = ledger_dir or LEDGER_DIR, notebooks or NOTEBOOKS
    files = sorted(ledger_dir.glob("[0-9][0-9]_*.csv"))
    lines = [INTRO]
    if not files:
        lines.append("No chapter has a ledger yet: run `bash scripts/preflight.sh --seeds 0-9 --ledger`.\n")
    for path in files:
        notebook = notebooks / f"{path.stem}.ipynb"
        current = notebook_hash(notebook) if notebook.exists() else None
        lines += chapter_section(path.stem, read(path.stem, ledger_dir), current)
    chapters = sorted(notebooks.glob("[0-9][0-9]_*.ipynb"))
    missing = [p.stem for p in chapters if not (ledger_dir / f"{p.stem}.csv").exists()]
    if files and missing:
        lines.append(f"Not in the ledger yet: {', '.join(missing)}.\n")
    return "\n".join(lines)


# --- claims found in the notebooks, for the test that every claim is in the ledger ------------------------------

@dataclass(frozen=True)
class StaticClaim:
    """A claim sentence as written at a ``check.*`` call: exact text, or a pattern for an f-string."""

    text: str  # the sentence, f-string fields shown as {…}
    pattern: re.Pattern

    def matches(self, claim: str) -> bool:
        return self.pattern.fullmatch(claim) is not None


def _is_check_call(node: ast.Call) -> bool:
    return (isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "check" and node.func.attr in CHECKS)


def _claim_argument(call: ast.Call) -> ast.expr | None:
    position = CHECKS[call.func.attr]
    for keyword in call.keywords:
        if keyword.arg == "claim":
            return keyword.value
    return call.args[position] if len(call.args) > position else None


def _static_claim(node: ast.expr) -> StaticClaim | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return StaticClaim(node.value, re.compile(re.escape(node.value), re.DOTALL))
    if isinstance(node, ast.JoinedStr):
        text, pattern = "", ""
        for part in node.values:
            if isinstance(part, ast.Constant):
                text, pattern = text + part.value, pattern + re.escape(part.value)
            else:
                text, pattern = text + "{…}", pattern + ".+?"
        return StaticClaim(text, re.compile(pattern, re.DOTALL))
    return None  # a sentence held in a variable or built by a call: not checked statically


def static_claims(notebook: Path) -> list[StaticClaim]:
    """The claims of a notebook's ``check.<fn>(…, "sentence")`` calls whose sentence is a string literal or an
    f-string (an f-string's fields match any text). Magic lines (%, !) are ignored; a sentence passed in a
    variable cannot be read statically and is left out. A call that does not run at the defaults (under
    ``if SMOKE:``, say) is still found, so the ledger test would report it missing: keep claims unconditional."""
    import nbformat

    found = []
    for cell in nbformat.read(notebook, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(_without_magics(cell.source))):
            if isinstance(node, ast.Call) and _is_check_call(node):
                argument = _claim_argument(node)
                claim = _static_claim(argument) if argument is not None else None
                if claim is not None:
                    found.append(claim)
    return found


def missing_claims(notebook: Path, ledger_dir: Path | None = None) -> list[str]:
    """The notebook's claims (``static_claims``) that no row of its ledger matches."""
    measured = {r["claim"] for r in read(notebook.stem, ledger_dir)}
    return [c.text for c in static_claims(notebook) if not any(c.matches(m) for m in measured)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("page", "missing", "rebound", "weak", "drop", "restamp"))
    parser.add_argument("chapter", nargs="?", help="rebound: the chapter, e.g. 05")
    parser.add_argument("--out", type=Path, default=PAGE, help="where the page goes (default docs/ledger.md)")
    parser.add_argument("--claim", help="rebound: the claim sentence as the ledger holds it")
    parser.add_argument("--to", help="rebound: the restated sentence, as the notebook's check call now says it")
    parser.add_argument("--low", type=float, help="rebound: the new lower bound (or greater's margin)")
    parser.add_argument("--high", type=float, help="rebound: the new upper bound")
    parser.add_argument("--measured", default="HEAD",
                        help="restamp: the git revision whose notebook the ledger measured (default HEAD)")
    parser.add_argument("--shift", type=float, default=0.0,
                        help="rebound: move a bound written as an expression (x + 0.05 → x + 0.1: --shift 0.05)")
    args = parser.parse_args(argv)
    if args.command == "weak":
        stems = [args.chapter] if args.chapter else [p.stem for p in sorted(LEDGER_DIR.glob("[0-9][0-9]_*.csv"))]
        for stem in stems:
            for c in weak_claims(stem):
                values = list(c.values.values())
                print(f"{stem[:2]} | {c.claim} | {c.bound} | {_fmt(min(values))} / {_fmt(statistics.median(values))} / "
                      f"{_fmt(max(values))} sd {_fmt(c.sd)} | failed {seed_span(c.failed) or '-'} | "
                      f"suggest {suggested_bound(c)}")
        return 0
    if args.command == "drop":
        if not (args.chapter and args.claim):
            parser.error("drop needs CHAPTER and --claim")
        print(f"{args.chapter}: {drop(args.chapter, args.claim)} rows removed")
        return 0
    if args.command == "rebound":
        if not (args.chapter and args.claim and args.to):
            parser.error("rebound needs CHAPTER, --claim and --to")
        count = rebound(args.chapter, args.claim, args.to, args.low, args.high, shift=args.shift)
        print(f"{args.chapter}: {count} rows restated")
        return 0
    if args.command == "restamp":
        if not args.chapter:
            parser.error("restamp needs CHAPTER")
        stem = _existing_ledger(args.chapter, None).stem
        source = subprocess.run(["git", "show", f"{args.measured}:notebooks/{stem}.ipynb"], cwd=NOTEBOOKS.parent,
                                capture_output=True, text=True, check=True).stdout
        print(f"{stem}: {restamp(args.chapter, source)} rows re-stamped")
        return 0
    if args.command == "page":
        args.out.write_text(page(), encoding="utf-8")
        print(f"written to {args.out}")
        return 0
    missing = {p.stem: missing_claims(p) for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
               if ledger_path(p.stem) is not None}
    for stem, claims in missing.items():
        print(f"{stem}: " + ("every claim is in the ledger" if not claims else f"{len(claims)} missing"))
        for claim in claims:
            print(f"  {claim}")
    return 1 if any(missing.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
