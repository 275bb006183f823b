rule prepare_data:
    input:
        data=config["data"]["path"],
    output:
        train="results/data/train.parquet",
        eval="results/data/eval.parquet",
        summary="results/data/summary.json",
    params:
        seed=config["seed"],
        eval_fraction=config["data"]["eval_fraction"],
        max_tokens=config["data"]["max_tokens"],
        on_bad_rows=config["data"]["on_bad_rows"],
    log:
        "logs/prepare_data.log",
    benchmark:
        "benchmarks/prepare_data.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/prepare_data.py"
