"""The report columns: written first, in this order, by every evaluation JSON and ``report.csv``."""

REPORT_COLUMNS = (
    "run", "qat_scheme", "format", "variant", "source_checkpoint", "sha256", "size_mb",
    "accuracy", "nll", "ppl", "load_s", "prompt_tps", "gen_tps", "peak_rss_mb",
    "kld_mean", "kld_max", "top1_agree", "gen_match", "token_parity", "parity_pass",
)
STR_COLUMNS = ("run", "qat_scheme", "format", "variant", "source_checkpoint", "sha256")
BOOL_COLUMNS = ("token_parity", "parity_pass")
FLOAT_COLUMNS = tuple(c for c in REPORT_COLUMNS if c not in STR_COLUMNS + BOOL_COLUMNS)
