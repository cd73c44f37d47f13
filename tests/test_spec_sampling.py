"""Speculative sampling is exact: with a different draft, the first generated tokens follow the
target's distribution (chi-square vs enumeration on an 8-token vocabulary, with warpers)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from cadenza.decode import DecodeConfig, SamplingConfig, sampling
from cadenza.decode.prompt_lookup import PromptLookup
from cadenza.decode.speculative import DraftModel, speculative_generate
from cadenza.models import Transformer, init_params

V, N, SAMPLES = 8, 3, 40_000
PROMPT = [1, 3, 5, 3]
CFG = DecodeConfig(method="sample", max_new_tokens=N, ignore_eos=True,
                   sampling=SamplingConfig(temperature=0.8, top_k=6, repetition_penalty=1.3))


def toy(tiny_config):
    cfg = tiny_config("llama", f"model.vocab_size={V}", "model.num_layers=1")
    params = init_params(cfg, jax.random.key(0))
    params = {**params, "lm_head": {"kernel": params["lm_head"]["kernel"] * 3.0}}
    return Transformer(cfg), params


def perturbed(params, scale=0.5):
    """A draft that agrees with the target only partly: its params plus noise."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jnp.std(x) * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])


def enumerate_warped(model, params):
    """log P(x_1..x_N) [V**N] and, per prefix, the warped next-token log-probs."""
    seqs = np.asarray([PROMPT + list(x) for x in itertools.product(range(V), repeat=N)])
    logits = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])(params, jnp.asarray(seqs))
    spec = CFG.sampling_spec()
    total = np.zeros(len(seqs))
    per_step = []
    for i in range(N):
        pos = len(PROMPT) - 1 + i
        seen = jax.nn.one_hot(seqs[:, :pos + 1], V, dtype=bool).any(axis=1)
        logp = np.asarray(sampling.log_probs(logits[:, pos], spec, seen), np.float64)
        total += logp[np.arange(len(seqs)), seqs[:, pos + 1]]
        per_step.append(logp)
    return total, per_step


def chi_square(samples, logp_joint):
    codes = (samples * V ** np.arange(N - 1, -1, -1)).sum(axis=1)
    counts = np.bincount(codes, minlength=V ** N).astype(np.float64)
    expected = np.exp(logp_joint) * len(samples)
    expected *= len(samples) / expected.sum()
    sparse = expected < 5
    obs = np.append(counts[~sparse], counts[sparse].sum())
    exp = np.append(expected[~sparse], expected[sparse].sum())
    return stats.chisquare(obs, exp).pvalue, (counts[expected == 0].sum())


def test_draft_model_sampling_matches_target(tiny_config):
    target, tparams = toy(tiny_config)
    draft, dparams = target, perturbed(tparams)
    res = speculative_generate(target, tparams, [PROMPT] * SAMPLES, CFG,
                               drafter=DraftModel(draft.config, 2), draft_params=(dparams, None),
                               seeds=list(range(SAMPLES)))
    samples = np.asarray(res.token_ids)
    joint, p_steps = enumerate_warped(target, tparams)
    pvalue, impossible = chi_square(samples, joint)
    assert impossible == 0 and pvalue > 1e-3, pvalue
    # acceptance at draft position 1. Round 1 proposes x2 given x1; rows that accept nothing
    # (x2 = a residual sample) run a round 2 proposing x3 given (x1, x2).
    _, q_steps = enumerate_warped(draft, dparams)
    p_ = [np.exp(x) for x in p_steps]
    q_ = [np.exp(x) for x in q_steps]
    acc = prop = 0.0
    for x1 in range(V):
        i = x1 * V * V
        alpha1 = np.minimum(p_[1][i], q_[1][i]).sum()
        resid = np.maximum(p_[1][i] - q_[1][i], 0.0)        # (1 - alpha1) * residual dist
        alpha2 = np.asarray([np.minimum(p_[2][i + x2 * V], q_[2][i + x2 * V]).sum()
                             for x2 in range(V)])
        acc += p_[0][i][x1] * (alpha1 + resid @ alpha2)
        prop += p_[0][i][x1] * (1.0 + resid.sum())
    alpha = acc / prop
    assert abs(res.stats["acceptance_per_position"][0] - alpha) < 0.01
    assert 0.2 < alpha < 0.95          # the draft really differs, so rejections happen


def test_prompt_lookup_sampling_matches_target(tiny_config):
    target, tparams = toy(tiny_config)
    res = speculative_generate(target, tparams, [PROMPT] * SAMPLES, CFG,
                               drafter=PromptLookup(gamma=2), seeds=list(range(SAMPLES)))
    joint, _ = enumerate_warped(target, tparams)
    pvalue, impossible = chi_square(np.asarray(res.token_ids), joint)
    assert impossible == 0 and pvalue > 1e-3, pvalue
    # point-mass drafts from the context are proposed and sometimes accepted (prob. p(d))
    assert 0.0 < res.stats["acceptance_per_position"][0] < 1.0
