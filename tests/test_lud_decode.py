"""LUD decoding: beta > 1 or m = 0 is greedy, the step mask, KV hygiene."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cadenza.decode import DecodeConfig, generate
from cadenza.decode.lud import _step_mask, accepted_count
from cadenza.decode.lud_config import LudConfig
from cadenza.errors import CadenzaError
from cadenza.models import KVCache, Transformer, init_params

PROMPTS = [[1, 50, 60, 70, 80], [1, 90], [1, 33, 34, 35, 36, 37, 38, 39]]
NEW = 10


@pytest.fixture(scope="module")
def model(request):
    from cadenza.config import load_config

    cfg = load_config(None, [], preset="tiny").model
    return cfg, init_params(cfg, jax.random.key(0))


def greedy_reference(cfg, params, prompt, new_tokens, eos_id=None):
    """Greedy decoding by full recomputation (no cache): the test's own reference loop."""
    forward = jax.jit(lambda p, x, i: Transformer(cfg).apply({"params": p}, x)[0][0, i])
    seq = list(prompt)
    width = len(prompt) + new_tokens       # right padding is invisible to causal attention
    for _ in range(new_tokens):
        padded = jnp.asarray([seq + [0] * (width - len(seq))])
        seq.append(int(jnp.argmax(forward(params, padded, len(seq) - 1))))
        if seq[-1] == eos_id:
            break
    return seq[len(prompt):]


def lud_generate(cfg, params, prompts, lud, max_new_tokens, eos_id=None):
    """LUD through the registry's generate (EOS only if given)."""
    config = DecodeConfig(method="lud", max_new_tokens=max_new_tokens, ignore_eos=True,
                          stop_token_ids=[] if eos_id is None else [eos_id])
    return generate(Transformer(cfg), params, prompts, config, lud=lud)


def test_beta_above_one_and_no_lookahead_are_greedy(model):
    cfg, params = model
    want = [greedy_reference(cfg, params, p, NEW) for p in PROMPTS]
    for lud in (LudConfig(beta=1.5, lookahead=3, cut_repeats=False), LudConfig(lookahead=0)):
        out = lud_generate(cfg, params, PROMPTS, lud, max_new_tokens=NEW)
        assert out.token_ids == want
        assert out.extras["steps"].tolist() == [NEW] * 3 and out.stats["tokens_per_step"] == 1.0


def test_eos_ends_a_row(model):
    cfg, params = model
    greedy = greedy_reference(cfg, params, PROMPTS[0], NEW)
    eos = greedy[3]
    stop = greedy.index(eos) + 1
    out = lud_generate(cfg, params, PROMPTS, LudConfig(beta=2.0), max_new_tokens=NEW,
                       eos_id=eos)
    assert out.token_ids[0] == greedy[:stop] and out.finish_reasons[0] == "stop_token"


def test_accepting_everything_keeps_only_real_kv(model):
    """beta = 0 accepts every placeholder token; the cache must still hold exactly the
    committed real tokens below ``lengths`` (placeholder K/V dropped)."""
    cfg, params = model
    from cadenza.decode import driver, registry

    lud = LudConfig(beta=0.0, lookahead=3, cut_repeats=False)
    config = DecodeConfig(method="lud", max_new_tokens=NEW, ignore_eos=True)
    model_ = Transformer(cfg)
    method, mparams = registry.build(model_, params, config, lud=lud)
    state = jax.jit(method.prefill)(mparams, driver.prepare(method, PROMPTS, config).batch)
    step = jax.jit(method.step)
    while not np.asarray(method.done(state)).all():      # the Method interface, by hand
        state = step(mparams, state)
    harvest = method.harvest(state)
    assert harvest.num_generated.sum() / harvest.extras["steps"].sum() > 3.0   # 1 + m per step
    cache = state.cache
    lengths = np.asarray(cache.lengths)
    for b, prompt in enumerate(PROMPTS):
        seq = (prompt + np.asarray(harvest.tokens)[b].tolist())[:lengths[b]]
        assert lengths[b] >= len(prompt) - 1 + NEW - (1 + lud.lookahead)
        fresh = KVCache.create(cfg, 1, len(seq))
        _, _, fresh = model_.apply({"params": params}, jnp.asarray([seq]), cache=fresh)
        np.testing.assert_allclose(np.asarray(cache.k)[:, b, :lengths[b]],
                                   np.asarray(fresh.k)[:, 0], atol=1e-5)
        np.testing.assert_allclose(np.asarray(cache.v)[:, b, :lengths[b]],
                                   np.asarray(fresh.v)[:, 0], atol=1e-5)
        assert np.asarray(cache.positions)[b, :lengths[b]].tolist() == list(range(len(seq)))


def test_acceptance_threshold_and_repetition_cut():
    cand = jnp.asarray([[5, 6, 7, 8], [5, 6, 7, 8], [5, 5, 7, 8], [5, 6, 6, 8], [5, 6, 7, 8]])
    conf = jnp.asarray([[.9, .95, .9], [.9, .5, .99], [.99, .99, .99], [.9, .9, .9],
                        [.1, .9, .9]])
    assert accepted_count(cand, conf, 0.9, True).tolist() == [4, 2, 1, 2, 1]
    assert accepted_count(cand, conf, 0.9, False).tolist() == [4, 2, 4, 4, 1]
    assert accepted_count(cand, conf, 1.01, False).tolist() == [1] * 5


def test_step_mask_visibility():
    m = 3
    for p in range(1, m + 2):
        mask = np.asarray(_step_mask(jnp.asarray([p]), m))[0]
        for i in range(2 * m + 1):
            for j in range(2 * m + 1):
                if i <= m:     # pending slot: valid pending slots up to itself
                    want = j <= i and j < p
                else:          # placeholder: all valid pending + earlier placeholders
                    want = (j < p) or (m < j <= i)
                assert mask[i, j] == want, (p, i, j)


def test_errors(model):
    cfg, params = model
    with pytest.raises(CadenzaError, match="empty"):
        lud_generate(cfg, params, [[1], []], LudConfig(), max_new_tokens=4)
    with pytest.raises(CadenzaError, match="max_new_tokens"):
        lud_generate(cfg, params, [[1]], LudConfig(), max_new_tokens=0)
    with pytest.raises(CadenzaError, match="placeholder"):
        lud_generate(cfg, params, [[1]], LudConfig(placeholder_id=cfg.eos_token_id),
                     max_new_tokens=4)
    with pytest.raises(CadenzaError, match="vocabulary"):
        lud_generate(cfg, params, [[1, 512]], LudConfig(), max_new_tokens=4)
    with pytest.raises(CadenzaError, match="max_position_embeddings"):
        lud_generate(cfg, params, [[1] * 1000], LudConfig(), max_new_tokens=30)


def test_generate_cli_method_lud_uses_the_lud_section(model, capsys, tmp_path):
    import json

    from cadenza.cli import main
    from cadenza.config import load_config
    from cadenza.models import save_model

    cfg, params = model
    config = load_config(None, ["lud.beta=2.0"], preset="tiny")
    d = save_model(tmp_path / "m", config, params)
    ids = [",".join(map(str, p)) for p in PROMPTS[:2]]
    assert main(["generate", "--checkpoint", str(d), "--method", "lud", "--json",
                 "--max-new-tokens", "6", "--lookahead", "2",
                 "--prompt-ids", ids[0], "--prompt-ids", ids[1]]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = [greedy_reference(cfg, params, p, 6, eos_id=cfg.eos_token_id) for p in PROMPTS[:2]]
    assert [r["token_ids"] for r in rows] == want
    assert [r["steps"] for r in rows] == [len(w) for w in want]
