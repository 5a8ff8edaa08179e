"""Built-in HF model families, registered in `MODEL_FAMILIES` on import: llama, qwen2, gpt2.

Adding a family is one file defining an `HFFamily` plus one `MODEL_FAMILIES.register` call
(see docs/models.md).
"""

from realflow.api.registry import MODEL_FAMILIES
from realflow.models.families.base import HFFamily, family_for_config, family_for_hf_config
from realflow.models.families.gpt2 import GPT2
from realflow.models.families.llama import LLAMA, QWEN2, make_llama_like

MODEL_FAMILIES.register("llama", LLAMA)
MODEL_FAMILIES.register("qwen2", QWEN2)
MODEL_FAMILIES.register("gpt2", GPT2)

__all__ = ["HFFamily", "family_for_config", "family_for_hf_config", "make_llama_like"]
