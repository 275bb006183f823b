import qatforge.quiet  # noqa: F401
from qatforge.report import parity_gate
from qatforge.runlog import logged

with logged(snakemake):
    parity_gate(snakemake.input.csv, snakemake.output[0])
