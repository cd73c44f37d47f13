"""``cadenza convert merge-lora | peft-export | peft-import``: adapter conversions.

These join the shared ``convert`` command (:func:`cadenza.cli.command_group`).
"""

from cadenza.cli import CONVERT_HELP, command_group


def _merge_lora(args) -> int:
    import dataclasses

    from cadenza.models.checkpoint import load_model, save_model, tokenizer_dir
    from cadenza.train.peft import merge
    from cadenza.train.peft.artifacts import load_adapters
    from cadenza.train.peft_config import PeftConfig

    config, params = load_model(args.model)
    _check_base(args, config)
    pm, trainable = load_adapters(args.adapter, config)
    merged = merge.merge(pm, trainable, pm.freeze(params))
    out = dataclasses.replace(config, peft=PeftConfig())
    save_model(args.out, out, merged, tokenizer_dir=tokenizer_dir(args.model))
    print(f"merged {pm.method} adapters ({len(pm.sites)} projections) into {args.out}")
    return 0


def _check_base(args, config) -> None:
    """Refuse to merge adapters into a model other than the one they were trained on: a
    different architecture (any shape field), or another base directory than the
    ``train.init_from`` recorded with the adapters (unless ``--allow-other-base``)."""
    import pathlib

    from cadenza.config import load_config
    from cadenza.errors import CadenzaError
    from cadenza.train.checkpoints import model_differences

    recorded = pathlib.Path(args.adapter) / "config.yaml"
    if not recorded.is_file():
        return  # load_adapters names what is missing
    saved = load_config(recorded)
    diffs = model_differences(saved.model, config.model)
    if diffs:
        raise CadenzaError("the adapters were trained for another model architecture: "
                           + "; ".join(diffs).replace("checkpoint has", "adapters have")
                           .replace("this run has", "--model has"), where=str(args.adapter),
                           fix="pass the base model the adapters were trained on as --model")
    base = saved.train.init_from
    if base and not args.allow_other_base:
        base_path = pathlib.Path(base)
        if not base_path.exists() or not base_path.samefile(args.model):
            raise CadenzaError(f"the adapters were trained on the base {base}, not on "
                               f"{args.model}", where=str(args.adapter),
                               fix=f"pass --model {base}, or --allow-other-base if "
                                   f"{args.model} holds the same weights (a copy or a move)")


def _peft_export(args) -> int:
    from cadenza.config import load_config
    from cadenza.train.peft.artifacts import load_adapters, peft_export

    config = load_config(f"{args.model}/config.yaml")
    pm, trainable = load_adapters(args.adapter, config)
    peft_export(args.out, pm, trainable)
    print(f"wrote a peft {pm.method} adapter to {args.out}")
    return 0


def _peft_import(args) -> int:
    import dataclasses

    from cadenza.models.checkpoint import load_model
    from cadenza.train.peft.artifacts import peft_import, save_adapters

    config, base_params = load_model(args.model)  # checks a saved base-weight copy
    pm, trainable = peft_import(args.hf_adapter, config, base_params)
    save_adapters(args.out, dataclasses.replace(config, peft=pm.peft_config), trainable)
    print(f"imported a {pm.method} adapter ({len(pm.sites)} projections) to {args.out}")
    return 0


def register(subparsers) -> None:
    sub = command_group(subparsers, "convert", CONVERT_HELP)
    p = sub.add_parser("merge-lora", help="fold adapters into a base model directory")
    p.add_argument("--model", required=True, help="base cadenza model directory")
    p.add_argument("--adapter", required=True, help="cadenza adapter directory")
    p.add_argument("--out", required=True, help="new model directory")
    p.add_argument("--allow-other-base", action="store_true",
                   help="merge into --model although it is not the train.init_from recorded "
                        "with the adapters (e.g. a copy of it)")
    p.set_defaults(func=_merge_lora)
    p = sub.add_parser("peft-export", help="write adapters in Hugging Face peft format")
    p.add_argument("--model", required=True, help="base cadenza model directory")
    p.add_argument("--adapter", required=True, help="cadenza adapter directory")
    p.add_argument("--out", required=True, help="output folder (adapter_config.json + "
                                                "adapter_model.safetensors)")
    p.set_defaults(func=_peft_export)
    p = sub.add_parser("peft-import", help="read a Hugging Face peft LoRA adapter")
    p.add_argument("--model", required=True, help="base cadenza model directory")
    p.add_argument("--hf-adapter", required=True, help="folder saved by peft's save_pretrained")
    p.add_argument("--out", required=True, help="new cadenza adapter directory")
    p.set_defaults(func=_peft_import)
