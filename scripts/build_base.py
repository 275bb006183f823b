from pathlib import Path

import qatforge.quiet  # noqa: F401
from qatforge.base import build
from qatforge.runlog import logged
from qatforge.spec.config import torchao_scheme_uses

with logged(snakemake) as log:
    p = snakemake.params
    info = build(
        p.base,
        snakemake.output[0],
        builtin=p.builtin,
        seed=p.seed,
        shipped=Path(snakemake.scriptdir).parent / "assets" / "builtin" / "tiny-qwen3",  # the project's
        trust_remote_code=p.trust_remote_code,
        threads=snakemake.threads,
        torchao_schemes=torchao_scheme_uses(snakemake.config),  # not a param: see rules/base.smk
        log=log.info,
    )
    log.info("base model: %s", info)
