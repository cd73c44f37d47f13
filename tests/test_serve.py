"""Serving: the engine (continuous batching, per-row sampler data, speculative rounds) and
the OpenAI-compatible HTTP server on loopback. One small model, one engine per method;
prompts stay within one 16-token bucket so each engine compiles one insert program."""

import dataclasses
import http.client
import json
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest

from cadenza.decode import DecodeConfig, generate
from cadenza.decode.config import SamplingSpec, with_fields
from cadenza.decode.engine import Engine, Request
from cadenza.decode.sampling import RowSampling, log_probs
from cadenza.decode.speculative import DraftModel
from cadenza.errors import CadenzaError

# prompts of different lengths (repeats give prompt lookup something to find), token limits
PROMPTS = [[1, 5, 9, 13, 5, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
           [7], [1, 300, 2, 45, 9, 300, 2], [3, 3, 3, 3], [1, 60, 61, 62, 60, 61]]
LIMITS = [6, 9, 4, 12, 3, 8]


@pytest.fixture(scope="module")
def expected(small_lm):
    """Each prompt's greedy tokens from generate (one batch; greedy rows are independent,
    and the first n tokens of a longer greedy run are the run with limit n)."""
    _, model, params = small_lm
    res = generate(model, params, PROMPTS, DecodeConfig(max_new_tokens=max(LIMITS),
                                                        ignore_eos=True))
    return [ids[:n] for ids, n in zip(res.token_ids, LIMITS)]


@pytest.fixture(scope="module")
def tokenizer(pref_files):
    from cadenza.models.tokenizer import load_tokenizer

    return load_tokenizer(pref_files / "tok")


@pytest.fixture(scope="module")
def engine(small_lm, tokenizer):
    _, model, params = small_lm
    eng = Engine.build(model, params, DecodeConfig(), slots=3, max_len=48,
                       tokenizer=tokenizer).start()
    yield eng
    eng.close()


def _greedy(i, **kw):
    return Request(tuple(PROMPTS[i]), max_tokens=LIMITS[i], ignore_eos=True, **kw)


def _run_all(eng, stream_every=2):
    """Submit every prompt at once (more than the slots); stream every other one."""
    handles = [eng.submit(_greedy(i)) for i in range(len(PROMPTS))]
    streamed = {}
    for i, h in enumerate(handles):
        if i % stream_every == 0:
            deltas = list(h)
            streamed[i] = [t for d in deltas for t in d.token_ids]
            assert sum(d.finished for d in deltas) == 1 and deltas[-1].finished
            handles[i] = deltas[-1].result
        else:
            handles[i] = h.result(timeout=300)
    return handles, streamed


def test_concurrent_requests_equal_generate_whatever_the_neighbours(engine, expected):
    results, streamed = _run_all(engine)
    assert [r.token_ids[0] for r in results] == expected
    assert all(streamed[i] == expected[i] for i in streamed)     # deltas: none lost or twice
    assert all(r.finish_reasons == ["length"] for r in results)
    assert all(len(r.logprobs[0]) == len(r.token_ids[0]) for r in results)
    m = engine.metrics()
    assert m["slots_busy"] == 0 and m["queue_depth"] == 0 and m["failure"] is None


def test_quantised_model_and_int8_cache_serve_as_generate_decodes_them(small_lm):
    """cadenza serve --quantize int8 --kv-cache int8: the engine over the quantised model
    and an int8 cache gives generate's tokens for the same model and cache."""
    from cadenza.decode.cli import quantized_model

    cfg, _, params = small_lm
    qcfg, qparams = quantized_model(cfg, params, "int8", None, adapters=False)
    model = type(small_lm[1])(qcfg.model)
    config = DecodeConfig(kv_cache="int8")
    res = generate(model, qparams, PROMPTS, dataclasses.replace(
        config, max_new_tokens=max(LIMITS), ignore_eos=True))
    want = [ids[:n] for ids, n in zip(res.token_ids, LIMITS)]
    eng = Engine.build(model, qparams, config, slots=2, max_len=48).start()
    try:
        results, _ = _run_all(eng)
        assert [r.token_ids[0] for r in results] == want
    finally:
        eng.close()
    with pytest.raises(CadenzaError, match="adapters attach to a float base"):
        quantized_model(cfg, params, "int8", None, adapters=True)


@pytest.mark.parametrize("method", ["ngram", "speculative"])
def test_speculative_engines_equal_plain(small_lm, expected, method):
    cfg, model, params = small_lm
    extra = {"drafter": DraftModel(cfg.model, 3), "draft_params": (params, None)} if (
        method == "speculative") else {}
    eng = Engine.build(model, params, with_fields(DecodeConfig(method=method),
                                                  speculative__gamma=3),
                       slots=2, max_len=48, **extra).start()
    try:
        results, _ = _run_all(eng)
        assert [r.token_ids[0] for r in results] == expected
        m = eng.metrics()
        assert m["method"] == method and m["tokens_per_slot_step"] >= 1.0
    finally:
        eng.close()


def test_stop_ids_limits_and_sampled_rows_share_the_batch(engine, expected):
    stop = expected[3][4]
    first = expected[3].index(stop)
    stopped = engine.submit(_greedy(3, stop_token_ids=(stop,)))
    sampled = [engine.submit(Request(tuple(PROMPTS[0]), max_tokens=5, temperature=1.0,
                                     top_k=5, top_p=0.9, min_p=0.05, seed=s,
                                     ignore_eos=True)) for s in (1, 2)]
    plain = engine.submit(_greedy(1))
    r = stopped.result(timeout=300)
    assert r.token_ids[0] == expected[3][:first + 1] and r.finish_reasons == ["stop_token"]
    assert plain.result(timeout=300).token_ids[0] == expected[1]
    for h in sampled:
        s = h.result(timeout=300)
        assert len(s.token_ids[0]) == 5 and all(lp <= 0 for lp in s.logprobs[0])


def test_stop_strings_cut_the_text_as_generate_does(engine):
    ask = Request("say hi hello", max_tokens=12, temperature=0, ignore_eos=True)
    full = engine.submit(ask).result(timeout=300).text[0]
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert len(stop) == 2
    r = engine.submit(Request("say hi hello", max_tokens=12, temperature=0, ignore_eos=True,
                              stop=(stop,))).result(timeout=300)
    assert r.text[0] == full[:full.index(stop)] and r.finish_reasons == ["stop_string"]


def test_cancel_frees_the_slot(engine, expected):
    h = engine.submit(Request((1, 2, 3), max_tokens=40, ignore_eos=True))
    next(iter(h))                     # it is running
    h.cancel()
    last = [d for d in h][-1]
    assert last.finished and last.finish_reason == "cancelled"
    assert engine.submit(_greedy(2)).result(timeout=300).token_ids[0] == expected[2]
    assert engine.metrics()["slots_busy"] == 0


@pytest.fixture(scope="module")
def bank(small_lm):
    """Two LoRA adapters with random non-zero factors (``a``: rank 2 on q/v, ``b``: rank 4
    on every projection) stacked in a bank, and each one's merged params."""
    import dataclasses

    from cadenza.decode.multi_lora import stack_adapters
    from cadenza.train import peft
    from cadenza.train.peft import merge

    cfg, _, params = small_lm
    loaded, merged = [], {}
    for name, seed, rank, targets in (("a", 1, 2, ".*(q|v)_proj"), ("b", 2, 4, ".*_proj")):
        c = dataclasses.replace(cfg, peft=dataclasses.replace(cfg.peft, method="lora",
                                                              rank=rank, targets=targets))
        pm, trainable, frozen = peft.prepare(c, params, jax.random.key(seed))
        leaves, tree = jax.tree.flatten(trainable)
        keys = jax.random.split(jax.random.key(seed + 10), len(leaves))
        trainable = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                              for x, k in zip(leaves, keys)])
        loaded.append((name, pm, trainable))
        merged[name] = merge.merge(pm, trainable, frozen)
    return stack_adapters(cfg.model, loaded), merged


def test_adapters_in_one_batch_equal_their_merged_models(small_lm, bank, expected):
    _, model, params = small_lm
    stacked, merged = bank
    config = DecodeConfig(max_new_tokens=max(LIMITS), ignore_eos=True)
    want = {None: expected}
    for name, p in merged.items():
        want[name] = [ids[:n] for ids, n in zip(generate(model, p, PROMPTS, config).token_ids,
                                                 LIMITS)]
    assert want["a"] != want[None] and want["b"] != want["a"]
    eng = Engine.build(stacked.forward, stacked.params(params, []), DecodeConfig(), slots=3,
                       max_len=48, adapters={n: i for i, n in enumerate(stacked.names)}).start()
    try:
        names = [None, "a", "b", "b", None, "a"]
        handles = [eng.submit(_greedy(i, adapter=n)) for i, n in enumerate(names)]
        got = [h.result(timeout=300).token_ids[0] for h in handles]
        assert got == [want[n][i] for i, n in enumerate(names)]
    finally:
        eng.close()


@pytest.mark.parametrize("cancel", [True, False])
def test_close_cancels_or_finishes_what_runs(small_lm, tokenizer, cancel):
    _, model, params = small_lm      # the module engine's programs: nothing compiles
    eng = Engine.build(model, params, DecodeConfig(), slots=3, max_len=48,
                       tokenizer=tokenizer).start()
    h = eng.submit(Request((1, 2, 3), max_tokens=40, ignore_eos=True))
    next(iter(h))
    eng.close(cancel=cancel)
    last = [d for d in h][-1]
    assert last.finish_reason == ("cancelled" if cancel else "length")
    assert cancel or len(last.result.token_ids[0]) == 40
    with pytest.raises(RuntimeError, match="shutting down"):
        eng.submit(Request((1, 2)))


@pytest.mark.parametrize("fields, where", [
    ({"prompt": ()}, "prompts"), ({"prompt": (1, 999)}, "prompts"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 60}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"), ({"top_k": 600}, "top_k"),
    ({"top_p": 0.0}, "top_p"), ({"min_p": 1.0}, "min_p"), ({"adapter": "x"}, "adapter"),
    ({"stop_token_ids": (9999,)}, "stop_token_ids"), ({"seed": 2**40}, "seed"),
    ({"temperature": float("nan")}, "temperature"),
])
def test_bad_requests_are_refused_on_submission(engine, fields, where):
    before = engine.metrics()["submitted"]
    with pytest.raises(CadenzaError, match=where):
        engine.submit(Request(**{"prompt": (1, 2), **fields}))
    assert engine.metrics()["submitted"] == before


def test_row_sampling_equals_the_static_spec_per_row():
    z = jax.random.normal(jax.random.key(1), (4, 50)) * 3
    settings = [(0.7, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.1), (0.9, 10, 0.9, 0.05)]
    fn = jax.jit(log_probs, static_argnums=1)
    got = fn(z, SamplingSpec(), None, RowSampling.of(*zip(*settings)))
    for i, (t, k, p, m) in enumerate(settings):
        want = fn(z[i:i + 1], SamplingSpec("sample", t, k, p, m))
        np.testing.assert_allclose(got[i:i + 1], want, rtol=1e-5, atol=1e-5)
    greedy = fn(z, SamplingSpec(), None, RowSampling.of([0.0] * 4, [3] * 4, [0.5] * 4,
                                                        [0.5] * 4))
    np.testing.assert_allclose(greedy, jax.nn.log_softmax(z), rtol=1e-6, atol=1e-6)


# --- HTTP ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(engine, tokenizer):
    from cadenza.models.chat_template import ChatTemplate
    from cadenza.serve.app import BackgroundServer, make_app

    app = make_app(engine, "tiny", template=ChatTemplate.from_tokenizer(tokenizer))
    with BackgroundServer(app) as srv:
        yield srv.url


def _post(url, path, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _get(url, path):
    with urllib.request.urlopen(url + path, timeout=60) as r:
        return json.loads(r.read())


def _events(text):
    lines = [ln[len("data: "):] for ln in text.split("\n\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def test_http_concurrent_streamed_and_plain_requests_equal_generate(server, expected):
    out = [None] * len(PROMPTS)

    def call(i):
        body = {"model": "tiny", "prompt": PROMPTS[i], "max_tokens": LIMITS[i],
                "temperature": 0, "ignore_eos": True, "stream": i % 2 == 0, "logprobs": 1}
        if i == 0:
            body["stream_options"] = {"include_usage": True}
        status, text = _post(server, "/v1/completions", body)
        assert status == 200, text
        if i % 2 == 0:
            chunks = _events(text)
            if i == 0:
                assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
                    "prompt_tokens": len(PROMPTS[0]), "completion_tokens": LIMITS[0],
                    "total_tokens": len(PROMPTS[0]) + LIMITS[0]}
                chunks = chunks[:-1]
            assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
            out[i] = [t for c in chunks for t in c["choices"][0]["token_ids"]]
        else:
            choice = json.loads(text)["choices"][0]
            assert len(choice["logprobs"]["token_logprobs"]) == LIMITS[i]
            out[i] = choice["token_ids"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert out == expected
    chat = json.loads(_post(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "say hi"}], "max_tokens": 4,
        "temperature": 0})[1])
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == (
        "assistant") and chat["usage"]["completion_tokens"] >= 1
    assert [m["id"] for m in _get(server, "/v1/models")["data"]] == ["tiny"]
    assert _get(server, "/health")["status"] == "ok"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", {"model": "nope", "prompt": [1, 2]}, "model"),
    ("/v1/completions", {"prompt": list(range(1, 48))}, "max_tokens"),
    ("/v1/completions", {"prompt": [1, 2], "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": [1, 2], "top_p": "high"}, "top_p"),
    ("/v1/completions", {"prompt": [1, 2], "n": 2}, "n"),
    ("/v1/completions", {"prompt": [1, 2], "frobnicate": 1}, "frobnicate"),
    ("/v1/completions", {"prompt": [1, 2], "stream_options": {"include_usage": True}},
     "stream_options"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages"),
])
def test_http_bad_requests_get_400_and_the_server_keeps_serving(server, expected, path, body,
                                                                param):
    raw = body if isinstance(body, bytes) else None
    status, text = _post(server, path, body, raw=raw)
    assert status == 400, text
    err = json.loads(text)["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    status, text = _post(server, "/v1/completions", {"prompt": PROMPTS[2], "max_tokens": 4,
                                                     "temperature": 0, "ignore_eos": True})
    assert status == 200 and json.loads(text)["choices"][0]["token_ids"] == expected[2]


def test_http_disconnect_mid_stream_frees_the_slot(server):
    before = _get(server, "/metrics")["cancelled"]
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(
        {"prompt": [1, 2, 3], "max_tokens": 44, "temperature": 0, "ignore_eos": True,
         "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        m = _get(server, "/metrics")
        if m["cancelled"] > before and m["slots_busy"] == 0:
            break
        time.sleep(0.1)
    assert m["cancelled"] == before + 1 and m["slots_busy"] == 0


def test_the_documented_client_example_runs(server, capsys):
    import pathlib
    import re

    page = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    code = re.search(r"<!-- client example -->\s*```python\n(.*?)```", page, re.S).group(1)
    assert 'BASE = "http://127.0.0.1:8000/v1"' in code
    exec(code.replace("http://127.0.0.1:8000", server), {})
    assert "prompt_tokens" in capsys.readouterr().out


LM_EVAL_TASK = """task: cadenza_serve_smoke
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""
REF_PY = __import__("pathlib").Path(__file__).resolve().parents[1] / ".venv-ref" / "bin" / "python"


@pytest.mark.skipif(not REF_PY.exists(), reason="reference env (.venv-ref) not set up")
def test_lm_evaluation_harness_local_completions_against_the_server(server, tmp_path):
    """lm-evaluation-harness (reference env) evaluates a local task through the server's
    /v1/completions; its recorded responses equal the server's own greedy completions."""
    import subprocess

    rows = [{"prompt": "the quick", "target": " brown"}, {"prompt": "hello", "target": " world"}]
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "task.yaml").write_text(LM_EVAL_TASK.format(data=data))
    args = (f"model=tiny,base_url={server}/v1/completions,tokenizer_backend=none,"
            "tokenized_requests=False,num_concurrent=2,max_retries=1")
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path),
           "PATH": "/usr/bin:/bin"}
    run = subprocess.run([str(REF_PY), "-m", "lm_eval", "--model", "local-completions",
                          "--model_args", args, "--tasks", "cadenza_serve_smoke",
                          "--include_path", str(tmp_path), "--output_path",
                          str(tmp_path / "out"), "--log_samples"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "cadenza_serve_smoke" in run.stdout and "exact_match" in run.stdout
    samples = [json.loads(x) for f in (tmp_path / "out").rglob("samples_*.jsonl")
               for x in f.read_text().splitlines()]
    assert len(samples) == len(rows)
    for s in samples:
        prompt = s["doc"]["prompt"]
        status, body = _post(server, "/v1/completions",
                             {"model": "tiny", "prompt": prompt, "max_tokens": 6, "stop": ["\n"],
                              "temperature": 0})
        assert status == 200 and s["resps"][0][0] == json.loads(body)["choices"][0]["text"]
