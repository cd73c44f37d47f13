"""Decoding on the newer families (Qwen3, Gemma 3, a mixture of experts): the
greedy-equivalent methods (speculative with a draft, n-gram prompt lookup, Superposed
with one draft and no n-gram, LUD with beta > 1) equal plain greedy token for token.
(Plain greedy equals transformers' generate in test_hf_parity.py.)"""

import dataclasses

import jax
import pytest

from cadenza.decode import DecodeConfig, generate
from cadenza.decode.config import with_fields
from cadenza.decode.lud_config import LudConfig
from cadenza.decode.speculative import DraftModel
from cadenza.models import Transformer, init_params

PROMPTS = [[1, 17, 42, 99, 5, 17, 42], [1, 300]]
N = 6


def _sharpened(cfg, seed):
    """Random params whose logits have clear winners (final norm scaled up): no near-ties
    for batched verification to flip."""
    params = init_params(cfg, jax.random.key(seed))
    scale = params["final_norm"]["scale"]
    scale = 30.0 * (1.0 + scale) - 1.0 if cfg.norm_plus_one else 30.0 * scale
    return {**params, "final_norm": {"scale": scale}}


@pytest.mark.parametrize("family, layers", [("qwen3", 1), ("gemma3_text", 2), ("qwen2_moe", 1)])
def test_greedy_equivalent_methods_equal_greedy(tiny_config, family, layers):
    cfg = tiny_config(family, f"model.num_layers={layers}")  # Gemma 3: one local, one global
    model, params = Transformer(cfg), _sharpened(cfg, 0)
    base = DecodeConfig(max_new_tokens=N, ignore_eos=True)
    want = generate(model, params, PROMPTS, base).token_ids
    draft = jax.tree.map(lambda x: x * 1.05, params)  # agrees often, not always
    runs = {
        "speculative": (dataclasses.replace(base, method="speculative"),
                        {"drafter": DraftModel(cfg, 3), "draft_params": (draft, None)}),
        "ngram": (with_fields(dataclasses.replace(base, method="ngram"), speculative__gamma=2),
                  {}),
        "superposed": (with_fields(dataclasses.replace(base, method="superposed"),
                                   superposed__num_drafts=1, superposed__num_candidates=1,
                                   superposed__alpha=0.0), {}),
        "lud": (dataclasses.replace(base, method="lud"),
                {"lud": LudConfig(beta=1.5, lookahead=2, cut_repeats=False)}),
    }
    for name, (config, resources) in runs.items():
        assert generate(model, params, PROMPTS, config, **resources).token_ids == want, name
