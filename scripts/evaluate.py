# Evaluate one artifact in its own runtime (transformers, llama.cpp or onnxruntime, by format).
import qatforge.quiet  # noqa: F401
from qatforge.evaluate.run import run_eval
from qatforge.runlog import logged

with logged(snakemake) as log:
    p = snakemake.params
    # from the run's training settings (as train gets them): its scheme, and qat_mode for a QAT run only
    row = run_eval(
        snakemake.input.artifact,
        snakemake.input.reference,
        snakemake.input.test,
        snakemake.output[0],
        run=snakemake.wildcards.run,
        qat_scheme=p.settings["qat_scheme"],
        format=p.format,
        variant=p.variant,
        threads=p.threads,
        max_new_tokens=p.max_new_tokens,
        speed_prompts=p.speed_prompts,
        speed_repeats=p.speed_repeats,
        thresholds=p.thresholds,
        baseline_reference=snakemake.input.get("baseline_reference") or None,
        baseline_run=p.baseline_run,
        qat_mode=p.settings.get("qat_mode"),
    )
    log.info("evaluation: %s", row)
