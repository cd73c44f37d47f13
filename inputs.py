"""Reading the text files users hand to cadenza (configs, prompt lists) with one clear
error for a missing file, a folder, or bytes that are not UTF-8 (naming the line)."""

import pathlib

from cadenza.errors import CadenzaError


def read_text(path, what: str) -> str:
    """The UTF-8 text of the file ``path`` (a ``what``, e.g. "prompts file").

    Raises:
      CadenzaError: the file is missing, is a folder, cannot be read, or is not UTF-8
        (the message names the line and byte offset of the first bad byte).
    """
    p = pathlib.Path(path)
    if not p.is_file():
        raise CadenzaError(f"{what} not found" + (" (it is a folder)" if p.is_dir() else ""),
                           where=str(p), fix=f"pass an existing {what}")
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise CadenzaError(f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                           f"{e.start}, line {line})", where=f"{p}:{line}",
                           fix="re-encode the file as UTF-8 (e.g. iconv -t utf-8)") from None


def load_npy(path):
    """The array of the ``.npy`` file ``path``, memory-mapped read-only. Never unpickles:
    a file holding Python objects (a pickle) is refused with a :class:`CadenzaError`, as is
    a file that is not a valid ``.npy``."""
    import numpy as np

    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        pickled = "allow_pickle" in str(e) or "object" in str(e).lower()
        raise CadenzaError("holds pickled Python objects, which cadenza never loads" if pickled
                           else f"is not a valid .npy array file ({e})", where=str(path),
                           fix="rebuild the file with cadenza (plain numeric arrays)") from None
