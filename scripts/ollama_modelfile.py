from pathlib import Path

from qatforge.export.ollama import modelfile
from qatforge.runlog import logged

with logged(snakemake) as log:
    modelfile(snakemake.input.merged, Path(snakemake.input.gguf).name, snakemake.output[0])
    log.info("wrote %s", snakemake.output[0])
