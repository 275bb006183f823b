"""The report columns: written first, in this order, by every evaluation JSON and ``report.csv``."""

REPORT_COLUMNS = (
    "run", "qat_scheme", "format", "variant", "source_checkpoint", "sha256", "size_mb",
    "accuracy", "nll", "ppl", "load_s", "prompt_tps", "gen_tps", "peak_rss_mb",
    "kld_mean", "kld_max", "top1_agree", "gen_match", "token_parity", "parity_pass",
)
STR_COLUMNS = ("run", "qat_scheme", "format", "variant", "source_checkpoint", "sha256")
BOOL_COLUMNS = ("token_parity", "parity_pass")
FLOAT_COLUMNS = tuple(c for c in REPORT_COLUMNS if c not in STR_COLUMNS + BOOL_COLUMNS)

# The speed pass's spread and memory (floats), written after the report columns. Optional when
# reading: an evaluation JSON without them gives NaN. The spread is the 25th/75th percentile of
# the per-run tokens/s when repeats x prompts >= 4, else their min/max (``speed_spread`` says which).
# ``speed_rss_mb`` is the peak RSS during the speed pass alone; ``peak_rss_mb`` stays the peak of
# the whole evaluation process, parity pass included (``qatforge.bench.peak_rss_mb``).
SPEED_COLUMNS = ("prompt_tps_p25", "prompt_tps_p75", "gen_tps_p25", "gen_tps_p75", "speed_rss_mb")

# Written by the report after the speed columns (floats; NaN without the run's merged row or
# per-item results): each row's loss against its run's merged model on the test set, with the
# paired bootstrap 95 % interval (``qatforge.report.paired_loss``). ``acc_loss`` = merged − row
# accuracy (over prompts), ``nll_loss`` = row − merged NLL in nats/token (over conversations).
LOSS_COLUMNS = ("acc_loss", "acc_loss_ci_low", "acc_loss_ci_high", "nll_loss", "nll_loss_ci_low", "nll_loss_ci_high")
