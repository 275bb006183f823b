rule torchao_ptq:
    input:
        merged=merged_dir("{run}"),
    output:
        directory(artifact_path("{run}", "torchao", "{scheme}")),
    wildcard_constraints:
        run=_alt(qcfg.baseline_runs(config)),
        scheme=_alt(config["torchao"]["schemes"]),
    log:
        "logs/torchao_ptq/{run}/{scheme}.log",
    benchmark:
        "benchmarks/torchao_ptq/{run}/{scheme}.tsv"
    threads: 1
    resources:
        **rule_resources("torchao_ptq"),
    conda:
        "../envs/export.yaml"
    script:
        "../scripts/torchao_ptq.py"


rule qat_convert:
    input:
        merged=merged_dir("{run}"),
    output:
        directory(artifact_path("{run}", "torchao", "", qat=True)),  # its own scheme: no variant in the path
    params:
        scheme=qat_scheme,
    wildcard_constraints:
        run=_alt(qcfg.qat_runs(config)),
    log:
        "logs/qat_convert/{run}.log",
    benchmark:
        "benchmarks/qat_convert/{run}.tsv"
    threads: 1
    resources:
        **rule_resources("qat_convert"),
    conda:
        "../envs/export.yaml"
    script:
        "../scripts/qat_convert.py"
