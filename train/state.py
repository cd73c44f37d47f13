"""The train state pytree and its explicit shardings on a mesh."""

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from cadenza.train.mesh import replicated
from cadenza.train.task import TrainTask


@flax.struct.dataclass
class TrainState:
    """Everything a step updates (donated to the jitted step, saved in checkpoints).

    ``step``: int32 scalar, updates done so far. ``params``: the trainable tree
    (fp32 master weights when ``model.param_dtype`` is float32). ``opt_state``:
    the optimizer state of ``params`` only. ``rng``: uint32 raw key data
    (``jax.random.key_data``), split once per step.
    """

    step: jax.Array
    params: object
    opt_state: object
    rng: jax.Array


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_params,
                        param_shardings, mesh: Mesh):
    """Shardings of ``optimizer.init(params)``: each state leaf shaped like its param (Adam
    moments, momentum) takes that param's sharding; other leaves (counts, Adafactor's
    factored row/column statistics) are replicated.

    (A plain ``jit(optimizer.init)`` would place the moments on one device.)
    """
    abstract_state = jax.eval_shape(optimizer.init, abstract_params)
    rep = replicated(mesh)

    def pick(leaf, param, sharding):
        return sharding if leaf.shape == param.shape else rep

    return optax.tree_map_params(optimizer, pick, abstract_state, abstract_params,
                                 param_shardings, transform_non_params=lambda _: rep)


def state_shardings(task: TrainTask, optimizer, mesh: Mesh, rules) -> TrainState:
    """A :class:`TrainState` of ``NamedSharding`` s for ``task`` on ``mesh``."""
    params = task.trainable_shardings(mesh, rules)
    rep = replicated(mesh)
    return TrainState(step=rep, params=params,
                      opt_state=opt_state_shardings(optimizer, task.abstract_trainable(),
                                                    params, mesh),
                      rng=rep)


def abstract_state(task: TrainTask, optimizer, shardings: TrainState) -> TrainState:
    """``jax.ShapeDtypeStruct`` s (with shardings) of the state: the restore target."""
    params = task.abstract_trainable()
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        opt_state=jax.eval_shape(optimizer.init, params),
                        rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, shardings)


def init_state(task: TrainTask, optimizer, seed: int, mesh: Mesh, rules,
               shardings: TrainState) -> TrainState:
    """A fresh state: params from ``task.init_trainable``, optimizer state created
    directly in its shards (``jit`` with ``out_shardings``), step 0."""
    params_rng = jax.random.split(jax.random.key(seed))[0]
    params = task.init_trainable(params_rng, mesh, rules)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)

    # Made by a jit, not device_put from the host: with several processes device_put
    # checks that every process holds the same value (one cross-host gather per leaf).
    def step_and_rng():
        return (jnp.zeros((), jnp.int32),
                jax.random.key_data(jax.random.split(jax.random.key(seed))[1]))

    step, rng = jax.jit(step_and_rng, out_shardings=(shardings.step, shardings.rng))()
    return TrainState(step=step, params=params, opt_state=opt_state, rng=rng)

