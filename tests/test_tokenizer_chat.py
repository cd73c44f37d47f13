"""Chat templates render exactly as transformers' apply_chat_template, and assistant spans
cover every assistant turn plus its end-of-turn token, nothing else."""

import json
import os
import pathlib
import subprocess

import pytest

from cadenza.errors import CadenzaError
from cadenza.models.chat_template import ChatTemplate
from cadenza.models.tokenizer import load_tokenizer, train_tokenizer

ROOT = pathlib.Path(__file__).resolve().parent
REF_PYTHON = ROOT.parent / ".venv-ref" / "bin" / "python"
TEMPLATES = ROOT / "fixtures" / "chat_templates"

FAMILIES = {
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
               "extra": ["<|start_header_id|>", "<|end_header_id|>"]},
    "chatml": {"bos_token": None, "eos_token": "<|im_end|>", "extra": ["<|im_start|>"]},
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>",
              "extra": ["<start_of_turn>", "<end_of_turn>"]},
}

SYSTEM = {"role": "system", "content": "  You are terse. Ünïcode ok.  "}
TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": " It is 4. "},
    {"role": "user", "content": "And\n3+3?"},
    {"role": "assistant", "content": "6"},
]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Adds — ü",
                                           "parameters": {"type": "object"}}}]

CASES = [(name, system, gen, tools)
         for name in FAMILIES for system in (False, True) for gen in (False, True)
         for tools in ((False, True) if name == "chatml" else (False,))]

REF_SCRIPT = r"""
import json, sys
from transformers import PreTrainedTokenizerFast
out = []
for case in json.load(sys.stdin):
    tok = PreTrainedTokenizerFast.from_pretrained(case["dir"])
    kw = dict(add_generation_prompt=case["gen"], tools=case["tools"])
    try:
        text = tok.apply_chat_template(case["messages"], tokenize=False, **kw)
        ids = tok.apply_chat_template(case["messages"], tokenize=True, return_dict=False, **kw)
        out.append({"text": text, "ids": list(ids)})
    except Exception as e:
        out.append({"error": type(e).__name__ + ": " + str(e)})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """A tokenizer folder per family: a small trained BPE plus the family's special tokens."""
    import tokenizers

    base = tmp_path_factory.mktemp("tok")
    train_tokenizer(["hello world " * 20, "What is 2+2? It is 4."], 300, base / "base")
    dirs = {}
    for name, spec in FAMILIES.items():
        d = base / name
        d.mkdir()
        tok = tokenizers.Tokenizer.from_file(str(base / "base" / "tokenizer.json"))
        specials = [t for t in [spec["bos_token"], spec["eos_token"]] + spec["extra"] if t]
        tok.add_special_tokens(specials)
        tok.save(str(d / "tokenizer.json"))
        config = {"bos_token": spec["bos_token"], "eos_token": spec["eos_token"],
                  "chat_template": (TEMPLATES / f"{name}.jinja").read_text(),
                  "tokenizer_class": "PreTrainedTokenizerFast"}
        (d / "tokenizer_config.json").write_text(json.dumps(config))
        dirs[name] = d
    return dirs


def _messages(system):
    return ([SYSTEM] if system else []) + TURNS


def test_render_and_ids_match_transformers(family_dirs):
    cases = [{"dir": str(family_dirs[n]), "messages": _messages(s), "gen": g,
              "tools": TOOLS if t else None} for n, s, g, t in CASES]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([str(REF_PYTHON), "-c", REF_SCRIPT], input=json.dumps(cases),
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refs = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = 0
    for (name, system, gen, tools), case, ref in zip(CASES, cases, refs):
        tok = load_tokenizer(family_dirs[name])
        template = ChatTemplate.from_tokenizer(tok)
        if "error" in ref:
            errors += 1
            assert name == "gemma" and system, ref  # only Gemma refuses (system messages)
            with pytest.raises(CadenzaError, match="System role not supported"):
                template.render(case["messages"], add_generation_prompt=gen)
            continue
        text = template.render(case["messages"], add_generation_prompt=gen, tools=case["tools"])
        assert text == ref["text"], (name, system, gen, tools)
        ids = tok.encode(text, add_bos=True)
        assert ids == ref["ids"], (name, system, gen, tools)
        if tok.bos_id is not None:
            assert ids.count(tok.bos_id) == 1  # the template's BOS is not doubled
    assert errors == 2


@pytest.mark.parametrize("name", ["llama3", "chatml", "gemma"])
def test_assistant_spans_cover_exactly_the_replies(family_dirs, name):
    tok = load_tokenizer(family_dirs[name])
    template = ChatTemplate.from_tokenizer(tok)
    text, spans = template.render_with_spans(TURNS)
    pieces = [text[a:b] for a, b in spans]
    end = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "gemma": "<end_of_turn>"}[name]
    reply = " It is 4. " if name == "chatml" else "It is 4."  # llama3 and gemma trim content
    assert pieces == [f"{reply}{end}", f"6{end}"]
    bounds = [0] + [x for span in spans for x in span] + [len(text)]
    outside = "".join(text[a:b] for a, b in zip(bounds[::2], bounds[1::2]))
    assert "What is 2+2?" in outside and "It is 4" not in outside


def test_template_errors_are_clear(family_dirs):
    with pytest.raises(CadenzaError, match="syntax error"):
        ChatTemplate("{% for m in messages %}")
    # a template that rewrites earlier turns once more turns follow cannot yield masks
    unstable = ("{% for m in messages %}{% if loop.last %}{{ m.content }}</s>"
                "{% else %}[{{ m.role }}]{% endif %}{% endfor %}")
    with pytest.raises(CadenzaError, match="prefix-stable"):
        ChatTemplate(unstable, {"eos_token": "</s>"}).render_with_spans(TURNS)
    no_eot = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(CadenzaError, match="end-of-turn"):
        ChatTemplate(no_eot, {"eos_token": "</s>"}).render_with_spans(TURNS)
    sandbox = "{{ ''.__class__.__mro__ }}"
    with pytest.raises(Exception, match="unsafe|SecurityError|access"):
        ChatTemplate(sandbox).render(TURNS)
