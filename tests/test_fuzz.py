"""The fuzz command, a short run (the 100,000-case figures are in the README), and the decoder's pixel budget."""

import random

import pytest
import torch

from diffo import pipeline

from diffo.tools import fuzz
from diffo.errors import BitstreamError


def test_short_fuzz_run_has_no_crash(embedded_model):
    report = fuzz.run(embedded_model, 300, seed=1)
    assert report["crashes"] == 0, report["crash_cases"][:1]
    assert sum(report["outcomes"].values()) == 300
    # the mutations reach past the checksum: some forged streams decode, some are refused deeper in
    assert report["outcomes"].get("decoded", 0) > 0 and report["outcomes"].get("BitstreamError", 0) > 0
    assert sum(v for k, v in report["mutators"].items() if k.endswith("+crc")) > 100
    assert report["slowest_s"] >= report["p99_s"] > 0 and report["peak_rss_mib"] > 0
    # the default budget lets every real seed decode (it bounds forged sizes, not the seeds)
    assert max(h * w for h, w in fuzz.SEED_SIZES) <= report["max_pixels"] == fuzz.DEFAULT_MAX_PIXELS


def test_mutations_are_reproducible_and_crc_fixing_works(embedded_model):
    seeds = fuzz.seed_streams(embedded_model)
    a = [fuzz.mutate(random.Random(5), seeds) for _ in range(3)]
    b = [fuzz.mutate(random.Random(5), seeds) for _ in range(3)]
    assert a == b
    damaged = bytearray(seeds[0])
    damaged[30] ^= 0x10
    with pytest.raises(BitstreamError, match="checksum"):
        pipeline.read_header(bytes(damaged))
    pipeline.read_header(fuzz.fix_crc(bytes(damaged)))  # the CRC now matches: the damage goes deeper


def test_pixel_budget_refuses_large_claims_before_decoding(tiny_model):
    data = pipeline.encode(tiny_model, torch.rand(3, 40, 60), rate=0.2)
    with pytest.raises(BitstreamError, match=r"claims a 60x40 image \(2400 pixels\), more than this decoder's limit of 2399"):
        pipeline.decode(tiny_model, data, max_pixels=2399)
    assert pipeline.decode(tiny_model, data, max_pixels=2400).shape == (3, 40, 60)


def test_cli_pixel_budget(tmp_path, tiny_model):
    from diffo.cli import main

    model_dir = tiny_model.save_pretrained(tmp_path / "m")
    stream = tmp_path / "s.diffo"
    stream.write_bytes(pipeline.encode(tiny_model, torch.rand(3, 40, 60), rate=0.2))
    assert main(["decompress", str(stream), "--model", str(model_dir), "--max-pixels", "100"]) == 2
    assert not (tmp_path / "s_diffo.png").exists()
    assert main(["decompress", str(stream), "--model", str(model_dir), "--max-pixels", "2400"]) == 0
