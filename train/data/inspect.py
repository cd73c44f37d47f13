"""What ``cadenza data inspect`` prints: formatted examples with masked tokens marked,
and counts."""

import json

import numpy as np

from cadenza.train.data import builders
from cadenza.train.data.formatting import (
    Formatter,
    decode_record,
    pair_budget,
    split_into_pieces,
)
from cadenza.train.data.pipeline import build_iterator, resolve_tokenizer
from cadenza.train.data.records import Problems

MASK_OPEN, MASK_CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧ around tokens without loss


def mark_masked(tokenizer, ids, mask) -> str:
    """Text of ``ids`` with every run of untrained tokens (``mask`` false) inside ⟦ ⟧."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or bool(mask[i]) != bool(mask[start]):
            text = tokenizer.decode(ids[start:i], skip_special_tokens=False)
            out.append(text if mask[start] else f"{MASK_OPEN}{text}{MASK_CLOSE}")
            start = i
    return "".join(out)


def _long_policy(truncation: str, record: dict, ids: list, seq_len: int) -> str:
    """What ``truncation`` does to an example of ``ids`` longer than ``seq_len`` positions
    ("" if it fits)."""
    positions = len(ids) - 1
    if positions <= seq_len:
        return ""
    if truncation == "chunk" and not record["messages"]:
        sizes = [len(p["inputs"]) for p in
                 split_into_pieces({"inputs": np.arange(positions)}, seq_len)]
        return f"; chunked into {len(sizes)} pieces of " + "+".join(map(str, sizes)) + \
            " positions"
    if truncation == "truncate":
        return f"; truncated to {seq_len} of {positions} positions"
    return f"; dropped ({positions} positions > seq_len {seq_len})"


def _pair_lines(formatter, record, i, seq_len) -> list[str]:
    """Both sides of preference example ``i``, masked tokens marked, and what a row of
    ``seq_len`` positions does to the pair."""
    sides = [formatter.side_tokens_and_mask(record, s) for s in ("chosen", "rejected")]
    lengths = [len(ids) - 1 for ids, _ in sides]
    kept = pair_budget(*lengths, seq_len)
    fate = "" if kept == tuple(lengths) else (
        f"; truncated to {kept[0]} + {kept[1]}" if formatter.truncation == "truncate"
        else "; dropped (longer than seq_len)")
    lines = [f"-- example {i} ({record['source']}): preference pair of {lengths[0]} + "
             f"{lengths[1]} positions{fate}"]
    for side, (ids, mask) in zip(("chosen", "rejected"), sides):
        lines.append(f"[{side}] {len(ids)} tokens, {sum(mask)} trained")
        lines.append(mark_masked(formatter.tokenizer, ids, mask))
    return lines


def inspect_data(config, *, examples: int = 3, split: str = "train", batches: int = 4) -> str:
    """A report on ``config``'s data: per source the build counts and the first
    ``examples`` formatted examples (full token stream, BOS included, masked
    tokens in ⟦ ⟧), then counts over ``batches`` batches of the real iterator
    (rows filled, trained tokens, truncated/chunked/skipped by reason). With
    ``data.truncation=chunk`` an example longer than ``seq_len`` shows its pieces."""
    data = config.data
    tokenizer = resolve_tokenizer(config)
    lines = [f"tokenizer: {tokenizer.source} (vocab {tokenizer.vocab_size}, bos={tokenizer.bos_id},"
             f" eos={tokenizer.eos_id}, pad={tokenizer.pad_id})",
             f"legend: text inside {MASK_OPEN} {MASK_CLOSE} has no loss; the rest is trained"]
    for source in data.sources():
        ds, shards, report = builders.open_split(source, data, split)
        lines.append(f"\n== {source.format} {source.path or source.name or ''} "
                     f"(weight {source.weight:g}): {len(ds)} records in {split!r}, "
                     f"{len(shards)} file(s)")
        if report:
            lines.append("build: " + json.dumps({k: report[k] for k in
                                                 ("read", "written", "skipped", "splits")}))
        seq = config.train.seq_len
        formatter = Formatter(tokenizer, seq, config.model.vocab_size,
                              data.truncation, Problems("skip"), data.end_of_turn)
        for i in range(min(examples, len(ds))):
            record = decode_record(ds[i])
            if "chosen" in record:
                lines.extend(_pair_lines(formatter, record, i, seq))
                continue
            ids, weights = formatter.tokens_and_weights(record)
            mask = [w > 0 for w in weights]
            lines.append(f"-- example {i} ({record['source']}): {len(ids)} tokens, "
                         f"{sum(mask)} trained{_long_policy(data.truncation, record, ids, seq)}"
                         + (f", loss weights {record['weights']}" if record.get("weights")
                            else "")
                         + (f", {len(record['weight_spans'])} weight spans"
                            if record.get("weight_spans") else ""))
            lines.append(mark_masked(tokenizer, ids, mask))
    it = build_iterator(config, split=split)
    filled = trained = total = packed = 0
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:
            break
        filled += int((b["segment_ids"] > 0).sum())
        trained += int((b["loss_mask"] > 0).sum())
        total += b["segment_ids"].size
        packed += int(np.max(b["segment_ids"], axis=1).sum())
    stats = it.stats()
    lines.append(f"\n== iterator: {batches} batches of {config.train.batch_size} x "
                 f"{config.train.seq_len}: {filled}/{total} positions filled "
                 f"({filled / max(total, 1):.1%}) by {packed} segments, {trained} trained")
    lines.append("counts: " + json.dumps(stats))
    return "\n".join(lines)
