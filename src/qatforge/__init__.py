"""qatforge: LoRA / QAT fine-tuning, a merged 16-bit source of truth, and every deployment export."""

__version__ = "0.1.0"
