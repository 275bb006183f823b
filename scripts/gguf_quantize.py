import qatforge.quiet  # noqa: F401
from qatforge.export.gguf import quantize
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
        trained=p.trained or None,
        threads=snakemake.threads,
        log=log.info,
    )
    log.info("quantized: %s", info)
    if info.get("qat_tensor_types"):
        check = info["qat_tensor_types"]
        log.info("%d tensors are stored in the types %s trained them under (%s); others: %s",
                 len(check["trained"]), check["scheme"], sorted(set(check["trained"].values())), check["other"])
