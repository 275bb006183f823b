from qatforge.export.gguf import check_trained_types, quantize
from qatforge.io import read_json, write_json
from qatforge.runlog import logged

with logged(snakemake) as log:
    p = snakemake.params
    spec = dict(p.quant)
    info = quantize(
        snakemake.input.gguf,
        snakemake.output.gguf,
        qtype=spec.pop("type"),
        imatrix=snakemake.input.get("imatrix"),
        options={k: v for k, v in spec.items() if k != "imatrix"},
        on_fallback=p.on_fallback,
        threads=snakemake.threads,
        log=log.info,
    )
    log.info("quantized: %s", info)
    if p.trained_targets:  # the quant a GGUF-targeted QAT run trained for: record and check it
        check = check_trained_types(info["tensors"], info["settings"]["type"], p.trained_targets)
        rec = read_json(snakemake.output.record)
        rec["provenance"]["qat_tensor_types"] = check
        write_json(snakemake.output.record, rec)
        log.info("%d tensors trained under the %s fake quantizer are stored as %s; others: %s",
                 len(check["trained"]), check["type"], check["type"], check["other"])
