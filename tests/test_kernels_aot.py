"""Every TPU kernel, inside the sharded model, AOT-compiles for real TPU topologies.

Needs libtpu (``uv sync --extra tpu``; ``make test`` installs it), not a TPU:
``jax.experimental.topologies`` describes the chips and XLA:TPU + Mosaic
compile for them on this CPU host.
"""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cadenza.models import KVCache, Transformer, init_params
from cadenza.pallas_kernels import attention as dispatch
from cadenza.train.config import MeshConfig

TOPOLOGIES = {
    # name: (topology, chip config, chips per host, mesh data/fsdp/tensor)
    "v5e": ("v5e:2x2", "default", (2, 2, 1), (2, 1, 2)),
    "v5p": ("v5p:2x2x2", "megacore", (2, 2, 1), (2, 2, 2)),
}


# The session's persistent compilation cache stores these TPU executables but cannot load
# them back without a TPU client; jax then just compiles again (and warns).
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry")
@pytest.mark.parametrize("chip", sorted(TOPOLOGIES))
def test_sharded_train_verify_prefill_compile_for_tpu(chip, tiny_config, caplog):
    name, chip_config, per_host, (data, fsdp, tensor) = TOPOLOGIES[chip]
    topo = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                        chip_config_name=chip_config,
                                        chips_per_host_bounds=per_host, num_slices=1)
    mesh = Mesh(np.array(topo.devices).reshape(data, fsdp, tensor, 1),
                ("data", "fsdp", "tensor", "sequence"))
    rules = MeshConfig(data=data, fsdp=fsdp, tensor=tensor).rules()
    cfg = tiny_config("gemma2", "model.head_dim=128", "model.attention_impl=pallas",
                      "model.dtype=bfloat16", "model.num_kv_heads=2")
    model = Transformer(cfg)
    b, t, max_len = 8, 256, 1024

    def sds(x, spec=PartitionSpec()):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    params = jax.tree.map(sds, jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
    rows = PartitionSpec(("data", "fsdp"))
    tokens = sds(jax.ShapeDtypeStruct((b, t), jnp.int32), rows)

    def train_step(p, tok, seg):
        def loss(p):
            with nn.logical_axis_rules(rules):
                logits = model.apply({"params": p}, tok, segment_ids=seg)[0]
            return jnp.mean(jax.nn.log_softmax(logits)[..., 3])
        return jax.value_and_grad(loss)(p)

    cache = jax.eval_shape(lambda: KVCache.create(cfg, b, max_len))
    cache_spec = KVCache(k=PartitionSpec(None, ("data", "fsdp"), None, "tensor"),
                         v=PartitionSpec(None, ("data", "fsdp"), None, "tensor"),
                         positions=rows, lengths=rows)
    cache = jax.tree.map(sds, cache, cache_spec)
    scale_spec = PartitionSpec(None, ("data", "fsdp"), None, "tensor")
    cache8 = jax.tree.map(sds, jax.eval_shape(lambda: KVCache.create(cfg, b, max_len, "int8")),
                          cache_spec.replace(k_scale=scale_spec, v_scale=scale_spec))
    new = sds(jax.ShapeDtypeStruct((b, 4), jnp.int32), rows)
    tree = sds(jax.ShapeDtypeStruct((4, 4), jnp.bool_))

    def verify_step(p, tok, c, mask):
        with nn.logical_axis_rules(rules):
            return model.apply({"params": p}, tok, attention_mask=mask, cache=c)[0]

    def prefill_step(q, kv, c):   # a long causal chunk into a cache: cache kernel + splash
        with nn.logical_axis_rules(rules):
            return dispatch.attention(
                q, kv, kv, implementation="pallas", scale=0.1,
                q_positions=c.lengths[:, None] + jnp.arange(t), k_cache=c.k[0], v_cache=c.v[0],
                cache_lengths=c.lengths, cache_positions=c.positions, window=0)

    hd = cfg.resolved_head_dim
    chunk_q = sds(jax.ShapeDtypeStruct((b, t, cfg.num_heads, hd), jnp.bfloat16),
                  PartitionSpec(("data", "fsdp"), None, "tensor"))
    chunk_kv = sds(jax.ShapeDtypeStruct((b, t, cfg.num_kv_heads, hd), jnp.bfloat16),
                   PartitionSpec(("data", "fsdp"), None, "tensor"))
    dispatch._logged.clear()
    caplog.set_level(logging.WARNING, logger=dispatch.__name__)
    caplog.clear()
    with jax.set_mesh(mesh):
        train = jax.jit(train_step).lower(params, tokens, tokens).compile()
        verify = jax.jit(verify_step).lower(params, new, cache, tree).compile()
        verify8 = jax.jit(verify_step).lower(params, new, cache8, tree).compile()  # int8 tiles
        prefill = jax.jit(prefill_step).lower(chunk_q, chunk_kv, cache).compile()
    assert not caplog.records, [r.getMessage() for r in caplog.records]   # kernels, not XLA
    for compiled, kernels in ((train, ["splash"]), (verify, ["cadenza_cache_attention"]),
                              (verify8, ["cadenza_cache_attention"]),
                              (prefill, ["cadenza_cache_attention", "splash"])):
        assert all(kernel in compiled.as_text() for kernel in kernels)
        assert compiled.memory_analysis().argument_size_in_bytes > 0
