"""``parity_gate``: the pipeline's stop while any deployment artifact of the report fails parity."""

from __future__ import annotations

from pathlib import Path

from qatforge.io import atomic_file
from qatforge.spec.formats import is_deployment_artifact


def parity_gate(report_csv: str | Path, out_ok: str | Path) -> None:
    """Write ``out_ok`` when every deployment artifact of the report passes parity, else raise listing
    the failures. Reference-only rows (the base model, parity_pass empty) are not judged; a
    deployment artifact without a verdict fails."""
    import polars as pl

    df = pl.read_csv(report_csv, schema_overrides={"parity_pass": pl.Boolean})
    if "parity_pass" not in df.columns:
        raise ValueError(f"{report_csv}: no parity_pass column")
    judged = [r for r in df.to_dicts() if is_deployment_artifact(r["format"], r["variant"])]
    if not judged:
        raise ValueError(f"{report_csv}: the report has no deployment artifact rows")
    bad = [r for r in judged if r["parity_pass"] is not True]
    if bad:
        lines = [
            f"  {r['run']}/{r['format']}/{r['variant']}: "
            f"{'no parity verdict' if r['parity_pass'] is None else r.get('failures', '') or 'no reason recorded'} "
            f"(kld_mean={r['kld_mean']}, top1_agree={r['top1_agree']}, gen_match={r['gen_match']}, "
            f"token_parity={r['token_parity']})"
            for r in bad
        ]
        raise RuntimeError(f"parity failed for {len(bad)} of {len(judged)} artifacts in {report_csv}:\n" + "\n".join(lines))
    n_ref = df.height - len(judged)
    with atomic_file(out_ok) as tmp:
        tmp.write_text(f"all {len(judged)} artifacts in {Path(report_csv).name} pass parity"
                       f"{f' (not judged: {n_ref} reference-only, the base model)' if n_ref else ''}\n")
