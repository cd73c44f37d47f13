"""`cadenza compile`: AOT compile for real TPU topologies on this CPU (needs the tpu extra)."""

import re

from cadenza.cli import main
from cadenza.config import load_config
from cadenza.train.aot import compile_for_slice
from cadenza.train.topology import GIB, parse_slice


def test_tiny_config_compiles_for_v5e_2x2_and_reports_memory(capsys):
    assert main(["compile", "tiny_pretrain", "--topology", "v5e:2x2", "--decode"]) == 0
    out = capsys.readouterr().out
    for step in ("train", "decode"):
        assert f"FITS: {step} step on v5e-4 (v5e:2x2, 4 chips) needs" in out
    for line in ("arguments", "outputs", "temporaries", "total", "FLOPs per step"):
        assert line in out
    # unscanned layers: XLA's cost analysis counts a loop body once
    cfg = load_config("tiny_pretrain", ["train.batch_size=4", "train.seq_len=64",
                                        "model.scan_layers=false"])
    train, = compile_for_slice(cfg, parse_slice("v5e-4"))
    # data parallel: every chip holds all fp32 params and a quarter of the batch
    assert train.argument_bytes >= 4 * cfg.model.num_params()
    assert train.temp_bytes > 0 and train.total_bytes < GIB
    assert 0.8 < train.flops_per_chip * train.chips / train.analytic_flops < 1.25
    assert train.fits


def test_8b_full_finetune_on_v5e_4_does_not_fit(capsys):
    code = main(["compile", "tiny_pretrain", "--topology", "v5e-4", "model.preset=llama-3.1-8b",
                 "mesh.data=1", "mesh.fsdp=-1", "train.batch_size=4", "train.seq_len=512"])
    out = capsys.readouterr().out
    assert code == 1
    m = re.search(r"DOES NOT FIT: train step on v5e-4 \(v5e:2x2, 4 chips\) need at least "
                  r"([\d.]+) GiB, have 16 GiB HBM per chip", out)
    assert m, out
    # fp32 params + Adam moments sharded 4 ways: 8.03e9 * 12 bytes / 4 chips = 22.44 GiB
    assert re.search(r"arguments\s+22\.4\d\d GiB", out), out
    assert float(m.group(1)) > 16
