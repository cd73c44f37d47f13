"""Model merging: method references, DARE statistics, mesh equality, inputs and the CLI."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cadenza.cli import main
from cadenza.config import load_config
from cadenza.errors import CadenzaError, ConfigError
from cadenza.models import init_params, load_model, save_model
from cadenza.train.merge import MergeSpec, dare, merge_params

SHAPES = {"embed": (12, 8), "layers": {"kernel": (3, 8, 6), "scale": (3, 6)}, "out": (5,)}


def _tree(seed, scale=1.0, base=None):
    """A small random float32 param tree (a scanned ``layers`` leaf among them), or
    ``base`` plus a random delta of ``scale`` (NumPy: nothing to compile)."""
    rng = np.random.default_rng(seed)
    noise = jax.tree.map(lambda s: scale * rng.standard_normal(s, np.float32), SHAPES,
                         is_leaf=lambda x: isinstance(x, tuple))
    return noise if base is None else jax.tree.map(np.add, base, noise)


def _np_top(tau, keep, drop=0.0):
    """NumPy reference of the magnitude band mask."""
    order = np.sort(np.abs(tau).ravel())[::-1]
    k, d = round(keep * tau.size), round(drop * tau.size)
    mask = np.abs(tau) >= order[k - 1] if k else np.zeros(tau.shape, bool)
    return mask & (np.abs(tau) < order[d - 1]) if d else mask


def _np_merge(method, base, models, w, lam, density=0.2, top=0.01, bottom=0.9):
    """NumPy reference of TIES and Breadcrumbs on one leaf."""
    b = np.asarray(base, np.float64)
    taus = [np.asarray(m, np.float64) - b for m in models]
    if method == "breadcrumbs":
        taus = [np.where(_np_top(t, 1 - bottom, top), t, 0) for t in taus]
        return b + lam * sum(wi * t for wi, t in zip(w, taus))
    taus = [np.where(_np_top(t, density), t, 0) for t in taus]
    sign = np.sign(sum(wi * t for wi, t in zip(w, taus)))
    num, den = np.zeros_like(b), np.zeros_like(b)
    for wi, t in zip(w, taus):
        agree = (np.sign(t) == sign) & (t != 0)
        num += np.where(agree, wi * t, 0)
        den += np.where(agree, wi, 0)
    return b + lam * np.where(den > 0, num / np.where(den > 0, den, 1), 0)


def _close(a, b, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.mark.parametrize("spec", [MergeSpec("linear"), MergeSpec("task_arithmetic"),
                                  MergeSpec("dare_linear", drop_rate=0.0),
                                  MergeSpec("wise_ft", alpha=1)])
def test_one_model_at_lambda_one_is_unchanged(spec):
    base = _tree(0)
    ft = _tree(1, 0.1, base)
    merged, _ = merge_params(spec, base, [ft])
    _close(merged, ft)


def test_dare_identity_and_unbiased_rescale():
    tau = jnp.asarray(np.random.default_rng(3).standard_normal(64, np.float32))
    np.testing.assert_array_equal(dare(tau, jax.random.key(0), 0.0), tau)
    keys = jax.random.split(jax.random.key(1), 4000)
    for p, rescale, expect in [(0.9, None, 1.0), (0.5, 1.5, 0.75)]:
        samples = jax.vmap(lambda k: dare(tau, k, p, rescale))(keys)
        sigma = np.abs(tau) * (rescale or 1 / (1 - p)) * np.sqrt(p * (1 - p) / len(keys))
        err = np.abs(np.asarray(samples.mean(0)) - expect * np.asarray(tau))
        assert np.all(err <= 5 * sigma + 1e-7), (p, float((err / sigma).max()))
        kept = float((samples != 0).mean())
        assert abs(kept - (1 - p)) < 0.01


@pytest.mark.parametrize("method,kw", [("ties", {"density": 0.3, "lam": 0.8}),
                                       ("breadcrumbs", {"top": 0.05, "bottom": 0.5})])
def test_ties_and_breadcrumbs_match_numpy(method, kw):
    base = _tree(0)
    models = [_tree(s, 0.1, base) for s in (1, 2, 3)]
    w = (1.0, 0.5, 2.0)
    merged, _ = merge_params(MergeSpec(method, weights=w, **kw), base, models)
    lam = kw.pop("lam", 1.0)
    for got, b, *ms in zip(jax.tree.leaves(merged), jax.tree.leaves(base),
                           *map(jax.tree.leaves, models)):
        np.testing.assert_allclose(got, _np_merge(method, b, ms, w, lam, **kw), atol=1e-6)


def test_model_stock_identical_fine_tunes_and_ratio():
    base = _tree(0)
    ft = _tree(1, 0.1, base)
    merged, stats = merge_params(MergeSpec("model_stock"), base, [ft, ft])
    _close(merged, ft)
    assert np.allclose(stats["model_stock_t"]["['layers']['kernel']"], [1.0] * 3)
    other = _tree(2, 0.1, base)
    _, stats = merge_params(MergeSpec("model_stock"), base, [ft, other])
    t1, t2 = (x["embed"] - base["embed"] for x in (ft, other))
    cos = (t1 * t2).sum() / np.linalg.norm(t1) / np.linalg.norm(t2)
    np.testing.assert_allclose(stats["model_stock_t"]["['embed']"], 2 * cos / (1 + cos),
                               rtol=1e-4)
    assert len(stats["model_stock_t"]["['layers']['scale']"]) == 3  # one per layer


def test_merge_on_a_2x2x2_mesh_equals_one_device():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    specs = {"embed": P("data", "tensor"), "layers": {"kernel": P(None, "fsdp", "tensor"),
                                                      "scale": P(None, "tensor")}, "out": P()}
    shard = jax.tree.map(lambda p: NamedSharding(mesh, p), specs,
                         is_leaf=lambda x: isinstance(x, P))
    base = _tree(0)
    models = [_tree(s, 0.1, base) for s in (1, 2)]
    spec = MergeSpec("dare_ties", drop_rate=0.5)
    one, _ = merge_params(spec, base, models)
    many, _ = merge_params(spec, *[jax.device_put(t, shard) for t in [base]],
                           [jax.device_put(t, shard) for t in models])
    _close(many, one, atol=1e-6)
    for x, s in zip(jax.tree.leaves(many), jax.tree.leaves(shard)):
        assert x.sharding.is_equivalent_to(s, x.ndim)


def test_spec_refuses_unused_options_and_wrong_counts():
    with pytest.raises(ConfigError, match="does not use density"):
        MergeSpec("linear", density=0.5)
    with pytest.raises(ConfigError, match="merge.drop_rate"):
        MergeSpec("dare_ties", drop_rate=1.0)
    with pytest.raises(ConfigError, match="exactly one model"):
        MergeSpec("wise_ft").check_count(2)
    with pytest.raises(ConfigError, match="2 weights for 3 models"):
        MergeSpec("ties", weights=(1.0, 2.0)).check_count(3)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny base, two full fine-tunes, a LoRA adapter of the base, and a model of
    another architecture."""
    from cadenza.train import peft
    from cadenza.train.peft.artifacts import save_adapters

    root = tmp_path_factory.mktemp("merge")
    config = load_config(None, [], preset="tiny")
    base = init_params(config.model, jax.random.key(0))
    save_model(root / "base", config, base)
    for s in (1, 2):
        save_model(root / f"ft{s}", config, _tree_like(base, s))
    lora = load_config(None, ["peft.method=lora", "peft.rank=2"], preset="tiny")
    pm, trainable, _ = peft.prepare(lora, base, jax.random.key(1))
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)
    save_adapters(root / "lora", lora, trainable)
    other = dataclasses.replace(config, model=dataclasses.replace(config.model, num_heads=8))
    save_model(root / "wide", other, init_params(other.model, jax.random.key(0)))
    return root


def _tree_like(base, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(x) + 0.01 * rng.standard_normal(x.shape, np.float32),
                        base)


def test_mismatched_architecture_is_refused_naming_the_field(model_dirs, tmp_path):
    from cadenza.train.merge import merge_models

    with pytest.raises(CadenzaError, match=r"model\.num_heads: the base has 4, this input has 8"):
        merge_models(model_dirs / "base", [model_dirs / "ft1", model_dirs / "wide"],
                     tmp_path / "out", MergeSpec("linear"))
    assert not (tmp_path / "out").exists()


def test_cli_merges_models_and_adapters(model_dirs, tmp_path, capsys):
    out = tmp_path / "soup"
    args = ["convert", "merge", "--base", str(model_dirs / "base"), "--models",
            str(model_dirs / "ft1"), str(model_dirs / "lora"), "--method", "task_arithmetic",
            "--lambda", "0.5", "--weights", "1", "2", "--out", str(out)]
    assert main(args) == 0
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == "task_arithmetic" and record["lam"] == 0.5
    assert record["weights"] == [1.0, 2.0]
    assert [m["kind"] for m in record["models"]] == ["model", "adapter"]
    assert [p.name for p in out.parent.iterdir()] == ["soup"]  # no temporary left behind
    _, merged = load_model(out)
    _, ft1 = load_model(model_dirs / "ft1")
    assert jax.tree.structure(merged) == jax.tree.structure(ft1)
    capsys.readouterr()
    bad = [(["--method", "linear", "--density", "0.3"], "does not use density"),
           (["--method", "wise_ft"], "exactly one model"),
           (["--method", "nope"], "merge.method"),
           (["--method", "linear", "--out", str(out)], "already exists")]
    for extra, message in bad:
        argv = ["convert", "merge", "--base", str(model_dirs / "base"), "--models",
                str(model_dirs / "ft1"), str(model_dirs / "ft2"), "--out",
                str(tmp_path / "x"), *extra]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["convert", "merge", "--base", str(model_dirs / "ft1"), "--models",
                 str(tmp_path / "missing"), "--method", "linear", "--out",
                 str(tmp_path / "y")]) == 2
    assert "missing: no such directory" in capsys.readouterr().err


def test_hf_folders_as_base_and_models(model_dirs, tmp_path):
    from cadenza.models.hf_export import save_hf

    hf_base = save_hf(model_dirs / "base", tmp_path / "hf_base")
    hf_ft = save_hf(model_dirs / "ft1", tmp_path / "hf_ft1")
    assert main(["convert", "merge", "--base", str(hf_base), "--models", str(hf_ft),
                 str(model_dirs / "ft2"), "--method", "linear", "--out",
                 str(tmp_path / "from_hf")]) == 0
    record = json.loads((tmp_path / "from_hf" / "merge.json").read_text())
    assert [m["kind"] for m in record["models"]] == ["hf", "model"]
    trees = [load_model(model_dirs / name)[1] for name in ("base", "ft1", "ft2")]
    _close(load_model(tmp_path / "from_hf")[1],
           merge_params(MergeSpec("linear"), trees[0], trees[1:])[0])


def test_bitdelta_signs_scales_reconstruction_and_size(model_dirs, tmp_path, capsys):
    from cadenza.train.bitdelta import compress, reconstruct

    _, base = load_model(model_dirs / "base")
    _, ft = load_model(model_dirs / "ft1")
    parts = compress(base, ft)
    want = {}
    for kp, b in jax.tree_util.tree_flatten_with_path(base)[0]:
        path = jax.tree_util.keystr(kp)
        f = np.asarray(_get(ft, kp))
        delta = f - np.asarray(b)
        if path.startswith("['layers']") and b.ndim >= 3:
            scale = np.abs(delta).reshape(len(delta), -1).mean(-1)   # mean |delta| per matrix
            np.testing.assert_allclose(parts[path]["scales"], scale, rtol=1e-6)
            sign = np.where(delta >= 0, 1.0, -1.0)
            want[path] = np.asarray(b) + scale.reshape(-1, *[1] * (b.ndim - 1)) * sign
        else:
            assert set(parts[path]) == {"value"}                     # stored exactly
            want[path] = f
    assert sum("signs" in p for p in parts.values()) == 7
    rebuilt = reconstruct(base, parts)
    for kp, leaf in jax.tree_util.tree_flatten_with_path(rebuilt)[0]:
        np.testing.assert_allclose(leaf, want[jax.tree_util.keystr(kp)], atol=1e-6)
    out = tmp_path / "delta"
    assert main(["convert", "bitdelta", "--base", str(model_dirs / "base"), "--model",
                 str(model_dirs / "ft1"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    stored = json.loads((out / "bitdelta.json").read_text())["bytes"]
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(ft))
    assert f"{stored:,} bytes for a {model_bytes:,}-byte model" in printed
    assert stored < model_bytes / 2
    assert main(["convert", "merge", "--base", str(model_dirs / "base"), "--models", str(out),
                 "--method", "linear", "--out", str(tmp_path / "back")]) == 0
    _close(load_model(tmp_path / "back")[1], rebuilt)
    # Applied to another base of the same architecture: refused, naming both bases.
    assert main(["convert", "merge", "--base", str(model_dirs / "ft2"), "--models", str(out),
                 "--method", "linear", "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "made from the base" in err, err
    assert f"{model_dirs / 'base'} (fingerprint" in err and f"{model_dirs / 'ft2'} (" in err
    assert not (tmp_path / "other").exists()
    assert main(["convert", "bitdelta", "--base", str(model_dirs / "base"), "--model",
                 str(model_dirs / "wide"), "--out", str(tmp_path / "x")]) == 2
    assert "model.num_heads" in capsys.readouterr().err


def _get(tree, keypath):
    for k in keypath:
        tree = tree[k.key]
    return tree
