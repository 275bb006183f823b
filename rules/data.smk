# eval.n_prompts / eval.n_nll are checked against the test split here (before any training) but are
# not params: they do not change the splits, so editing them must not rerun the whole DAG.
rule prepare_data:
    input:
        data=config["data"]["path"],
    output:
        train="results/data/train.parquet",
        dev="results/data/dev.parquet",
        test="results/data/test.parquet",
        summary="results/data/summary.json",
    params:
        dev_fraction=config["data"]["dev_fraction"],
        test_fraction=config["data"]["test_fraction"],
        max_tokens=config["data"]["max_tokens"],
        on_bad_rows=config["data"]["on_bad_rows"],
        data_format=config["data"]["format"],
    log:
        "logs/prepare_data.log",
    benchmark:
        "benchmarks/prepare_data.tsv"
    threads: 1
    resources:
        **rule_resources("prepare_data"),
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/prepare_data.py"
