from pathlib import Path

from qatforge.io import read_json
from qatforge.merge import merge
from qatforge.runlog import logged

with logged(snakemake) as log:
    best = read_json(snakemake.input.best)
    adapter = Path(snakemake.input.checkpoints) / best["selected"]
    info = merge(
        snakemake.input.base,
        adapter,
        snakemake.output[0],
        qat_scheme=snakemake.params.qat_scheme,
        trust_remote_code=snakemake.params.trust_remote_code,
    )
    log.info("merged %s: %s", adapter, info)
