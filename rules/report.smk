rule report:
    input:
        evals=eval_jsons(),
    output:
        csv=report(
            "results/report.csv",
            caption="../report/table.rst",
            category="Report",
            labels={"table": "per-artifact benchmark and parity"},
        ),
        md="results/report.md",
        qat_csv=report(
            "results/qat_vs_ptq.csv",
            caption="../report/qat_vs_ptq.rst",
            category="Report",
            labels={"table": "QAT vs PTQ recovery"},
        ),
        pareto=report(
            "results/plots/quality_vs_size.png",
            caption="../report/pareto.rst",
            category="Report",
            labels={"plot": "quality vs size"},
        ),
        speed=report(
            "results/plots/tokens_per_s.png",
            caption="../report/speed.rst",
            category="Report",
            labels={"plot": "tokens/s"},
        ),
    params:
        accuracy_margin=config["report"]["accuracy_margin"],
        fail_on_parity=config["report"]["fail_on_parity"],
        # [(format, reason)] left out under formats.on_unsupported: skip (report.md lists them)
        skipped=sorted(SKIPPED.items()),
    log:
        "logs/report.log",
    threads: 1
    resources:
        **rule_resources("report"),
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/report.py"


rule parity_gate:
    input:
        csv="results/report.csv",
    output:
        "results/parity.ok",
    log:
        "logs/parity_gate.log",
    threads: 1
    resources:
        **rule_resources("parity_gate"),
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/parity_gate.py"
