rule train:
    input:
        base=run_base,
        train="results/data/train.parquet",
        dev="results/data/dev.parquet",
        gguf_check=gguf_check,
    output:
        directory(run_dir("{run}", "checkpoints")),
    params:
        settings=train_settings,
        max_tokens=config["data"]["max_tokens"],
        work_dir=lambda w: run_dir(w.run, ".train-work"),
    log:
        "logs/train/{run}.log",
    benchmark:
        "benchmarks/train/{run}.tsv"
    threads: run_threads
    priority: 1
    resources:
        **rule_resources("train"),
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/train.py"


rule select_best:
    input:
        base=run_base,
        checkpoints=run_dir("{run}", "checkpoints"),
        dev="results/data/dev.parquet",
    output:
        run_dir("{run}", "best.json"),
    params:
        metric=config["train"]["select_metric"],
        pinned=lambda w: config["runs"][w.run].get("checkpoint"),
        settings=train_settings,
        n_prompts=config["eval"]["n_prompts"],
        n_eval=config["eval"]["n_nll"],
        max_new_tokens=config["eval"]["max_new_tokens"],
        max_tokens=config["data"]["max_tokens"],
    log:
        "logs/select_best/{run}.log",
    benchmark:
        "benchmarks/select_best/{run}.tsv"
    threads: run_threads
    priority: 1
    resources:
        **rule_resources("select_best"),
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/select_best.py"


rule merge:
    input:
        base=run_base,
        checkpoints=run_dir("{run}", "checkpoints"),
        best=run_dir("{run}", "best.json"),
    output:
        directory(merged_dir("{run}")),
    params:
        qat_scheme=qat_scheme,
        trust_remote_code=config["model"]["trust_remote_code"],
    log:
        "logs/merge/{run}.log",
    benchmark:
        "benchmarks/merge/{run}.tsv"
    threads: 1
    priority: 1
    resources:
        **rule_resources("merge"),
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/merge.py"
