rule onnx_export:
    input:
        merged=merged_dir("{run}"),
    output:
        directory(artifact_path("{run}", "onnx", "{variant}")),
    params:
        settings=lambda w: sorted_keys(config["onnx"]["variants"][w.variant]),
    log:
        "logs/onnx_export/{run}/{variant}.log",
    benchmark:
        "benchmarks/onnx_export/{run}/{variant}.tsv"
    threads: 1
    resources:
        **rule_resources("onnx_export"),
    conda:
        "../envs/export.yaml"
    script:
        "../scripts/onnx_export.py"
