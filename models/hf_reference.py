"""Running transformers in the separate reference environment, as a subprocess.

The reference environment (``make ref-env``: Python 3.11, PyTorch CPU,
transformers) is found at ``$CADENZA_REF_PYTHON`` or ``<checkout>/.venv-ref``.
A :class:`ReferenceSession` keeps one subprocess (torch is imported once)
and sends it batches of jobs as JSON lines; arrays travel as ``.npy`` files.
Nothing is pickled; the subprocess runs offline (``HF_HUB_OFFLINE=1``) and
never allows remote code.
"""

import json
import os
import pathlib
import subprocess

from cadenza.errors import CadenzaError

SCRIPT = pathlib.Path(__file__).with_name("hf_reference_script.py")
_CHECKOUT = pathlib.Path(__file__).resolve().parents[1]


def reference_python(explicit=None) -> pathlib.Path:
    """The reference interpreter: ``explicit``, else $CADENZA_REF_PYTHON, else .venv-ref."""
    candidate = explicit or os.environ.get("CADENZA_REF_PYTHON") or (
        _CHECKOUT / ".venv-ref" / "bin" / "python")
    path = pathlib.Path(candidate)
    if not path.is_file():
        raise CadenzaError("the transformers reference environment is not available",
                           where=str(path),
                           fix="run 'make ref-env' in the cadenza checkout, or pass "
                               "--ref-python / set CADENZA_REF_PYTHON to a Python with torch "
                               "and transformers")
    return path


class ReferenceSession:
    """One reference subprocess; use as a context manager, call :meth:`run` per batch.

    ``run(jobs)`` takes the dict described in hf_reference_script.py
    (``create``, ``logits``, ``generate``, ``encode``, ``router_loss`` and ``peft_logits``
    job lists) and returns when all are done.
    """

    def __init__(self, ref_python=None):
        python = reference_python(ref_python)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        env.pop("PYTHONPATH", None)
        self._python = python
        self._proc = subprocess.Popen([str(python), str(SCRIPT)], env=env, text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(self, jobs: dict) -> None:
        """Run one batch of jobs; raises CadenzaError with the reference traceback on failure."""
        self._proc.stdin.write(json.dumps(jobs) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise CadenzaError("the transformers reference process exited unexpectedly",
                               where=str(self._python), fix="see its error output above")
        reply = json.loads(line)
        if not reply["ok"]:
            tail = "\n".join(reply["error"].strip().splitlines()[-12:])
            raise CadenzaError(f"the transformers reference run failed:\n{tail}\n",
                               where=str(self._python), fix="read the reference error above")

    def close(self) -> None:
        """End the subprocess (closing its stdin ends its loop)."""
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
