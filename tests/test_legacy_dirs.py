"""Model directories written by older cadenza versions still load: the flat ``decode``
section (before the per-method sections) and no completeness marker (before atomic
outputs, when orbax committed the params)."""

import jax
import numpy as np
import yaml

from cadenza.config import load_config
from cadenza.decode.config import upgrade_legacy_decode
from cadenza.models import init_params, load_model, save_model
from cadenza.outputs import MARKER


def test_flat_decode_fields_move_into_their_sections():
    old = {"method": "sample", "temperature": 0.7, "top_k": 5, "speculative": "draft",
           "draft": "d/", "gamma": 6, "heads": "h/", "proxy_alpha": 0.5, "seed": 3}
    new, moved = upgrade_legacy_decode(old)
    assert new == {"method": "speculative", "seed": 3,
                   "sampling": {"temperature": 0.7, "top_k": 5},
                   "speculative": {"draft": "d/", "gamma": 6, "sample": True},
                   "medusa": {"heads": "h/"}, "proxy": {"alpha": 0.5}}
    assert set(moved) == {"temperature", "top_k", "speculative", "draft", "gamma", "heads",
                          "proxy_alpha"}
    today = {"method": "ngram", "speculative": {"gamma": 2}}
    assert upgrade_legacy_decode(today) == (today, [])
    assert upgrade_legacy_decode({"speculative": "none", "method": "greedy"})[0] == {
        "method": "greedy"}


def test_a_directory_from_an_older_version_loads(tmp_path):
    config = load_config(None, ["model.num_layers=1", "model.hidden_size=32",
                                "model.intermediate_size=64", "model.num_heads=2",
                                "model.num_kv_heads=1"], preset="tiny")
    params = init_params(config.model, jax.random.key(0))
    d = save_model(tmp_path / "m", config, params, params_format="orbax")  # as they stored
    (d / MARKER).unlink()  # older versions wrote none
    data = yaml.safe_load((d / "config.yaml").read_text())
    data["decode"] = {"method": "greedy", "max_new_tokens": 7, "temperature": 0.9,
                      "speculative": "none", "gamma": 4}
    (d / "config.yaml").write_text(yaml.safe_dump(data))
    loaded, got = load_model(d)
    assert loaded.decode.max_new_tokens == 7 and loaded.decode.sampling.temperature == 0.9
    np.testing.assert_array_equal(got["embed"]["embedding"], params["embed"]["embedding"])
