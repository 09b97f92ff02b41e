"""``maskar bench casmar_parts`` on the CPU: every piece timed, the comparisons made, bad input refused."""

from __future__ import annotations

import json

import pytest

from maskar.bench.casmar_parts import main


def test_tiny_run_times_every_piece_and_compares_tokens(tmp_path, capsys):
    out = tmp_path / "parts.json"
    argv = ["--preset", "casmar-tiny", "--device", "cpu", "--batch", "2", "--reps", "1", "--compile", "off",
            "--compare-steps", "3", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    pieces = ("dit_step eager", "dit_step eager, PSA sdpa", "mlp_step (16 rows)", "stage1 (sample_scaffold)",
              "stage2 (sample_refine)")  # fmt: skip
    for name in pieces:
        assert rows[name]["ms"] > 0, name
    assert rows["dit_step eager"]["flops"] > 0
    # same seed twice, and PSA through SDPA in fp32 (the kernel is GPU-only): the same tokens
    changes = rows["stage2_token_changes"]
    assert changes["repeat"] == [0.0, 0.0] and changes["psa_sdpa"] == [0.0, 0.0]
    assert "stage2 tokens, repeat vs eager (3 DiT steps)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch", "0"], "--batch"),
        (["--modes", "turbo"], "--modes"),
        (["--compare-steps", "x"], "--compare-steps"),
    ],
)
def test_bad_arguments_exit_2_before_building(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--device", "cpu", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
