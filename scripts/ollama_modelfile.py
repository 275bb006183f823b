from pathlib import Path

import qatforge.quiet  # noqa: F401
from qatforge.export.ollama import modelfile
from qatforge.runlog import logged

with logged(snakemake) as log:
    modelfile(snakemake.input.merged, Path(snakemake.input.gguf).name, snakemake.output[0])
    log.info("wrote %s", snakemake.output[0])
