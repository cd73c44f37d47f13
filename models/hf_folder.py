"""Hugging Face model folders used directly wherever cadenza takes a model directory.

A folder with ``config.json`` and ``*.safetensors`` (and no cadenza ``config.yaml``) is
converted in memory by :func:`cadenza.models.hf_import.read_hf`, with the same strict
checks as ``cadenza convert hf-import``; its tokenizer files, if any, are read from the
folder itself. Nothing is written next to it.
"""

import pathlib

# a folder holding one of these has a tokenizer cadenza can load
TOKENIZER_MARKERS = ("tokenizer.json", "*.model")


def is_hf_folder(path) -> bool:
    """Whether ``path`` is a Hugging Face model folder rather than a cadenza model directory."""
    p = pathlib.Path(path)
    return (p / "config.json").is_file() and not (p / "config.yaml").exists()


def has_tokenizer(path) -> bool:
    """Whether the folder ``path`` holds tokenizer files (tokenizer.json or a *.model)."""
    p = pathlib.Path(path)
    return any(any(p.glob(pattern)) for pattern in TOKENIZER_MARKERS)


def hf_folder_config(path):
    """The HF folder ``path``'s ExperimentConfig as :func:`load_hf_folder` returns it (named
    after the folder, the imported model section, every other section at its default),
    read from config.json and the safetensors headers only (no tensor data)."""
    from cadenza.config import ExperimentConfig
    from cadenza.models.hf_import import open_hf_checkpoint

    ckpt, model_config = open_hf_checkpoint(path)
    return ExperimentConfig(name=ckpt.directory.name, model=model_config)


def load_hf_folder(path, mesh=None, rules=None):
    """The HF folder ``path`` as ``(ExperimentConfig, params)``, like a loaded cadenza model
    directory: the experiment is named after the folder and holds the imported model
    section (every other section at its default). Params as :func:`load_hf` makes them
    (sharded on ``mesh`` when given)."""
    from cadenza.config import ExperimentConfig
    from cadenza.models.hf_import import read_hf

    ckpt, model_config, params = read_hf(path, mesh=mesh, rules=rules)
    return ExperimentConfig(name=ckpt.directory.name, model=model_config), params
