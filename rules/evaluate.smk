EVAL = config["eval"]


rule reference:
    input:
        merged=merged_dir("{run}"),
        test="results/data/test.parquet",
    output:
        directory(run_dir("{run}", "reference")),
    params:
        n_prompts=EVAL["n_prompts"],
        n_nll=EVAL["n_nll"],
        max_new_tokens=EVAL["max_new_tokens"],
        max_tokens=config["data"]["max_tokens"],
        top_k=EVAL["reference_top_k"],
        tail_samples=EVAL["reference_tail_samples"],
    log:
        "logs/reference/{run}.log",
    benchmark:
        "benchmarks/reference/{run}.tsv"
    threads: EVAL["threads"]
    resources:
        **rule_resources("reference"),
    conda:
        "../envs/eval.yaml"
    script:
        "../scripts/reference.py"


EVAL_PARAMS = dict(
    threads=EVAL["threads"],
    max_new_tokens=EVAL["max_new_tokens"],
    speed_prompts=EVAL["speed_prompts"],
    speed_repeats=EVAL["speed_repeats"],
)


# One job per artifact of qcfg.artifacts(): {format} and {variant} are constrained in common.smk and
# eval_artifact() rejects a combination that is not an artifact of the run.
rule evaluate:
    input:
        artifact=eval_artifact,
        reference=run_dir("{run}", "reference"),
        test="results/data/test.parquet",
        baseline_reference=baseline_reference,
    output:
        "results/eval/{run}/{format}/{variant}.json",
    params:
        format=lambda w: w.format,
        variant=lambda w: w.variant,
        settings=train_settings,
        baseline_run=lambda w: qcfg.comparison_baseline(config, w.run),
        thresholds=thresholds,
        **EVAL_PARAMS,
    log:
        "logs/evaluate/{run}/{format}-{variant}.log",
    benchmark:
        "benchmarks/evaluate/{run}/{format}-{variant}.tsv"
    threads: EVAL["threads"]
    resources:
        **rule_resources("evaluate"),
    conda:
        "../envs/eval.yaml"
    script:
        "../scripts/evaluate.py"
