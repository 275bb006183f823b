"""The transformers runtime behind ``decode.Runtime``: the reference and HF/TorchAO artifacts.

torch and transformers load on first use, not at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np


class HFRuntime:
    """A transformers causal LM + tokenizer behind the ``Runtime`` interface.

    ``compute_dtype``: "float32" (upcast, used for the merged model and the reference) or "auto"
    (the dtype stored in the checkpoint, used for TorchAO directories).
    """

    def __init__(self, model_dir: str | Path, *, compute_dtype: str = "float32", trust_remote_code: bool = False):
        import torch

        from qatforge.model import load_causal_lm, load_tokenizer

        dtype = torch.float32 if compute_dtype == "float32" else compute_dtype
        self.tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
        self.model = load_causal_lm(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model.eval()
        self.compute_dtype = str(next(self.model.parameters()).dtype).replace("torch.", "")

    # --- tokenizer side -------------------------------------------------------------------
    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        from qatforge.chat import prompt_ids

        return prompt_ids(self.tokenizer, messages)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def special_ids(self) -> dict[str, Any]:
        from qatforge.chat import bos_policy

        return {
            "bos_token_id": self.tokenizer.bos_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
            "add_bos": bos_policy(self.tokenizer)["add_bos"],
            "chat_template": self.tokenizer.chat_template,
        }

    # --- model side -----------------------------------------------------------------------
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """fp32 logits ``[len(ids), vocab]`` of one sequence (no padding)."""
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([list(ids)], dtype=torch.long), use_cache=False)
        return out.logits[0].float().numpy()

    def _forward(self, ids: Sequence[int], past: Any) -> Any:
        """Run ``ids`` after the cache ``past``; keep the new cache; return the last logits (a tensor)."""
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([list(ids)], dtype=torch.long), past_key_values=past,
                             use_cache=True)
        self._past = out.past_key_values
        return out.logits[0, -1]

    def start(self, prompt_ids: Sequence[int]) -> Any:
        return self._forward(prompt_ids, None)

    def advance(self, token: int) -> Any:
        return self._forward([token], self._past)
