EVAL = config["eval"]


rule reference:
    input:
        merged="results/runs/{run}/merged",
        eval="results/data/eval.parquet",
        prompts=config["data"]["eval_prompts"],
    output:
        directory("results/runs/{run}/reference"),
    params:
        n_prompts=EVAL["n_prompts"],
        n_nll=EVAL["n_nll"],
        max_new_tokens=EVAL["max_new_tokens"],
        max_tokens=config["data"]["max_tokens"],
    log:
        "logs/reference/{run}.log",
    benchmark:
        "benchmarks/reference/{run}.tsv"
    threads: EVAL["threads"]
    resources:
        mem_mb=4000,
        runtime=30,
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


rule evaluate_hf:
    input:
        artifact="results/runs/{run}/merged",
        reference="results/runs/{run}/reference",
        prompts=config["data"]["eval_prompts"],
    output:
        "results/eval/{run}/hf/merged.json",
    params:
        format="hf",
        variant="merged",
        qat_scheme=qat_scheme,
        thresholds=thresholds("hf"),
        **EVAL_PARAMS,
    log:
        "logs/evaluate/{run}/hf-merged.log",
    benchmark:
        "benchmarks/evaluate/{run}/hf-merged.tsv"
    threads: EVAL["threads"]
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/eval.yaml"
    script:
        "../scripts/evaluate.py"


rule evaluate_torchao:
    input:
        artifact=lambda w: artifact_path(w.run, "torchao", w.scheme),
        reference="results/runs/{run}/reference",
        prompts=config["data"]["eval_prompts"],
    output:
        "results/eval/{run}/torchao/{scheme}.json",
    params:
        format="torchao",
        variant=lambda w: w.scheme,
        qat_scheme=qat_scheme,
        thresholds=thresholds("torchao"),
        **EVAL_PARAMS,
    log:
        "logs/evaluate/{run}/torchao-{scheme}.log",
    benchmark:
        "benchmarks/evaluate/{run}/torchao-{scheme}.tsv"
    threads: EVAL["threads"]
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/eval.yaml"
    script:
        "../scripts/evaluate.py"


rule evaluate_gguf:
    input:
        artifact=gguf_file("{run}", "{gguf_variant}"),
        reference="results/runs/{run}/reference",
        prompts=config["data"]["eval_prompts"],
    output:
        "results/eval/{run}/gguf/{gguf_variant}.json",
    params:
        format="gguf",
        variant=lambda w: w.gguf_variant,
        qat_scheme=qat_scheme,
        thresholds=thresholds("gguf"),
        **EVAL_PARAMS,
    log:
        "logs/evaluate/{run}/gguf-{gguf_variant}.log",
    benchmark:
        "benchmarks/evaluate/{run}/gguf-{gguf_variant}.tsv"
    threads: EVAL["threads"]
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../envs/eval.yaml"
    script:
        "../scripts/evaluate.py"


rule evaluate_onnx:
    input:
        artifact="results/runs/{run}/onnx/{onnx_variant}",
        reference="results/runs/{run}/reference",
        prompts=config["data"]["eval_prompts"],
    output:
        "results/eval/{run}/onnx/{onnx_variant}.json",
    params:
        format="onnx",
        variant=lambda w: w.onnx_variant,
        qat_scheme=qat_scheme,
        thresholds=thresholds("onnx"),
        **EVAL_PARAMS,
    log:
        "logs/evaluate/{run}/onnx-{onnx_variant}.log",
    benchmark:
        "benchmarks/evaluate/{run}/onnx-{onnx_variant}.tsv"
    threads: EVAL["threads"]
    resources:
        mem_mb=3000,
        runtime=30,
    conda:
        "../envs/eval.yaml"
    script:
        "../scripts/evaluate.py"
