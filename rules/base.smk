BASE = config["model"]["base"]


# The builtin base trains on its own corpus (not the dataset): the default recipe is copied from the
# checkpoint the project ships (assets/builtin/tiny-qwen3, hashes checked; found beside scripts/, so
# not a param), any other comes from the machine cache when built before, or is built.
# A local model.base directory is an input, a hub id is not.
# The job also counts the modules each configured torchao scheme quantizes (zero fails before any
# training); the schemes are read from the config, not params, so editing them rebuilds no base.
rule build_base:
    input:
        lambda w: [BASE] if os.path.isdir(BASE) else [],
    output:
        directory(BASE_DIR),
    params:
        base=BASE,
        builtin=sorted_keys(config["model"]["builtin"]),
        trust_remote_code=config["model"]["trust_remote_code"],
        seed=config["seed"],
    log:
        "logs/build_base.log",
    benchmark:
        "benchmarks/build_base.tsv"
    threads: config["train"]["threads"]
    resources:
        **rule_resources("build_base"),
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/build_base.py"


# What the GGUF export needs of the base alone (tokenizer parity with llama.cpp, the types
# llama-quantize writes for a GGUF-targeted QAT run), checked in seconds before any training.
# Training waits for it but is not made stale by it (ancient): a rerun of the check after a
# gguf edit retrains nothing.
rule gguf_check:
    input:
        base=BASE_DIR,
        dev="results/data/dev.parquet",
    output:
        "results/checks/gguf.json",
    params:
        plan=gguf_check_plan,
        outtype=config["gguf"]["outtype"],
        pre_tokenizer=config["gguf"]["pre_tokenizer"],
        model_name=MODEL,
    log:
        "logs/gguf_check.log",
    benchmark:
        "benchmarks/gguf_check.tsv"
    threads: 1
    resources:
        **rule_resources("gguf_check"),
    conda:
        "../envs/export.yaml"
    script:
        "../scripts/gguf_check.py"
