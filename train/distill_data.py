"""On-policy data for draft distillation: the teacher's own generations, cached on disk.

With ``train.distill.on_policy: true`` the distillation student trains on sequences the
teacher wrote itself (the states a draft meets when it drafts for that teacher) instead of
the data section's text. :func:`teacher_generations` takes ``prompts`` prompts (the first
``prompt_len`` tokens of the first segment of training rows of the data section), continues
them with :func:`cadenza.decode.generate` on the teacher (``gen_batch`` prompts per call,
``temperature`` 0 = greedy, else sampling seeded by ``train.seed``; a row ends at EOS or
after ``new_tokens`` tokens) and writes them to ``<output_dir>/on_policy/<fingerprint>.npz``
atomically. The fingerprint covers the teacher directory (every file's name, size and
modification time), the prompts and the generation settings, so a rerun (or a resumed run)
reuses the file and any change generates anew. :class:`OnPolicyBatches` turns them into
training batches: one sequence per row, only the continuation's positions counted.
"""

import hashlib
import json
import pathlib
import time

import numpy as np

from cadenza.errors import CadenzaError

FORMAT = 1


def corpus_prompts(config, corpus) -> list[list[int]]:
    """``train.distill.prompts`` prompts from the batches of ``corpus`` (an iterator of
    training batches): per row, the first ``prompt_len`` input tokens of its first segment
    (rows whose first segment is shorter than 2 tokens are skipped)."""
    d = config.train.distill
    out, batches = [], 0
    while len(out) < d.prompts:
        batch = next(corpus)
        batches += 1
        for inputs, seg in zip(np.asarray(batch["inputs"]), np.asarray(batch["segment_ids"])):
            n = int(np.argmax(seg != seg[0])) if np.any(seg != seg[0]) else len(seg)
            if seg[0] > 0 and min(n, d.prompt_len) >= 2:
                out.append([int(t) for t in inputs[:min(n, d.prompt_len)]])
        if batches > 100 * d.prompts:
            raise CadenzaError("the training data yields no prompts (every row's first "
                               "segment is shorter than 2 tokens)", where="train.distill",
                               fix="use data with longer documents or turn on_policy off")
    return out[:d.prompts]


def fingerprint(teacher_dir, prompts, settings: dict) -> str:
    """A hex digest of the teacher directory's files (names, sizes, modification times),
    the prompts and the generation ``settings``."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, **settings}, sort_keys=True).encode())
    root = pathlib.Path(teacher_dir).resolve()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    for p in prompts:
        h.update(np.asarray(p, np.int32).tobytes() + b"|")
    return h.hexdigest()[:24]


def teacher_generations(config, prompts, log=print) -> dict:
    """The teacher's continuations of ``prompts`` (cached, see the module docstring).

    Returns numpy arrays: ``tokens`` int32 [N, prompt_len + new_tokens] (prompt then
    continuation, 0-padded), ``prompt_lengths`` and ``lengths`` int32 [N], and the cache
    ``path``."""
    from cadenza.outputs import atomic_file

    d, train = config.train.distill, config.train
    settings = {"new_tokens": d.new_tokens, "temperature": d.temperature, "seed": train.seed,
                "gen_batch": d.gen_batch}
    path = (pathlib.Path(train.output_dir) / "on_policy"
            / f"{fingerprint(train.init_from, prompts, settings)}.npz")
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            log(f"on-policy data: {len(z['lengths'])} teacher generations reused from {path}")
            return {k: z[k] for k in ("tokens", "prompt_lengths", "lengths")} | {"path": path}
    t0 = time.perf_counter()
    rows = _generate(config, prompts)
    width = d.prompt_len + d.new_tokens
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    out = {"tokens": tokens, "prompt_lengths": np.asarray([len(p) for p in prompts], np.int32),
           "lengths": np.asarray([len(r) for r in rows], np.int32)}
    with atomic_file(path, overwrite=True) as tmp, open(tmp, "wb") as f:
        np.savez(f, **out)
    log(f"on-policy data: {len(rows)} teacher generations ({int(out['lengths'].sum())} "
        f"tokens) in {time.perf_counter() - t0:.1f} s, cached at {path}")
    return out | {"path": path}


def _generate(config, prompts) -> list[list[int]]:
    from cadenza.decode import DecodeConfig, SamplingConfig, generate
    from cadenza.models import Transformer, load_model

    d = config.train.distill
    tconfig, params = load_model(config.train.init_from)
    model = Transformer(tconfig.model)
    sample = d.temperature > 0
    cfg = DecodeConfig(method="sample" if sample else "greedy", max_new_tokens=d.new_tokens,
                       seed=config.train.seed,
                       sampling=SamplingConfig(temperature=d.temperature if sample else 1.0))
    out = []
    for i in range(0, len(prompts), d.gen_batch):
        chunk = prompts[i:i + d.gen_batch]
        res = generate(model, params, chunk, cfg,
                       seeds=[config.train.seed + i + j for j in range(len(chunk))])
        out += [p + list(t) for p, t in zip(chunk, res.token_ids)]
    return out


class OnPolicyBatches:
    """Training batches of ``rows`` sequences each from :func:`teacher_generations`, in order,
    cycling (host ``process_index`` of ``process_count`` takes its slice of each global
    batch): ``inputs``/``targets`` are a sequence shifted by one, 0-padded to ``seq_len``;
    ``loss_mask`` counts the continuation's targets only. ``tokenizer``: the data's (copied
    into the exported model directory)."""

    def __init__(self, generations: dict, rows: int, seq_len: int, tokenizer=None,
                 process_index: int = 0, process_count: int = 1):
        self.g, self.rows, self.seq_len, self.index = generations, rows, seq_len, 0
        self.tokenizer, self.host = tokenizer, (process_index, process_count)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        n = len(self.g["lengths"])
        first = (self.index * self.host[1] + self.host[0]) * self.rows
        pick = [(first + r) % n for r in range(self.rows)]
        self.index += 1
        t = self.seq_len
        shape = (self.rows, t)
        batch = {"inputs": np.zeros(shape, np.int32), "targets": np.zeros(shape, np.int32),
                 "loss_mask": np.zeros(shape, np.float32),
                 "segment_ids": np.zeros(shape, np.int32),
                 "positions": np.broadcast_to(np.arange(t, dtype=np.int32), shape).copy()}
        for r, i in enumerate(pick):
            seq = self.g["tokens"][i, :self.g["lengths"][i]][:t + 1]
            m = len(seq) - 1
            batch["inputs"][r, :m], batch["targets"][r, :m] = seq[:-1], seq[1:]
            batch["segment_ids"][r, :m] = 1
            batch["loss_mask"][r, self.g["prompt_lengths"][i] - 1:m] = 1.0
        return batch

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


def on_policy_iterator(config, corpus, process_index: int = 0,
                       process_count: int = 1) -> OnPolicyBatches:
    """This host's on-policy training batches of ``config``: prompts from ``corpus`` (the
    data section's training iterator, whose tokenizer is kept)."""
    prompts = corpus_prompts(config, corpus)
    return OnPolicyBatches(teacher_generations(config, prompts),
                           config.train.batch_size // process_count, config.train.seq_len,
                           getattr(corpus, "tokenizer", None), process_index, process_count)
