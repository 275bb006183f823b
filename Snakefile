# qatforge: LoRA / QAT fine-tuning → merged 16-bit source of truth → GGUF, TorchAO and ONNX
# exports → evaluation and parity → results/report.csv.  Run: snakemake --cores all
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "config/schema.yaml")


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/base.smk"
include: "rules/train.smk"
include: "rules/export_gguf.smk"
include: "rules/export_torchao.smk"
include: "rules/export_onnx.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


localrules:
    all,
    report,
    parity_gate,
    ollama_modelfile,


rule all:
    input:
        all_targets(),
    default_target: True
