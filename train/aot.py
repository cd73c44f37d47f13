"""Ahead-of-time compilation for a TPU slice from any machine, and the memory verdict.

:func:`compile_for_slice` lowers and compiles an experiment's sharded train
step (and optionally a one-token decode step) against a slice's abstract
devices (``jax.experimental.topologies``; needs the ``tpu`` extra, no TPU),
then reads XLA's per-chip memory analysis and cost analysis. Nothing is
allocated: params, optimizer state, batch and cache are
``jax.ShapeDtypeStruct`` s carrying their shardings.
"""

import dataclasses
import math
import re

from cadenza.train.topology import GIB, TpuSlice


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What one compiled step needs on each chip of ``slice_name``.

    Bytes are per chip. ``alias_bytes`` are outputs written into donated
    arguments, counted once: ``total = arguments + outputs - alias + temporaries
    + generated code``. ``analytic_flops`` is the global (4*N + 2*N_trainable)*tokens
    (training; 2*N*tokens for decode) estimate, N the active params (a mixture of
    experts counts the chosen experts only). ``flops_per_chip`` comes from the compiled
    (partitioned) program's cost analysis, which counts a while-loop body once:
    with ``scan_layers`` (and microbatches) it is far below the real count
    (measured: 1/25 of 6*N*tokens for Llama-3.1-8B, 32 scanned layers, 2
    microbatches); it matches only for unscanned, unaccumulated steps.

    When XLA stops compiling at its out-of-memory check (``compiled=False``),
    arguments and outputs come from the shardings, temporaries from XLA's
    message, and code and FLOPs are unknown (0); the total is then a lower
    bound: arguments + temporaries (outputs may reuse donated arguments).
    """

    step: str
    slice_name: str
    topology: str
    chips: int
    hbm_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops_per_chip: float
    analytic_flops: float
    tokens: int
    compiled: bool = True
    xla_message: str = ""

    @property
    def total_bytes(self) -> int:
        if not self.compiled:
            return self.argument_bytes + self.temp_bytes
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)

    @property
    def fits(self) -> bool:
        return self.compiled and self.total_bytes <= self.hbm_bytes

    def verdict(self) -> str:
        """One line: ``FITS: ...`` or ``DOES NOT FIT: ... need X GiB, have Y GiB``."""
        need, have = self.total_bytes / GIB, self.hbm_bytes / GIB
        where = f"{self.step} step on {self.slice_name} ({self.topology}, {self.chips} chips)"
        if self.fits:
            return (f"FITS: {where} needs {need:.2f} GiB of {have:.0f} GiB HBM per chip "
                    f"({100 * need / have:.0f}%)")
        at_least = "" if self.compiled else "at least "
        return (f"DOES NOT FIT: {where} need {at_least}{need:.2f} GiB, have {have:.0f} GiB "
                f"HBM per chip (over by {at_least}{need - have:.2f} GiB)")

    def format(self) -> str:
        """A small table of the numbers followed by the verdict line."""
        def gib(n):
            return f"{n / GIB:10.3f} GiB"

        lines = [f"{self.step} step, {self.slice_name} ({self.topology}, {self.chips} chips), "
                 "memory per chip:",
                 f"  arguments    {gib(self.argument_bytes)}",
                 f"  outputs      {gib(self.output_bytes)}"
                 + (f"  ({gib(self.alias_bytes).strip()} aliased to donated arguments)"
                    if self.compiled else ""),
                 f"  temporaries  {gib(self.temp_bytes)}"]
        if self.compiled:
            lines += [
                f"  code         {gib(self.code_bytes)}",
                f"  total        {gib(self.total_bytes)}  of {self.hbm_bytes / GIB:.0f} GiB HBM",
                f"FLOPs per step: analytic {self.analytic_flops:.3e} for {self.tokens} tokens; "
                f"XLA cost analysis {self.flops_per_chip:.3e} per chip, "
                f"{self.flops_per_chip * self.chips:.3e} total (counts each loop body once: "
                "low for scanned layers or microbatches)"]
        else:
            lines += [f"  XLA stopped at its memory check: {self.xla_message}",
                      f"FLOPs per step: analytic {self.analytic_flops:.3e} for {self.tokens} "
                      "tokens (XLA cost analysis needs a finished compile)"]
        return "\n".join(lines + [self.verdict()])


@dataclasses.dataclass(frozen=True)
class LoweredStep:
    """A lowered step with its abstract arguments (ShapeDtypeStructs carrying shardings)."""

    name: str
    lowered: object
    args: tuple
    analytic_flops: float
    tokens: int


def _per_chip_bytes(tree) -> int:
    """Bytes one device holds of abstract arrays with shardings (largest shard)."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None \
            else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": GIB, "T": 1024**4}
# XLA TPU's compile-time OOM messages (libtpu 0.0.50): "... required for HLO
# temporaries (24.25G) exceeds available HBM (15.75G)", "Requires 20.1G, has 15.7G".
_OOM_PATTERNS = (
    re.compile(r"temporaries \(([\d.]+)([KMGT]?)i?B?\) exceeds available HBM"),
    re.compile(r"Requires ([\d.]+)([KMGT]?)i?B?, has"),
)


def _temporaries_from_oom(message: str) -> int | None:
    for pattern in _OOM_PATTERNS:
        if m := pattern.search(message):
            return int(float(m.group(1)) * _UNITS[m.group(2)])
    return None


def compile_report(step: LoweredStep, tpu_slice: TpuSlice) -> CompileReport:
    """Compile ``step`` and read XLA's memory and cost analyses into a report.

    A compile that XLA rejects as out of HBM becomes a not-fitting report
    (see :class:`CompileReport`); other compile errors propagate.
    """
    import jax

    common = dict(step=step.name, slice_name=tpu_slice.name, topology=tpu_slice.topology,
                  chips=tpu_slice.chips, hbm_bytes=tpu_slice.hbm_bytes,
                  analytic_flops=float(step.analytic_flops), tokens=int(step.tokens))
    try:
        compiled = step.lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        temps = _temporaries_from_oom(str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or temps is None:
            raise
        return CompileReport(
            **common, argument_bytes=_per_chip_bytes(step.args),
            output_bytes=_per_chip_bytes(step.lowered.out_info), alias_bytes=0,
            temp_bytes=temps, code_bytes=0, flops_per_chip=0.0, compiled=False,
            xla_message=str(e).splitlines()[0])
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per program
        cost = cost[0] if cost else {}
    return CompileReport(
        **common, argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes), code_bytes=int(mem.generated_code_size_in_bytes),
        flops_per_chip=float((cost or {}).get("flops", 0.0)))


def _abstract(tree, shardings):
    import jax

    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


def lower_train_step(config, mesh, task=None):
    """Lower ``config``'s real training step (:func:`cadenza.train.step.make_train_step`:
    optimizer update, microbatches, donated state) on ``mesh``.

    Arguments are abstract: the train state (trainable params, optimizer state,
    step, rng) and the frozen tree with their shardings, and a
    ``[train.batch_size, train.seq_len]`` batch with the batch sharding. ``task``
    defaults to what ``fit`` trains (full training, or PEFT over an abstract base:
    nothing is read from ``train.init_from``). Returns a :class:`LoweredStep`; the analytic
    FLOPs are (4 * all params + 2 * trainable params) * tokens: the forward and the
    activation gradients run through every weight, weight gradients only for trainable
    ones (6 * N * tokens for full training).
    """
    import jax
    import jax.numpy as jnp

    from cadenza.train.mesh import batch_sharding, replicated, validate_sharding
    from cadenza.train.optim import make_optimizer, make_schedule
    from cadenza.train.state import abstract_state, state_shardings
    from cadenza.train.step import BATCH_KEYS, make_train_step
    from cadenza.train.trainer import default_task, loss_shaping_options

    train = config.train
    validate_sharding(config, mesh.devices.size)
    rules = config.mesh.rules()
    task = task or default_task(config)
    optimizer, schedule = make_optimizer(train), make_schedule(train)
    shardings = state_shardings(task, optimizer, mesh, rules)
    state = abstract_state(task, optimizer, shardings)
    frozen = task.abstract_frozen(mesh, rules)
    rows = batch_sharding(mesh, rules)
    b, t = train.batch_size, train.seq_len
    batch = {k: jax.ShapeDtypeStruct((b, t), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=rows) for k in BATCH_KEYS}
    step = make_train_step(task, optimizer, schedule, microbatches=train.microbatches,
                           z_loss=train.z_loss, rules=rules, state_shardings=shardings,
                           frozen_shardings=jax.tree.map(lambda a: a.sharding, frozen),
                           batch_sharding=rows, metric_sharding=replicated(mesh),
                           **loss_shaping_options(config))
    with jax.set_mesh(mesh):
        lowered = step.lower(state, frozen, batch)
    # A token uses only its experts: count active params (equal to all for dense models).
    active = config.model.num_active_params()
    trainable = active if task.trainable_params == task.total_params else task.trainable_params
    return LoweredStep("train", lowered, (state, frozen, batch),
                       (4 * active + 2 * trainable) * b * t, b * t)


def lower_decode_step(config, mesh, batch: int, max_len: int):
    """Lower one decode step: ``batch`` new tokens against a ``max_len`` KV cache (donated).

    Returns a :class:`LoweredStep`.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from cadenza.models import KVCache, Transformer, abstract_params, param_shardings
    from cadenza.train.mesh import batch_sharding

    rules = config.mesh.rules()
    model = Transformer(config.model)
    params = _abstract(abstract_params(config.model),
                       param_shardings(config.model, mesh, rules))
    cache = jax.eval_shape(lambda: KVCache.create(config.model, batch, max_len))
    kv = nn.logical_to_mesh_sharding(
        P("layers", "batch", "cache_length", "kv_heads", "head_dim"), mesh, rules)
    row = nn.logical_to_mesh_sharding(P("batch", "cache_length"), mesh, rules)
    lengths = nn.logical_to_mesh_sharding(P("batch"), mesh, rules)
    cache = _abstract(cache, KVCache(k=kv, v=kv, positions=row, lengths=lengths))
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=batch_sharding(mesh, rules))

    def decode_step(params, tokens, cache):
        with nn.logical_axis_rules(rules):
            logits, _, cache = model.apply({"params": params}, tokens, cache=cache)
        return jnp.argmax(logits[:, -1], axis=-1), cache.advance(1)

    with jax.set_mesh(mesh):
        lowered = jax.jit(decode_step, donate_argnums=(2,)).lower(params, tokens, cache)
    return LoweredStep("decode", lowered, (params, tokens, cache),
                       2 * config.model.num_active_params() * batch, batch)


def compile_for_slice(config, tpu_slice: TpuSlice, *, decode: bool = False,
                      decode_batch: int | None = None) -> list[CompileReport]:
    """AOT-compile ``config``'s steps for ``tpu_slice`` and report per-chip memory and FLOPs.

    The mesh comes from ``config.mesh`` over the slice's chips (one JAX device
    per chip); divisibility problems raise ConfigError before compiling. With
    ``decode``, a one-token decode step (batch ``decode_batch``, default
    ``train.batch_size``; cache ``train.seq_len + decode.max_new_tokens``) is
    compiled too. Returns one :class:`CompileReport` per step.
    """
    from cadenza.train.mesh import make_mesh

    mesh = make_mesh(config.mesh, devices=tpu_slice.devices())
    reports = [compile_report(lower_train_step(config, mesh), tpu_slice)]
    if decode:
        batch = decode_batch or config.train.batch_size
        max_len = config.train.seq_len + config.decode.max_new_tokens
        reports.append(compile_report(lower_decode_step(config, mesh, batch, max_len),
                                      tpu_slice))
    return reports
