rule gguf_convert:
    input:
        merged=merged_dir("{run}"),
        dev="results/data/dev.parquet",
    output:
        gguf=maybe_temp(gguf_file("{run}", OUTTYPE)),
        record=gguf_file("{run}", OUTTYPE) + ".json",
    params:
        outtype=config["gguf"]["outtype"],
        pre_tokenizer=config["gguf"]["pre_tokenizer"],
        model_name=MODEL,
    log:
        "logs/gguf_convert/{run}.log",
    benchmark:
        "benchmarks/gguf_convert/{run}.tsv"
    threads: 1
    resources:
        **rule_resources("gguf_convert"),
    conda:
        "../envs/export.yaml"
    script:
        "../scripts/gguf_convert.py"


rule gguf_imatrix:
    input:
        gguf=gguf_file("{run}", OUTTYPE),
        train="results/data/train.parquet",
    output:
        "results/runs/{run}/gguf/imatrix.gguf",
    params:
        chunks=config["gguf"]["imatrix"]["chunks"],
        ctx=config["gguf"]["imatrix"]["ctx"],
        seed=config["seed"],
    log:
        "logs/gguf_imatrix/{run}.log",
    benchmark:
        "benchmarks/gguf_imatrix/{run}.tsv"
    threads: config["gguf"]["threads"]
    resources:
        **rule_resources("gguf_imatrix"),
    conda:
        "../envs/export.yaml"
    script:
        "../scripts/gguf_imatrix.py"


rule gguf_quantize:
    input:
        unpack(quantize_inputs),
    output:
        gguf=gguf_file("{run}", "{quant}"),
        record=gguf_file("{run}", "{quant}") + ".json",
    params:
        quant=quant_settings,
        on_fallback=config["gguf"]["on_fallback"],
        trained=trained_quant,
    log:
        "logs/gguf_quantize/{run}/{quant}.log",
    benchmark:
        "benchmarks/gguf_quantize/{run}/{quant}.tsv"
    threads: config["gguf"]["threads"]
    resources:
        **rule_resources("gguf_quantize"),
    conda:
        "../envs/export.yaml"
    script:
        "../scripts/gguf_quantize.py"


rule ollama_modelfile:
    input:
        gguf=lambda w: gguf_file(w.run, qcfg.modelfile_quant(config, w.run) or config["gguf"]["default_quant"]),
        merged=merged_dir("{run}"),
    output:
        "results/runs/{run}/gguf/Modelfile",
    log:
        "logs/ollama_modelfile/{run}.log",
    threads: 1
    resources:
        **rule_resources("ollama_modelfile"),
    conda:
        "../envs/export.yaml"
    script:
        "../scripts/ollama_modelfile.py"
