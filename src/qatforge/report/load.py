"""Reading the per-artifact evaluation JSONs into report rows and the polars report frame."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from qatforge.io import read_json
from qatforge.spec.columns import BOOL_COLUMNS, FLOAT_COLUMNS, LOSS_COLUMNS, REPORT_COLUMNS, SPEED_COLUMNS, STR_COLUMNS
from qatforge.spec.formats import FORMATS, is_deployment_artifact, lookup

EXTRA_COLUMNS = ("threads", "n_prompts", "failures")
FORMAT_ORDER = {f: i for i, f in enumerate(FORMATS)}
NO_SCHEME = "none"


def load_evals(eval_jsons: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Read the evaluation JSONs; clear error naming the file for a missing column or bad value."""
    rows = []
    seen: dict[tuple, Path] = {}
    for p in map(Path, eval_jsons):
        try:
            rec = read_json(p)
        except (OSError, ValueError) as e:
            raise ValueError(f"{p}: cannot read evaluation JSON: {e}") from e
        if not isinstance(rec, dict):
            raise ValueError(f"{p}: evaluation JSON is not an object")
        missing = [c for c in REPORT_COLUMNS if c not in rec]
        if missing:
            raise ValueError(f"{p}: missing report columns {missing}")
        try:
            lookup(rec["format"])
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
        key = (rec["run"], rec["format"], rec["variant"])
        if key in seen:
            raise ValueError(f"{p}: duplicate artifact {'/'.join(key)} (also in {seen[key]})")
        seen[key] = p
        rec = dict(rec)
        rec["qat_scheme"] = rec["qat_scheme"] or NO_SCHEME
        # a deployment artifact without a verdict fails; a reference-only row (the base) has none
        rec["parity_pass"] = bool(rec["parity_pass"]) if is_deployment_artifact(*key[1:]) else None
        rec["_path"] = str(p)
        rows.append(rec)
    if not rows:
        raise ValueError("no evaluation JSONs given")
    return rows


def _sort_key(r: Mapping[str, Any]) -> tuple:
    return (r["parity_pass"] is not False, r["run"], FORMAT_ORDER[r["format"]], -(r["size_mb"] or 0.0), r["variant"])


def deployed(r: Mapping[str, Any]) -> bool:
    """Whether the row is a deployment artifact (judged by parity), not a reference-only row."""
    return is_deployment_artifact(r["format"], r["variant"])


def label(r: Mapping | None) -> str:
    """``run/format/variant``, or ``n/a`` for no row."""
    return "n/a" if r is None else f"{r['run']}/{r['format']}/{r['variant']}"


def to_frame(rows: Sequence[Mapping[str, Any]]) -> Any:
    """polars DataFrame with the report columns in fixed order (failing rows first), then the extras,
    the speed and the loss columns (NaN where a row has none; ``parity_pass`` null on reference-only rows)."""
    import polars as pl

    rows = sorted(rows, key=_sort_key)
    cols = REPORT_COLUMNS + EXTRA_COLUMNS + SPEED_COLUMNS + LOSS_COLUMNS
    data: dict[str, list] = {c: [] for c in cols}
    for r in rows:
        for c in REPORT_COLUMNS:
            v = r.get(c)
            if c in FLOAT_COLUMNS:
                v = float("nan") if v is None else float(v)
            elif c in BOOL_COLUMNS:
                v = None if v is None else bool(v)
            else:
                v = str(v)
            data[c].append(v)
        data["threads"].append(int(r.get("threads") or 0))
        data["n_prompts"].append(int(r.get("n_prompts") or 0))
        data["failures"].append("; ".join(r.get("failures") or []) or "none")
        for c in SPEED_COLUMNS + LOSS_COLUMNS:
            data[c].append(float("nan") if r.get(c) is None else float(r[c]))
    schema = {c: pl.String for c in STR_COLUMNS} | {c: pl.Float64 for c in FLOAT_COLUMNS + SPEED_COLUMNS + LOSS_COLUMNS}
    schema |= {c: pl.Boolean for c in BOOL_COLUMNS} | {"threads": pl.Int64, "n_prompts": pl.Int64, "failures": pl.String}
    return pl.DataFrame(data, schema={c: schema[c] for c in cols})
