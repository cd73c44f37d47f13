"""The decoding core: one compile per prompt bucket for every method, adapters with virtual
tokens decode, Superposed/LUD on a 3-axis mesh, Medusa's single prefill forward, and a
drafter written here against the documented interface."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cadenza.config import load_config
from cadenza.decode import DecodeConfig, driver, generate
from cadenza.decode.config import SuperposedConfig, with_fields
from cadenza.decode.lud_config import LudConfig
from cadenza.decode.medusa import Medusa, init_medusa_heads
from cadenza.decode.speculative import DraftModel, Proposal, speculative_generate
from cadenza.models import init_params

SMALL = ["model.num_layers=1", "model.hidden_size=32", "model.intermediate_size=64",
         "model.num_heads=2", "model.num_kv_heads=2"]
N = 6
GREEDY = DecodeConfig(max_new_tokens=N, ignore_eos=True)


def test_prompt_lengths_5_and_9_share_one_program_for_every_method(small_lm):
    cfg, model, params = small_lm
    heads = init_medusa_heads(cfg.model, params, Medusa(paths=((0,), (0, 0))).num_heads)
    runs = {
        "greedy": ({}, {}), "sample": ({}, {}), "ngram": ({"speculative__gamma": 2}, {}),
        "speculative": ({}, {"drafter": DraftModel(cfg.model, 2), "draft_params": (params, None)}),
        "medusa": ({}, {"drafter": Medusa(paths=((0,), (0, 0))), "draft_params": heads}),
        "superposed": ({"superposed__alpha": 0.0}, {}),
        "lud": ({}, {"lud": LudConfig(lookahead=1)}),
    }
    for name, (fields, resources) in runs.items():
        config = with_fields(dataclasses.replace(GREEDY, method=name), **fields)
        generate(model, params, [[1, 2, 3, 4, 5]], config, **resources)
        before = driver.COMPILES["count"]
        res = generate(model, params, [[1, 2, 3, 4, 5, 6, 7, 8, 9]], config, **resources)
        assert driver.COMPILES["count"] == before, f"{name} recompiled for a new prompt length"
        assert len(res.token_ids[0]) == N and res.stats["method"] == name


def _peft(method):
    from cadenza.train import peft

    cfg = load_config(None, SMALL + [f"peft.method={method}", "peft.num_virtual_tokens=3"],
                      preset="tiny")
    params = init_params(cfg.model, jax.random.key(0))
    pm, trainable, frozen = peft.prepare(cfg, params, jax.random.key(1))
    return cfg, pm, trainable, frozen


def _cache_free_greedy(pm, trainable, frozen, prompt, n):
    """Greedy by full recomputation without a cache (right-padded to one width: causal
    attention makes the padding invisible to the position read)."""
    fn = jax.jit(lambda t, f, x, i: pm.apply(t, f, x)[0][0, i])
    seq = list(prompt)
    for _ in range(n):
        padded = jnp.asarray([seq + [0] * (len(prompt) + n - len(seq))])
        seq.append(int(jnp.argmax(fn(trainable, frozen, padded, len(seq) - 1))))
    return seq[len(prompt):]


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_token_adapters_decode_like_the_cache_free_model(method, tmp_path, capsys):
    import json

    from cadenza.cli import main
    from cadenza.models import save_model
    from cadenza.train.peft.artifacts import save_adapters

    cfg, pm, trainable, frozen = _peft(method)
    prompts = [[1, 7, 7, 9, 7, 7], [1, 40]]
    want = [_cache_free_greedy(pm, trainable, frozen, p, N) for p in prompts]
    res = generate(pm, (trainable, frozen), prompts, GREEDY)
    assert res.token_ids == want
    ngram = generate(pm, (trainable, frozen), prompts,
                     dataclasses.replace(GREEDY, method="ngram"))
    assert ngram.token_ids == want
    base = dataclasses.replace(cfg, peft=dataclasses.replace(cfg.peft, method="none"))
    model_dir = save_model(tmp_path / "m", base, frozen["params"])
    adapter_dir = save_adapters(tmp_path / "a", cfg, trainable)
    assert main(["generate", "--checkpoint", str(model_dir), "--adapter", str(adapter_dir),
                 "--json", "--ignore-eos", "--max-new-tokens", str(N),
                 "--prompt-ids", "1,7,7,9,7,7"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == want[0]


def test_superposed_and_lud_on_a_three_axis_mesh_equal_one_device(small_lm):
    from cadenza.models import param_shardings
    from cadenza.train.config import MeshConfig
    from cadenza.train.mesh import make_mesh

    cfg, model, params = small_lm
    mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=2)
    mesh = make_mesh(mesh_cfg, devices=jax.devices()[:8])
    rules = mesh_cfg.rules()
    sharded = jax.device_put(params, param_shardings(model.config, mesh, rules))
    prompts = [[1, 5, 9], [1, 30, 31, 32, 33], [1, 2], [1, 70, 71, 72]]
    for config, res in ((dataclasses.replace(GREEDY, method="superposed",
                                             superposed=SuperposedConfig(alpha=0.0)), {}),
                        (dataclasses.replace(GREEDY, method="lud"), {"lud": LudConfig()})):
        one = generate(model, params, prompts, config, **res)
        many = generate(model, sharded, prompts, config, mesh=mesh, rules=rules, **res)
        assert many.token_ids == one.token_ids
        for k in one.extras:
            if k != "drafts":
                np.testing.assert_allclose(np.asarray(many.extras[k], np.float64),
                                           np.asarray(one.extras[k], np.float64), rtol=1e-3)


@dataclasses.dataclass(frozen=True)
class CountingForward:
    """A forward that counts its calls while being traced (a stand-in for the model)."""

    inner: object
    calls: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    @property
    def config(self):
        return self.inner.config

    def init_cache(self, params, batch, max_len):
        return self.inner.init_cache(params, batch, max_len)

    def embed(self, params, tokens):
        return self.inner.embed(params, tokens)

    def __call__(self, params, tokens=None, **kw):
        self.calls.append(tokens.shape)
        return self.inner(params, tokens, **kw)


def test_medusa_prefill_runs_the_target_once(small_lm):
    from cadenza.decode.forward import ModelForward
    from cadenza.decode.speculative import speculative_method

    cfg, model, params = small_lm
    counting = CountingForward(ModelForward(cfg.model))
    medusa = Medusa(paths=((0,), (1,), (0, 0)))
    heads = init_medusa_heads(cfg.model, params, medusa.num_heads)
    method = speculative_method(counting, medusa, GREEDY, heads)
    batch = driver.prepare(method, [[1, 2, 3]], GREEDY).batch
    jax.eval_shape(method.prefill, (params, heads), batch)
    assert len(counting.calls) == 1
    # zero-init heads with the LM head copied: greedy output still equals plain greedy
    res = speculative_generate(model, params, [[1, 2, 3]], GREEDY, drafter=medusa,
                               draft_params=heads)
    assert res.token_ids == generate(model, params, [[1, 2, 3]], GREEDY).token_ids


@dataclasses.dataclass(frozen=True)
class RepeatLast:
    """A drafter defined outside cadenza: propose the pending token twice (a chain of 2)."""

    name: str = "repeat-last"
    parents: tuple = (-1, 0)

    def check(self, forward, draft_params):
        pass

    def cost_ratio(self, params, draft_params):
        return 0.0

    def init(self, draft_params, pre):
        return jnp.zeros((), jnp.int32)            # counts rounds, via observe

    def propose(self, draft_params, state, ctx):
        tokens = jnp.stack([ctx.pending, ctx.pending], axis=1)
        return Proposal(tokens=tokens, valid=jnp.ones(tokens.shape, bool), q=None,
                        parents=self.parents), state

    def observe(self, draft_params, state, obs):
        return state + 1


def test_a_drafter_written_in_a_test_file_is_verified_and_emitted(small_lm):
    cfg, model, params = small_lm
    prompts = [[1, 9, 9, 9], [1, 3]]
    res = speculative_generate(model, params, prompts, GREEDY, drafter=RepeatLast())
    assert res.token_ids == generate(model, params, prompts, GREEDY).token_ids
    s = res.stats
    assert s["method"] == "repeat-last" and len(s["acceptance_per_position"]) == 2
    assert s["target_forwards"] <= 2 * (N - 1)


def test_non_finite_logits_stop_the_row_with_an_error(small_lm, tmp_path, capsys):
    import json

    from cadenza.cli import main
    from cadenza.models import save_model

    cfg, model, params = small_lm
    emb = params["embed"]["embedding"]
    broken = {**params, "embed": {"embedding": emb.at[7].set(jnp.nan)}}
    prompts = [[1, 5], [1, 7]]                    # row 1 reads the NaN row
    res = generate(model, broken, prompts, GREEDY)
    assert res.finish_reasons == ["length", "error"] and res.token_ids[1] == []
    assert res.token_ids[0] == generate(model, params, prompts[:1], GREEDY).token_ids[0]
    assert "row 1" in res.stats["errors"][0]
    d = save_model(tmp_path / "m", cfg, broken)
    assert main(["generate", "--checkpoint", str(d), "--json", "--ignore-eos",
                 "--max-new-tokens", "2", "--prompt-ids", "1,7"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["finish_reason"] == "error" and "NaN" in out.err
