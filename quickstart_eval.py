"""What the quickstart measures about its models (beyond training loss).

- :func:`unigram_cross_entropy`: the loss a model that ignores context would reach on a
  dataset, the baseline every training and held-out loss is printed beside.
- :func:`heldout_loss`: a model's mean next-token loss on the held-out split.
- :func:`task_examples` / :func:`measure_task` / :func:`score_task`: the measured task,
  completing held-out docstrings with a function body, scored two ways: exact match of
  the body's first line (greedy) and syntax pass@k (sampled bodies that compile as the
  function's body; every check runs in a separate, resource-limited Python process with
  a time limit, never in the quickstart's own process).
"""

import json
import math
import subprocess
import sys

import numpy as np

# The sandbox: a fresh isolated interpreter that reads [source, ...] as JSON on stdin and
# prints [ok, ...]; each check is compiled (never executed) under a per-check alarm, the
# whole process under CPU and memory limits.
_CHECKER = r"""
import json, resource, signal, sys
resource.setrlimit(resource.RLIMIT_CPU, (20, 20))
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
def _timeout(*_):
    raise TimeoutError
signal.signal(signal.SIGALRM, _timeout)
out = []
for src in json.load(sys.stdin):
    signal.alarm(2)
    try:
        compile(src, "<completion>", "exec", dont_inherit=True)
        out.append(True)
    except BaseException:
        out.append(False)
    finally:
        signal.alarm(0)
print(json.dumps(out))
"""
CHECK_TIMEOUT_S = 60


def unigram_cross_entropy(config, max_batches: int) -> dict:
    """Cross-entropy (nats) of a unigram model of ``config``'s data: token frequencies of
    the counted targets of up to ``max_batches`` training batches (add-0.5 smoothing over
    ``model.vocab_size``), scored on those batches (``train``) and on the held-out split
    (``heldout``, up to ``max_batches`` batches)."""
    from cadenza.train.data import build_iterator

    vocab = config.model.vocab_size

    def counts(split):
        c = np.zeros(vocab, np.float64)
        for i, batch in enumerate(build_iterator(config, split=split)):
            if i == max_batches:
                break
            mask = batch["loss_mask"] > 0
            np.add.at(c, batch["targets"][mask], 1.0)
        return c

    train, heldout = counts("train"), counts("test")
    logp = np.log((train + 0.5) / (train.sum() + 0.5 * vocab))
    return {"train": float(-(train * logp).sum() / max(train.sum(), 1.0)),
            "heldout": float(-(heldout * logp).sum() / max(heldout.sum(), 1.0))}


def heldout_loss(config, params, max_batches: int) -> float:
    """Mean next-token cross-entropy of ``params`` over the held-out ("test") split of
    ``config``'s data, on counted (assistant) tokens of at most ``max_batches`` batches."""
    import jax

    from cadenza.models import Transformer
    from cadenza.train.data import build_iterator
    from cadenza.train.step import token_losses

    model = Transformer(config.model)

    @jax.jit
    def losses(params, batch):
        logits = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                             segment_ids=batch["segment_ids"])[0]
        _, ce, count = token_losses(logits, batch["targets"], batch["loss_mask"])
        return ce, count

    ce = count = 0.0
    for i, batch in enumerate(build_iterator(config, split="test")):
        if i == max_batches:
            break
        c, n = losses(params, batch)
        ce, count = ce + float(c), count + float(n)
    return ce / max(count, 1.0)


def task_example(tokenizer, instruction: str, body: str, where: str, max_tokens: int,
                 max_body_tokens: int) -> dict | None:
    """One docstring -> body example of the measured task, or None when its prompt is
    longer than ``max_tokens`` or its body longer than ``max_body_tokens`` tokens (a
    completion could not finish it). A dict: ``where`` (as given), ``header`` (signature +
    docstring source), ``body`` (the reference body), ``first_line`` (its first line) and
    ``prompt`` (token ids of the chat-rendered instruction with the assistant turn
    opened)."""
    from cadenza.models.chat_template import ChatTemplate
    from cadenza.train.data import stdlib

    text = ChatTemplate.from_tokenizer(tokenizer).render(
        [{"role": "user", "content": instruction}], add_generation_prompt=True)
    ids = tokenizer.encode(text, add_bos=True)
    if len(ids) > max_tokens or len(tokenizer.encode(body, add_bos=False)) > max_body_tokens:
        return None
    return {"where": where, "prompt": ids, "body": body,
            "header": instruction.removeprefix(stdlib.INSTRUCTION),
            "first_line": body.splitlines()[0].strip()}


def task_examples(tokenizer, modules, heldout_fraction: float, max_tokens: int,
                  max_body_tokens: int, per_module: int, count: int) -> list[dict]:
    """Up to ``count`` held-out docstring -> body examples (:func:`task_example`), at most
    ``per_module`` from each held-out module, taken from the modules in turn (the first few
    examples come from as many different modules as there are)."""
    from cadenza.train.data import stdlib

    root = stdlib.stdlib_root()
    per = []
    for rel in stdlib.stdlib_files(modules):
        if not stdlib.is_heldout(rel, heldout_fraction):
            continue
        found = []
        for instruction, body, line in stdlib.instruction_pairs(
                (root / rel).read_text("utf-8"), rel):
            example = task_example(tokenizer, instruction, body, f"{rel}:{line}", max_tokens,
                                   max_body_tokens)
            if example is None:
                continue
            found.append(example)
            if len(found) == per_module:
                break
        if found:
            per.append(found)
    interleaved = [e for i in range(per_module) for found in per if i < len(found)
                   for e in found[i:i + 1]]
    return interleaved[:count]


def function_source(header: str, body: str) -> str:
    """The function ``header`` (``def ...:`` plus its docstring) with ``body`` as its body,
    indented one level below the ``def`` line."""
    indent = " " * (len(header) - len(header.lstrip()) + 4)
    lines = body.splitlines() or ["pass"]
    return header + "\n" + "\n".join(indent + ln for ln in lines) + "\n"


def compiles(sources: list[str]) -> list[bool]:
    """Whether each source compiles, checked in a separate, isolated Python process
    (``-I``) with a 2 s alarm per source, CPU and memory limits, and a
    :data:`CHECK_TIMEOUT_S` limit for the process; a source it cannot finish counts as
    not compiling. Nothing is executed."""
    if not sources:
        return []
    try:
        done = subprocess.run([sys.executable, "-I", "-c", _CHECKER], input=json.dumps(sources),
                              capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
        ok = json.loads(done.stdout) if done.returncode == 0 else []
    except (subprocess.TimeoutExpired, json.JSONDecodeError):
        ok = []
    return [bool(x) for x in ok] if len(ok) == len(sources) else [False] * len(sources)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from ``n`` samples of which ``c`` pass:
    ``1 - C(n - c, k) / C(n, k)``."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score_task(examples: list[dict], greedy_bodies: list[str],
               sampled_bodies: list[list[str]], ks=(1, 5)) -> dict:
    """Score completions of ``examples``: ``first_line_exact`` (fraction whose greedy body
    starts with the reference first line, whitespace-stripped), ``greedy_compiles``
    (fraction of greedy bodies that compile in the function), ``pass@k`` for each k
    (mean unbiased estimate over examples of the sampled bodies compiling), and
    ``samples`` (n per example)."""
    n = len(sampled_bodies[0]) if sampled_bodies else 0
    exact = [(g.splitlines() or [""])[0].strip() == e["first_line"]
             for g, e in zip(greedy_bodies, examples)]
    sources = [function_source(e["header"], b) for e, b in zip(examples, greedy_bodies)]
    for e, bodies in zip(examples, sampled_bodies):
        sources += [function_source(e["header"], b) for b in bodies]
    ok = compiles(sources)
    greedy_ok, sampled_ok = ok[:len(examples)], ok[len(examples):]
    passed = [sum(sampled_ok[i * n:(i + 1) * n]) for i in range(len(examples))]
    out = {"examples": len(examples), "samples": n,
           "first_line_exact": float(np.mean(exact)) if exact else 0.0,
           "greedy_compiles": float(np.mean(greedy_ok)) if greedy_ok else 0.0}
    for k in ks:
        if k <= n:
            out[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for c in passed]))
    return out


def decode_bodies(model, params, examples: list[dict], tokenizer, new_tokens: int, *,
                  samples: int = 0, seed: int = 0) -> list:
    """Greedy bodies of ``examples``' prompts (``samples=0``: a list of str) or ``samples``
    sampled bodies per example (temperature 0.8, seeds ``seed, seed + 1, ...``: a list of
    lists), each at most ``new_tokens`` tokens, decoded as one batch."""
    from cadenza.decode import DecodeConfig, generate
    from cadenza.decode.config import with_fields

    prompts = [e["prompt"] for e in examples]
    if not samples:
        cfg = DecodeConfig(method="greedy", max_new_tokens=new_tokens)
        return generate(model, params, prompts, cfg, tokenizer=tokenizer).text
    cfg = with_fields(DecodeConfig(method="sample", max_new_tokens=new_tokens),
                      sampling__temperature=0.8)
    rows = [p for p in prompts for _ in range(samples)]
    texts = generate(model, params, rows, cfg, tokenizer=tokenizer,
                     seeds=[seed + i for i in range(len(rows))]).text
    return [texts[i * samples:(i + 1) * samples] for i in range(len(prompts))]


def measure_task(model, params, examples: list[dict], tokenizer, new_tokens: int,
                 samples: int) -> tuple[dict, list[str]]:
    """The measured task's scores (:func:`score_task`) of one model (a Transformer and its
    params) on ``examples``, from its greedy bodies and ``samples`` sampled bodies per
    example; and the greedy bodies."""
    greedy = decode_bodies(model, params, examples, tokenizer, new_tokens)
    sampled = decode_bodies(model, params, examples, tokenizer, new_tokens, samples=samples)
    return score_task(examples, greedy, sampled), greedy
