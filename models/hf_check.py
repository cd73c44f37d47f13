"""Logit parity check of cadenza against transformers on the same HF checkpoint.

In the style of MaxText's logit checker: both models run in float32 on a few
prompts; per position we report the max absolute logit difference, the KL
divergence KL(transformers || cadenza) and whether the top-1 tokens agree
(up to ties within the tolerance),
then a pass/fail verdict. Passing needs max |diff| <= ``rtol`` x logit scale
(the largest |logit| of the reference, at least 1) and every KL <= ``kl_tol``.
"""

import dataclasses
import pathlib
import tempfile

import numpy as np

from cadenza.models.hf_reference import ReferenceSession


@dataclasses.dataclass
class CheckReport:
    """Per-position parity statistics for one checkpoint (arrays are [prompts, positions])."""

    hf_dir: str
    tokens: np.ndarray
    max_abs_diff: np.ndarray
    kl: np.ndarray
    top1_agree: np.ndarray
    logit_scale: float
    rtol: float
    kl_tol: float

    @property
    def tolerance(self) -> float:
        return self.rtol * self.logit_scale

    @property
    def passed(self) -> bool:
        return bool(self.max_abs_diff.max() <= self.tolerance and self.kl.max() <= self.kl_tol)

    def format(self, verbose: bool = False) -> str:
        """The report ``cadenza convert check`` prints: one line per prompt (its worst
        position) and the verdict; ``verbose`` adds the per-position table."""
        lines = [f"logit check: {self.hf_dir}"]
        for p in range(self.tokens.shape[0]):
            worst = int(self.max_abs_diff[p].argmax())
            lines.append(f"prompt {p}: {self.tokens.shape[1]} positions, max|dlogit| "
                         f"{self.max_abs_diff[p].max():.3e} (position {worst}), max KL "
                         f"{self.kl[p].max():.3e}, top-1 agreement {self.top1_agree[p].mean():.0%}")
            if verbose:
                lines.append("          pos  token  max|dlogit|  KL(hf||cadenza)  top1")
                for t in range(self.tokens.shape[1]):
                    top1 = "ok" if self.top1_agree[p, t] else "DIFF"
                    lines.append(f"          {t:5d} {self.tokens[p, t]:6d}  "
                                 f"{self.max_abs_diff[p, t]:11.3e}  {self.kl[p, t]:15.3e}  "
                                 f"{top1}")
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"max |logit diff| {self.max_abs_diff.max():.3e} (tolerance "
                     f"{self.tolerance:.3e} = {self.rtol:g} x logit scale {self.logit_scale:.3g}); "
                     f"max KL {self.kl.max():.3e} (tolerance {self.kl_tol:g}); top-1 agreement "
                     f"{self.top1_agree.mean():.1%}: {verdict}")
        return "\n".join(lines)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare_logits(hf_dir, tokens, ref, ours, *, rtol: float, kl_tol: float) -> CheckReport:
    """Statistics of cadenza logits ``ours`` against reference logits ``ref`` ([B, T, V])."""
    lp, lq = _log_softmax(ref), _log_softmax(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    scale = max(1.0, float(np.abs(ref).max()))
    # Top-1 agrees when cadenza's choice is within tolerance of the reference's best (ties).
    chosen = np.take_along_axis(ref, ours.argmax(-1)[..., None], -1)[..., 0]
    agree = chosen >= ref.max(-1) - rtol * scale
    return CheckReport(str(hf_dir), np.asarray(tokens), np.abs(ref - ours).max(-1),
                       np.maximum(kl, 0.0), agree, scale, rtol, kl_tol)


def check_hf(hf_dirs, *, num_prompts: int = 3, prompt_len: int = 16, seed: int = 0,
             rtol: float = 1e-4, kl_tol: float = 1e-6, session: ReferenceSession | None = None,
             ref_python=None) -> list[CheckReport]:
    """Compare cadenza and transformers logits on each checkpoint in ``hf_dirs``.

    Prompts are ``num_prompts`` rows of ``prompt_len`` random token ids
    (seeded; the first is the BOS id when the config has one). All
    checkpoints go through one reference subprocess (``session``, or a new
    one started with ``ref_python``). Returns one report per directory.
    """
    import jax

    from cadenza.models.hf_import import read_hf
    from cadenza.models.transformer import Transformer

    loaded = [read_hf(d, dtype="float32") for d in hf_dirs]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        jobs, inputs = [], []
        for k, (ckpt, config, _) in enumerate(loaded):
            rng = np.random.default_rng(seed + k)
            tokens = rng.integers(0, config.vocab_size, (num_prompts, prompt_len), np.int32)
            if config.bos_token_id is not None:
                tokens[:, 0] = config.bos_token_id
            np.save(tmp / f"tokens{k}.npy", tokens)
            jobs.append({"dir": str(ckpt.directory.absolute()),
                         "tokens": str(tmp / f"tokens{k}.npy"), "out": str(tmp / f"ref{k}.npy")})
            inputs.append(tokens)
        if session is None:
            with ReferenceSession(ref_python) as own:
                own.run({"logits": jobs})
        else:
            session.run({"logits": jobs})
        refs = [np.load(tmp / f"ref{k}.npy") for k in range(len(jobs))]
    reports = []
    for (ckpt, config, params), tokens, ref in zip(loaded, inputs, refs):
        apply = jax.jit(lambda p, t, config=config: Transformer(config).apply({"params": p}, t)[0])
        ours = np.asarray(apply(params, tokens))
        reports.append(compare_logits(ckpt.directory, tokens, ref, ours, rtol=rtol, kl_tol=kl_tol))
    return reports
