"""PEFT as a :class:`~cadenza.train.task.TrainTask`: adapters trainable, the base frozen.

``fit`` uses this whenever ``peft.method`` is not ``none``. The base model
comes from ``train.init_from`` (a model directory), is loaded once straight
into its shards and frozen (QLoRA: quantised); only the adapter tree is
differentiated and has optimizer state. At the end of a run the adapters are
written to ``<output_dir>/adapters`` and, for methods that fold into the
weights (LoRA, LoRA+, DoRA, QLoRA, (IA)3), the merged model to ``model/``.
"""

from cadenza.errors import ConfigError
from cadenza.train.task import TrainTask, load_base_params, router_aux

# Methods whose adapters fold into the base weights (see cadenza.train.peft.merge).
MERGEABLE = ("lora", "lora_plus", "dora", "qlora", "ia3")


def peft_task(config, neftune_alpha: float = 0.0) -> TrainTask:
    """The TrainTask for ``config.peft`` on the base model in ``config.train.init_from``."""
    import jax

    from cadenza.models import Transformer, abstract_params
    from cadenza.train.peft import artifacts, merge
    from cadenza.train.peft.model import build

    pm = build(config.model, config.peft)
    base: dict = {}

    def base_params(mesh, rules):
        if config.train.init_from is None:
            raise ConfigError(f"peft.method={config.peft.method!r} needs a base model",
                              where="train.init_from",
                              fix="set train.init_from to a model directory (e.g. one written "
                                  "by 'cadenza convert hf-import' or a previous run's model/)")
        if "params" not in base:
            base["params"] = load_base_params(config.model, config.train.init_from, mesh, rules)
        return base["params"]

    def load_frozen(mesh, rules):
        frozen = pm.freeze(base_params(mesh, rules))
        print(pm.describe(pm.abstract_trainable(), frozen))
        return frozen

    def abstract_frozen(mesh, rules):
        shapes = jax.eval_shape(pm.freeze, abstract_params(config.model))
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            shapes, pm.shardings(mesh, rules)[1])

    model = Transformer(config.model)

    def run(trainable, frozen, batch, rng, intermediates=False):
        kwargs = dict(positions=batch["positions"], segment_ids=batch["segment_ids"],
                      dropout_rng=rng, intermediates=intermediates)
        if rng is None or not neftune_alpha:
            return pm.apply(trainable, frozen, batch["inputs"], **kwargs)
        from cadenza.train.data.neftune import neftune_noise

        embeddings = model.apply({"params": frozen["params"]}, batch["inputs"],
                                 method=Transformer.embed_tokens)
        noise_key, dropout_key = jax.random.split(rng)
        embeddings = neftune_noise(embeddings, batch["segment_ids"], noise_key, neftune_alpha)
        kwargs["dropout_rng"] = dropout_key
        return pm.apply(trainable, frozen, embeddings=embeddings, **kwargs)

    def apply(trainable, frozen, batch, rng):
        return run(trainable, frozen, batch, rng)[0]

    def apply_with_aux(trainable, frozen, batch, rng):
        out = run(trainable, frozen, batch, rng, intermediates=True)
        return out[0], router_aux(config.model, out[3])

    def export(trainable, frozen):
        return merge.merge(pm, trainable, frozen) if pm.method in MERGEABLE else None

    def n_params(tree):
        import math

        return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))

    return TrainTask(
        abstract_trainable=pm.abstract_trainable,
        trainable_shardings=lambda mesh, rules: pm.shardings(mesh, rules)[0],
        init_trainable=lambda rng, mesh, rules: pm.init_trainable(
            rng, base_params(mesh, rules), mesh=mesh, rules=rules),
        load_frozen=load_frozen,
        abstract_frozen=abstract_frozen,
        apply=apply,
        export=export,
        trainable_params=n_params(pm.abstract_trainable()),
        total_params=config.model.num_params(),
        wrap_optimizer=pm.optimizer,
        save_adapters=lambda directory, trainable: artifacts.save_adapters(
            directory, config, trainable),
        apply_with_aux=apply_with_aux if config.model.is_moe else None)
