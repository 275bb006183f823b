from pathlib import Path

from qatforge.io import read_json
from qatforge.merge import merge
from qatforge.runlog import logged

with logged(snakemake) as log:
    best = read_json(snakemake.input.best)
    adapter = Path(snakemake.input.checkpoints) / best["selected"]
    run, scheme = snakemake.wildcards.run, snakemake.params.qat_scheme
    info = merge(
        snakemake.input.base,
        adapter,
        snakemake.output[0],
        qat_scheme=scheme,
        trust_remote_code=snakemake.params.trust_remote_code,
        provenance={"run": run, "checkpoint": best["selected"], "qat_scheme": scheme},
        threads=snakemake.threads,
        log=log.info,
    )
    log.info("merged %s: %s", adapter, info)
