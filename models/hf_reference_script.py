"""Runs inside the PyTorch/transformers reference environment (Python 3.11); no cadenza imports.

Usage: ``python hf_reference_script.py``, then one JSON line per batch of jobs on
stdin; each gets one JSON line back on stdout, ``{"ok": true}`` or
``{"ok": false, "error": "..."}`` (so torch is imported once per session).
A batch holds lists of jobs::

    {"create": [{"dir": D, "model_type": "llama", "config": {...}, "seed": 0}],
     "logits": [{"dir": D, "tokens": "in.npy", "out": "out.npy"}],
     "generate": [{"dir": D, "tokens": "in.npy", "max_new_tokens": N, "out": "out.npy"}],
     "encode": [{"dir": D, "texts": ["..."], "out": "ids.json"}],
     "router_loss": [{"logits": "in.npy", "top_k": K, "out": "out.npy"}],
     "peft_logits": [{"dir": D, "adapter": A, "tokens": "in.npy", "out": "out.npy"}]}

``create`` builds a random-init model with transformers (no download) and
saves it with ``save_pretrained`` (safetensors). Weights are redrawn so that
every tensor matters (norm scales and biases are not left at 1 or 0).
``logits`` loads a saved model in float32 with eager attention and writes the
float32 logits for int token ids ``[B, T]``. ``generate`` runs greedy
``model.generate`` on each row of ``[B, T]`` alone (no padding, EOS ignored) and
writes the ``[B, N]`` new tokens. ``encode`` loads the folder's tokenizer with
``AutoTokenizer`` and writes the ids of each text (special tokens added) as JSON.
``router_loss`` runs transformers' MoE
load-balancing loss (``load_balancing_loss_func``, shared by Mixtral, Qwen3-MoE
and OLMoE) on float32 router logits ``[layers, tokens, experts]`` and writes the
scalar. ``peft_logits`` loads the model with the peft adapter folder ``adapter``
on top (``PeftModel.from_pretrained``) and writes its logits. Arrays travel as .npy files;
nothing is pickled, and remote code is never allowed.
"""

import json
import sys
import traceback

import numpy as np
import torch
import transformers


def _randomize(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    gemma = model.config.model_type.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(0.1 * noise if gemma else 1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise if gemma else noise * 0.5)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)


def create(job: dict) -> None:
    config = transformers.AutoConfig.for_model(job["model_type"], **job["config"])
    torch.manual_seed(job.get("seed", 0))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, job.get("seed", 0))
    model.save_pretrained(job["dir"])


def _load(directory: str):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager", local_files_only=True,
        trust_remote_code=False)
    return model.eval()


def logits(job: dict) -> None:
    model = _load(job["dir"])
    tokens = torch.from_numpy(np.load(job["tokens"]).astype(np.int64))
    with torch.no_grad():
        out = model(input_ids=tokens).logits.float().numpy()
    np.save(job["out"], out)


def generate(job: dict) -> None:
    model = _load(job["dir"])
    n = job["max_new_tokens"]
    rows = []
    with torch.no_grad():
        for row in np.load(job["tokens"]).astype(np.int64):
            out = model.generate(torch.from_numpy(row)[None], do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, eos_token_id=None, pad_token_id=0)
            rows.append(out[0, len(row):].numpy())
    np.save(job["out"], np.stack(rows).astype(np.int32))


def encode(job: dict) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(job["dir"], trust_remote_code=False)
    ids = [tokenizer(text)["input_ids"] for text in job["texts"]]
    with open(job["out"], "w") as f:
        json.dump(ids, f)


def router_loss(job: dict) -> None:
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = np.load(job["logits"])
    loss = load_balancing_loss_func(tuple(torch.from_numpy(x) for x in logits),
                                    logits.shape[-1], job["top_k"])
    np.save(job["out"], np.asarray(float(loss), np.float32))


def peft_logits(job: dict) -> None:
    from peft import PeftModel

    model = PeftModel.from_pretrained(_load(job["dir"]), job["adapter"]).eval()
    tokens = torch.from_numpy(np.load(job["tokens"]).astype(np.int64))
    with torch.no_grad():
        np.save(job["out"], model(input_ids=tokens).logits.float().numpy())


def main() -> None:
    replies, sys.stdout = sys.stdout, sys.stderr  # library prints must not corrupt replies
    for line in sys.stdin:
        try:
            jobs = json.loads(line)
            for job in jobs.get("create", []):
                create(job)
            for job in jobs.get("logits", []):
                logits(job)
            for job in jobs.get("generate", []):
                generate(job)
            for job in jobs.get("encode", []):
                encode(job)
            for job in jobs.get("router_loss", []):
                router_loss(job)
            for job in jobs.get("peft_logits", []):
                peft_logits(job)
            reply = {"ok": True}
        except Exception:  # reported to the caller, which raises
            reply = {"ok": False, "error": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
