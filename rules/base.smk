rule build_base:
    input:
        train="results/data/train.parquet",
    output:
        directory("results/base"),
    params:
        base=config["model"]["base"],
        builtin=sorted_keys(config["model"]["builtin"]),
        trust_remote_code=config["model"]["trust_remote_code"],
        seed=config["seed"],
        max_tokens=config["data"]["max_tokens"],
    log:
        "logs/build_base.log",
    benchmark:
        "benchmarks/build_base.tsv"
    threads: config["train"]["threads"]
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/build_base.py"
