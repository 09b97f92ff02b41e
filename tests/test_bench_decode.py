"""maskar bench decode: the real-token quality step with a data folder other than the checkpoint's
(the device machine has only the carried .carry/fmnist), and its skip switch. CPU, tiny data."""

from __future__ import annotations

import gzip
import json
import lzma
import struct

import numpy as np

from maskar.bench.decode import main as bench_decode


def _idx(path, arr: np.ndarray, pack) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape)
    path.write_bytes(pack(header + arr.tobytes()))


def test_quality_reads_root_in_the_carried_layout(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "fmnist"
    data.mkdir()
    _idx(
        data / "train-images-idx3-ubyte.xz", rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), lzma.compress
    )
    _idx(data / "train-labels-idx1-ubyte.gz", np.arange(6, dtype=np.uint8), gzip.compress)
    out_json = tmp_path / "decode.json"
    argv = [f"root={data}", "split=train", "limit=5", "device=cpu", f"json={out_json}"]
    assert bench_decode(argv) == 0
    assert f"train split of {data}, 5 images [1, 32, 32]" in capsys.readouterr().out
    q = json.loads(out_json.read_text())["quality"]
    assert q["root"] == str(data) and q["images"] == 5
    # the bf16 decoder against fp32 on real token pyramids: far below the tokenizer's own error
    assert q["psnr_bf16_vs_fp32_min"] > 45 and q["psnr_bf16_vs_fp32_mean"] > q["psnr_fp32_vs_original"] + 20


def test_quality_false_skips_and_a_missing_root_is_reported(tmp_path, capsys):
    out_json = tmp_path / "decode.json"
    assert bench_decode(["quality=false", "device=cpu", f"json={out_json}"]) == 0
    assert "quality: skipped (quality=false)" in capsys.readouterr().out
    assert json.loads(out_json.read_text())["quality"] == {"error": "skipped (quality=false)"}
    assert bench_decode([f"root={tmp_path / 'none'}", "device=cpu"]) == 0
    assert "quality: not measured (ConfigError: data.root" in capsys.readouterr().out


def test_bench_decode_times_every_convolution_shape_of_the_decoder(tmp_path):
    """convs=true: every distinct convolution of one decode, in bf16, NCHW and channels-last
    (CPU smoke run at 32 px); the shares of the convolution time add up to one."""
    out = tmp_path / "c.json"
    argv = ["quality=false", "convs=true", "cases=32x2", "reps=1", "device=cpu", f"json={out}"]
    assert bench_decode(argv) == 0
    rows = json.loads(out.read_text())["convs"]
    assert rows and all(r["res"] == 32 and r["chunk"] == 2 for r in rows)
    assert abs(sum(r["share_of_conv_ms"] for r in rows) - 1) < 1e-9
    assert all(r["nchw_ms"] > 0 and r["nhwc_ms"] > 0 and r["gflop_per_call"] > 0 for r in rows)
    # the d16 decoder's shapes: 3x3 convolutions of 160 channels at the output resolution among them
    assert any(r["weight"][:3] == [160, 160, 3] and r["input"][2:] == [32, 32] for r in rows)
    # output widths off a multiple of 128 also as a 128 + rest split and padded to a multiple of 64
    odd = [r for r in rows if r["weight"][0] > 128 and r["weight"][0] % 128]
    assert odd and all(r["split_ms"] > 0 for r in odd)
    assert any(r["weight"][0] == 160 for r in odd)
    assert all(r["pad64_ms"] > 0 for r in odd if r["weight"][0] % 64)
    assert all("split_ms" not in r for r in rows if r["weight"][0] % 128 == 0 or r["weight"][0] < 128)
