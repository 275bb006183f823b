rule onnx_export:
    input:
        merged=merged_dir("{run}"),
    output:
        directory(artifact_path("{run}", "onnx", "fp32")),
    log:
        "logs/onnx_export/{run}.log",
    benchmark:
        "benchmarks/onnx_export/{run}.tsv"
    threads: 1
    resources:
        mem_mb=6000,
        runtime=30,
    conda:
        "../envs/export.yaml"
    script:
        "../scripts/onnx_export.py"


rule onnx_int8:
    input:
        fp32=artifact_path("{run}", "onnx", "fp32"),
    output:
        directory(artifact_path("{run}", "onnx", "int8")),
    log:
        "logs/onnx_int8/{run}.log",
    benchmark:
        "benchmarks/onnx_int8/{run}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/export.yaml"
    script:
        "../scripts/onnx_int8.py"
