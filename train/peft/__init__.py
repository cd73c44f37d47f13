"""Parameter-efficient fine-tuning on a frozen base, by Flax method interception.

- :func:`prepare` (config, base params, rng) -> (PeftModel, trainable, frozen).
- :class:`PeftModel`: ``apply``, ``init_cache``, ``optimizer``, shardings, summary.
- :mod:`.merge`: fold adapters into the base and back.
- :mod:`.artifacts`: save/load adapters (orbax); Hugging Face peft export/import.
- :mod:`.quant`: NF4 / int8 blockwise quantisation (QLoRA).
"""

from cadenza.train.peft.model import (
    COLLECTION,
    PeftModel,
    build,
    lora_plus_labels,
    prepare,
    scale_lora_b,
)
from cadenza.train.peft.sites import Site, projection_sites, select_sites

__all__ = ["COLLECTION", "PeftModel", "Site", "build", "lora_plus_labels", "prepare",
           "projection_sites", "scale_lora_b", "select_sites"]
