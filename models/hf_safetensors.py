"""A small, strict reader and writer for the safetensors format (no pickle, no torch).

Format: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``),
then the raw little-endian tensor bytes; offsets are relative to the end of
the header. Tensors are read through a read-only memory map, so slicing a
tensor view touches only the bytes of that slice (this is how sharded import
reads each device's shard without materialising the whole tensor).

bfloat16 is supported through the ``ml_dtypes`` dtype JAX registers with numpy.
"""

import dataclasses
import json
import math
import pathlib
import struct

import jax.numpy as jnp
import numpy as np

from cadenza.errors import CadenzaError

# safetensors dtype tags that map to numpy dtypes. Other tags (F8_*, ...) are
# recorded so strictness checks can name them, but cannot be read as arrays.
DTYPES = {
    "F64": np.dtype("float64"), "F32": np.dtype("float32"), "F16": np.dtype("float16"),
    "BF16": jnp.dtype("bfloat16"), "I64": np.dtype("int64"), "I32": np.dtype("int32"),
    "I16": np.dtype("int16"), "I8": np.dtype("int8"), "U8": np.dtype("uint8"),
    "BOOL": np.dtype("bool"),
}
FLOAT_TAGS = ("F64", "F32", "F16", "BF16")
_TAG_OF = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype tag, shape and byte range in the data section."""

    file: pathlib.Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile:
    """One opened ``.safetensors`` file: a validated header and lazy, memory-mapped tensors.

    Construction reads only the header and checks it against the file size,
    so a truncated download or a corrupt header fails here with a clear error.
    """

    def __init__(self, path):
        self.path = pathlib.Path(path)
        size = self.path.stat().st_size
        with self.path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise self._error(f"the file is only {size} bytes (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise self._error(f"the header claims {n} bytes but the file has {size} bytes")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise self._error(f"the header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._error("the header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_size = size - self._data_start
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            try:
                begin, end = (int(x) for x in entry["data_offsets"])
                info = TensorInfo(self.path, str(entry["dtype"]),
                                  tuple(int(s) for s in entry["shape"]), begin, end)
            except (KeyError, TypeError, ValueError):
                raise self._error(f"malformed header entry for tensor {name!r}") from None
            if end > data_size:
                raise self._error(
                    f"tensor {name!r} ends at byte {end} of the data section but the file "
                    f"has only {data_size} data bytes: the file is truncated "
                    f"({size} bytes on disk, at least {self._data_start + end} expected)")
            dtype = DTYPES.get(info.dtype)
            if dtype is not None and end - begin != math.prod(info.shape) * dtype.itemsize:
                raise self._error(f"tensor {name!r}: {end - begin} bytes do not hold shape "
                                  f"{list(info.shape)} of {info.dtype}")
            self.tensors[name] = info
        self._mmap = None

    def _error(self, what: str) -> CadenzaError:
        return CadenzaError(f"corrupt or truncated safetensors file: {what}", where=str(self.path),
                            fix="download the file again (compare its size with the source) "
                                "or re-export it")

    def array(self, name: str) -> np.ndarray:
        """A read-only, memory-mapped numpy view of tensor ``name`` (nothing read yet)."""
        info = self.tensors[name]
        if info.dtype not in DTYPES:
            raise CadenzaError(f"tensor {name!r} has dtype {info.dtype}, which cadenza cannot "
                               "read", where=str(self.path),
                               fix="convert the checkpoint to float32/bfloat16/float16")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        start = self._data_start + info.begin
        flat = self._mmap[start:self._data_start + info.end].view(DTYPES[info.dtype])
        return flat.reshape(info.shape)


def dtype_tag(dtype) -> str:
    """The safetensors tag (``F32``, ``BF16``, ...) of a numpy/JAX dtype."""
    return _TAG_OF[np.dtype(dtype)]


def write_safetensors(path, tensors, metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` to ``path`` one at a time; returns the number of data bytes.

    Args:
      tensors: list of ``(name, shape, dtype, produce)`` where ``produce()``
        returns the numpy array (called once, while writing, so at most one
        tensor is held in memory at a time).
      metadata: string-to-string ``__metadata__`` (transformers wants
        ``{"format": "pt"}``).
    """
    header: dict = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, shape, dtype, _ in tensors:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": dtype_tag(dtype), "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with pathlib.Path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype, produce in tensors:
            array = np.ascontiguousarray(produce(), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"{name}: produced shape {array.shape}, declared {shape}")
            f.write(array.tobytes())
    return offset
