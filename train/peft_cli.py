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
    pm, trainable = load_adapters(args.adapter, config)
    merged = merge.merge(pm, trainable, pm.freeze(params))
    out = dataclasses.replace(config, peft=PeftConfig())
    save_model(args.out, out, merged, tokenizer_dir=tokenizer_dir(args.model))
    print(f"merged {pm.method} adapters ({len(pm.sites)} projections) into {args.out}")
    return 0


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

    from cadenza.config import load_config
    from cadenza.train.peft.artifacts import peft_import, save_adapters

    config = load_config(f"{args.model}/config.yaml")
    pm, trainable = peft_import(args.hf_adapter, config)
    save_adapters(args.out, dataclasses.replace(config, peft=pm.peft_config), trainable)
    print(f"imported a {pm.method} adapter ({len(pm.sites)} projections) to {args.out}")
    return 0


def register(subparsers) -> None:
    sub = command_group(subparsers, "convert", CONVERT_HELP)
    p = sub.add_parser("merge-lora", help="fold adapters into a base model directory")
    p.add_argument("--model", required=True, help="base cadenza model directory")
    p.add_argument("--adapter", required=True, help="cadenza adapter directory")
    p.add_argument("--out", required=True, help="new model directory")
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
