"""SFT loss shaping: Masked Thought (response inputs masked in training steps only,
prompts never, the masked fraction ~ p) and the task-balanced loss over a mixture (one
source = today's loss bit for bit)."""

import jax
import jax.numpy as jnp
import numpy as np

from cadenza.config import load_config
from cadenza.train.loss_shaping import balance_sources, mask_responses, response_inputs
from cadenza.train.mesh import batch_sharding, make_mesh, replicated
from cadenza.train.optim import make_optimizer, make_schedule
from cadenza.train.state import init_state, state_shardings
from cadenza.train.step import make_train_step, token_losses
from cadenza.train.task import full_model_task


def chat_batch(rows=8, t=128, seed=0):
    """Rows of packed chat-like segments: a prompt (untrained) then a response (trained)."""
    rng = np.random.default_rng(seed)
    seg, mask, pos = (np.zeros((rows, t), np.int32) for _ in range(3))
    for r in range(rows):
        start, s = 0, 1
        while start < t - 8:
            prompt, reply = rng.integers(2, 12), rng.integers(2, 20)
            end = min(start + prompt + reply, t)
            seg[r, start:end], pos[r, start:end] = s, np.arange(end - start)
            mask[r, start + prompt - 1:end] = 1     # targets from the last prompt token on
            start, s = end, s + 1
    mask = mask.astype(np.float32)
    return {"inputs": jnp.asarray(rng.integers(3, 500, (rows, t)), jnp.int32),
            "targets": jnp.asarray(rng.integers(3, 500, (rows, t)), jnp.int32),
            "loss_mask": jnp.asarray(mask), "segment_ids": jnp.asarray(seg),
            "positions": jnp.asarray(pos)}


def test_masked_thought_masks_about_p_of_the_responses_and_no_prompt():
    batch = chat_batch()
    assert mask_responses(batch, jax.random.key(0), 0.0, 0) is batch      # p = 0: untouched
    response = np.asarray(response_inputs(batch["loss_mask"], batch["segment_ids"]))
    # an input is a response token iff it is the target of a trained position before it
    expected = np.zeros_like(response)
    expected[:, 1:] = ((np.asarray(batch["loss_mask"])[:, :-1] > 0)
                       & (np.asarray(batch["segment_ids"])[:, 1:]
                          == np.asarray(batch["segment_ids"])[:, :-1]))
    np.testing.assert_array_equal(response, expected & (np.asarray(batch["segment_ids"]) > 0))
    p, n = 0.2, int(response.sum())
    out = mask_responses(batch, jax.random.key(1), p, 0)
    changed = np.asarray(out["inputs"] != batch["inputs"])
    assert not (changed & ~response).any()                  # prompts never masked
    assert (np.asarray(out["inputs"])[changed] == 0).all()
    for k in ("targets", "loss_mask", "segment_ids", "positions"):
        assert out[k] is batch[k]
    sd = np.sqrt(n * p * (1 - p))          # binomial: 4.5 sd either side (about 1 in 10^5)
    assert abs(changed.sum() - n * p) < 4.5 * sd, (changed.sum(), n)


def test_balanced_loss_is_the_mean_of_the_sources_token_means():
    batch = chat_batch(rows=4, t=64, seed=1)
    ce = jax.random.uniform(jax.random.key(2), batch["loss_mask"].shape)
    one = balance_sources({**batch, "source_ids": jnp.zeros_like(batch["segment_ids"])}, 1)
    np.testing.assert_array_equal(one["loss_mask"], batch["loss_mask"])   # bit for bit
    assert "source_ids" not in one
    src = jnp.asarray(np.random.default_rng(3).integers(0, 3, batch["segment_ids"].shape))
    src = jnp.where(src == 2, 3, src)                  # source 2 absent, 3 of 4 present
    mask = batch["loss_mask"]
    three = balance_sources({**batch, "source_ids": src}, 4)
    means = [float((ce * mask * (src == s)).sum() / (mask * (src == s)).sum()) for s in (0, 1, 3)]
    np.testing.assert_allclose(float((ce * three["loss_mask"]).sum() / three["loss_mask"].sum()),
                               np.mean(means), rtol=1e-5)
    np.testing.assert_allclose(three["loss_mask"].sum(), mask.sum(), rtol=1e-6)


def test_train_step_applies_the_shaping():
    config = load_config(None, ["train.batch_size=4", "train.seq_len=64", "mesh.data=1"],
                         preset="tiny")
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    rules = config.mesh.rules()
    task, opt = full_model_task(config.model), make_optimizer(config.train)
    shardings = state_shardings(task, opt, mesh, rules)
    rows = batch_sharding(mesh, rules)
    batch = chat_batch(rows=4, t=64, seed=4)
    src = jnp.asarray(np.arange(64)[None, :].repeat(4, 0) % 2, jnp.int32)
    params = init_state(task, opt, 0, mesh, rules, shardings).params
    logits = jax.jit(lambda p, b: task.apply(p, {}, b, None))(params, batch)
    ce = [token_losses(logits, batch["targets"], batch["loss_mask"] * (src == s))
          for s in (0, 1)]
    balanced = np.mean([float(c / n) for _, c, n in ce])
    plain = float(ce[0][1] + ce[1][1]) / float(ce[0][2] + ce[1][2])
    losses = {}
    for name, prob, b in (("balanced", 0.0, {**batch, "source_ids": src}),
                          ("masked", 0.5, batch)):
        step = make_train_step(task, opt, make_schedule(config.train), microbatches=2,
                               z_loss=0.0, rules=rules, state_shardings=shardings,
                               frozen_shardings={}, batch_sharding=rows,
                               metric_sharding=replicated(mesh), response_mask_prob=prob,
                               response_mask_id=0, num_sources=2)
        with jax.set_mesh(mesh):
            state = init_state(task, opt, 0, mesh, rules, shardings)
            losses[name] = float(step(state, {}, b)[1]["loss"])
    np.testing.assert_allclose(losses["balanced"], balanced, rtol=1e-5)
    assert abs(balanced - plain) > 1e-4
    assert abs(losses["masked"] - plain) > 1e-3     # masked inputs change the loss


def test_pipeline_tags_each_position_with_its_source(tmp_path, pref_files):
    from cadenza.train.data import build_iterator

    for name, word in (("a", "alpha"), ("b", "beta gamma")):
        (tmp_path / f"{name}.jsonl").write_text("".join(f'{{"text": "{word} {i}"}}\n'
                                                        for i in range(20)))
    mixture = (f"data.mixture=[{{format: text, path: {tmp_path / 'a.jsonl'}, weight: 0.5}}, "
               f"{{format: text, path: {tmp_path / 'b.jsonl'}, weight: 0.5}}]")
    config = load_config(None, [mixture, "data.balance=sources", f"data.data_dir={tmp_path}",
                                f"data.tokenizer={pref_files / 'tok'}", "train.seq_len=32",
                                "train.batch_size=4"], preset="tiny")
    b = next(build_iterator(config))
    src, seg = b["source_ids"], b["segment_ids"]
    assert set(np.unique(src[seg > 0])) == {0, 1}
    for row in range(4):       # one source per packed example
        for s in np.unique(seg[row][seg[row] > 0]):
            assert len(np.unique(src[row][seg[row] == s])) == 1


def test_record_weights_are_stored_and_become_the_loss_mask(tmp_path, pref_files):
    import json

    from cadenza.train.data import build_iterator
    from cadenza.train.data.builders import open_split
    from cadenza.train.data.formatting import decode_record

    turns = [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "say hello"}, {"role": "assistant", "content": "hi"}]
    lines = [{"messages": turns}, {"messages": turns, "weights": [1, 1]},
             {"messages": turns, "weights": [2.5, 0]}, {"messages": turns[:2], "weights": 0.5},
             {"messages": turns, "weights": [1]}, {"messages": turns, "weights": -1},
             {"messages": turns, "weights": "1"}]
    (tmp_path / "w.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    config = load_config(None, [f"data.data_dir={tmp_path}", "data.format=messages",
                                f"data.path={tmp_path / 'w.jsonl'}", "data.heldout_fraction=0",
                                f"data.tokenizer={pref_files / 'tok'}", "train.seq_len=32",
                                "train.batch_size=4", "data.packing=false",
                                "data.shuffle_window=0"], preset="tiny")
    ds, _, report = open_split(config.data.sources()[0], config.data, "train")
    assert report["skipped"] == {"bad_weights": 3} and report["written"] == 4
    stored = {decode_record(ds[i])["source"].rsplit(":", 1)[1]: decode_record(ds[i])["weights"]
              for i in range(4)}
    assert stored == {"1": [], "2": [1, 1], "3": [2.5, 0], "4": [0.5]}
    b = next(build_iterator(config))   # the 4 records, one per row (stored order)
    masks = sorted(np.asarray(b["loss_mask"]), key=lambda m: (m.max(), m.sum()))
    one, plain, again, weighted = masks
    np.testing.assert_array_equal(plain, again)                  # weights 1: today's mask
    assert set(np.unique(one)) == {0.0, 0.5}
    turn = np.cumsum(np.diff(np.r_[0, plain]) > 0) * (plain > 0)  # 1, 2: the assistant turns
    assert set(np.unique(turn)) == {0, 1, 2}
    np.testing.assert_array_equal(weighted, np.where(turn == 1, 2.5, 0.0))  # 0: masked
    masks = np.stack([weighted] * 4)
    # the loss is the weighted token mean: [2.5, 0]'s is the mean over the first turn alone
    logits = jax.random.normal(jax.random.key(0), (4, 32, 300))
    _, ce, n = token_losses(logits, b["targets"], masks)
    _, ce1, n1 = token_losses(logits, b["targets"], np.float32(turn == 1) * np.ones((4, 1)))
    np.testing.assert_allclose(float(ce / n), float(ce1 / n1), rtol=1e-6)


def _span_config(tmp_path, pref_files, lines, fmt="messages", *extra):
    import json

    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return load_config(None, [f"data.data_dir={tmp_path}", f"data.format={fmt}",
                              f"data.path={tmp_path / 's.jsonl'}", "data.heldout_fraction=0",
                              f"data.tokenizer={pref_files / 'tok'}", "train.seq_len=48",
                              "data.shuffle_window=0", *extra], preset="tiny")


def test_weight_spans_become_per_token_weights(tmp_path, pref_files):
    from cadenza.train.data.builders import open_split
    from cadenza.train.data.formatting import Formatter, decode_record
    from cadenza.train.data.pipeline import resolve_tokenizer
    from cadenza.train.data.records import Problems

    reply = "hello say hi"
    turns = [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": reply}]

    def spans(*s):
        return [{"messages": [turns[0], {**turns[1], "weight_spans": [
            {"begin_offset": b, "end_offset": e, "weight": w} for b, e, w in s]}]}]

    lines = [{"messages": turns}, *spans((0, len(reply), 1)), *spans((5, 12, 0)),
             *spans((0, 5, 3), (6, 9, 0.5)),
             {"instruction": "say hi", "output": reply,                       # alpaca
              "weight_spans": [{"begin_offset": 5, "end_offset": 12, "weight": 0}]}]
    config = _span_config(tmp_path, pref_files, lines[:4])
    ds, _, report = open_split(config.data.sources()[0], config.data, "train")
    records = sorted((decode_record(ds[i]) for i in range(len(ds))), key=lambda r: r["source"])
    assert records[2]["weight_spans"] == [{"turn": 0, "begin": 5, "end": 12, "weight": 0.0}]
    fmt = Formatter(resolve_tokenizer(config), 48, 512, "truncate", Problems("stop"))
    plain, ones, zero, mixed = (fmt.tokens_and_weights(r) for r in records)
    assert plain == ones                                       # all-1 spans: today's weights
    ids, w = zero
    text, (turn,) = fmt.template.render_with_spans(records[2]["messages"])
    _, offsets = fmt.tokenizer.encode_with_offsets(text, add_bos=True)
    tok_turns = [0 if a < turn[1] and b > turn[0] else -1 for a, b in offsets]
    start = text.find(reply, *turn)
    inside = [a >= start + 5 and b <= start + 12 for a, b in offsets]   # " say", " hi"
    assert all(x == 0.0 for x, i in zip(w, inside) if i) and any(inside)    # 0: masked
    assert [x for x, i, t in zip(w, inside, tok_turns) if not i and t >= 0] \
        == [1.0] * sum(not i and t >= 0 for i, t in zip(inside, tok_turns))
    assert set(mixed[1]) >= {3.0, 0.625}    # " say" (chars 5-8): (1 + 3 * 0.5) / 4
    # a 0-weight span trains like the mask that drops those tokens
    logits = jax.random.normal(jax.random.key(0), (1, len(ids) - 1, 300))
    targets = jnp.asarray([ids[1:]])
    _, ce, n = token_losses(logits, targets, jnp.asarray([w[1:]]))
    kept = [float(t >= 0 and not i) for t, i in zip(tok_turns, inside)]
    _, ce1, n1 = token_losses(logits, targets, jnp.asarray([kept[1:]]))
    assert float(ce) == float(ce1) and float(n) == float(n1)
    # alpaca's top-level spans weigh the output the same way
    alpaca = _span_config(tmp_path / "a", pref_files, lines[4:], "alpaca")
    ads, _, _ = open_split(alpaca.data.sources()[0], alpaca.data, "train")
    assert fmt.tokens_and_weights(decode_record(ads[0]))[1] == w


def test_bad_weight_spans_are_counted(tmp_path, pref_files):
    from cadenza.train.data.builders import open_split

    turns = [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hello"}]

    def on(i, spans):
        return {"messages": [{**t, "weight_spans": spans} if k == i else t
                             for k, t in enumerate(turns)]}

    good = [{"begin_offset": 0, "end_offset": 2, "weight": 2}]
    lines = [on(1, good), on(1, [{"begin_offset": 0, "end_offset": 6, "weight": 1}]),  # too long
             on(1, good + [{"begin_offset": 1, "end_offset": 3, "weight": 1}]),        # overlap
             on(1, [{"begin_offset": 0, "end_offset": 2, "weight": -1}]),
             on(1, [{"begin_offset": 0, "end_offset": 2}]), on(1, "0:2"),
             on(0, good)]                                                            # user turn
    config = _span_config(tmp_path, pref_files, lines)
    _, _, report = open_split(config.data.sources()[0], config.data, "train")
    assert report["written"] == 1 and report["skipped"] == {"bad_weights": 6}
    text = _span_config(tmp_path / "t", pref_files, [{"text": "hi", "weight_spans": good},
                                                     {"text": "hi"}], "text")
    _, _, report = open_split(text.data.sources()[0], text.data, "train")
    assert report["skipped"] == {"bad_weights": 1}


def test_packing_keeps_weight_spans_aligned(tmp_path, pref_files):
    from cadenza.train.data import build_iterator
    from cadenza.train.data.builders import open_split
    from cadenza.train.data.formatting import Formatter, decode_record
    from cadenza.train.data.pipeline import resolve_tokenizer
    from cadenza.train.data.records import Problems

    lines = [{"messages": [{"role": "user", "content": "say " * k + "hi"},   # unique
                           {"role": "assistant", "content": "hello hi say",
                            "weight_spans": [{"begin_offset": k % 5, "end_offset": 7,
                                              "weight": 0.5 * k}]}]} for k in range(6)]
    config = _span_config(tmp_path, pref_files, lines, "messages", "train.batch_size=2",
                          "data.packing=true")
    ds, _, _ = open_split(config.data.sources()[0], config.data, "train")
    fmt = Formatter(resolve_tokenizer(config), 48, 512, "truncate", Problems("stop"))
    examples = {}
    for i in range(len(ds)):
        ex = fmt(decode_record(ds[i]))
        examples[tuple(ex["targets"])] = ex["loss_mask"]
    b = next(build_iterator(config))
    seen = 0
    for row in range(2):
        seg = np.asarray(b["segment_ids"][row])
        for s in np.unique(seg[seg > 0]):
            at = seg == s
            key = tuple(np.asarray(b["targets"][row])[at])
            np.testing.assert_array_equal(np.asarray(b["loss_mask"][row])[at], examples[key])
            seen += 1
    assert seen >= 3
