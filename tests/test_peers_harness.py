"""benchmarks/peers.py: case selection, spec building, and the worker loop's fail-soft handling, run
against a stand-in release written here (the official code is not part of the repository)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import textwrap

import pytest

from maskar.models.hmar import default_mask_schedule

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "peers.py")
_spec = importlib.util.spec_from_file_location("peers_bench", _PATH)
peers = importlib.util.module_from_spec(_spec)
sys.modules["peers_bench"] = peers  # dataclasses look their module up while the file executes
_spec.loader.exec_module(peers)


def test_select_cases_aliases_globs_and_run_order():
    assert [c.name for c in peers.select_cases("mar-b-256,mar-b-64")] == ["mar-b-64", "mar-b-256"]
    assert {c.name for c in peers.select_cases("hmar-kernel-*")} == {
        "hmar-kernel-train-256", "hmar-kernel-train-1024"}
    standard = [c.name for c in peers.select_cases("standard")]
    long = [c.name for c in peers.select_cases("long")]
    assert long == ["casmar-b-v2", "mar-b-256"] and not set(long) & set(standard)
    assert len(standard) + len(long) == len(peers.CASES)
    # the fast VAR / HMAR cases run first, so a budget cuts the masked ones
    assert [peers.CASES[n].group for n in standard[:10]] == ["hmar"] * 6 + ["var"] * 4
    assert {c.kind for c in peers.select_cases("train")} == {"train"}
    with pytest.raises(SystemExit) as e:
        peers.select_cases("hmar-nope")
    assert e.value.code == 2


def test_build_spec_full_and_tiny():
    full = peers.build_spec(peers.CASES["hmar-sample-1024"], tiny=False, schedule="default")
    pn = full["params"]["patch_nums"]
    assert sum(n * n for n in pn) == 9451
    assert full["params"]["mask_schedule"] == default_mask_schedule(tuple(pn))
    bench = peers.build_spec(peers.CASES["hmar-sample-256"], tiny=False, schedule="official_bench")
    assert bench["params"]["mask_schedule"][2] == [1, 3, 5]
    tiny = peers.build_spec(peers.CASES["hmar-train-256"], tiny=True, schedule="default", cap_s=7)
    assert tiny["params"]["depth"] == 2 and tiny["params"]["patch_nums"] == [1, 2, 3]
    assert tiny["cap_s"] == 7 and tiny["what"].startswith("tiny stand-in")
    mar = peers.build_spec(peers.CASES["mar-b-256"], tiny=False, schedule="default")
    assert mar["params"]["num_iter"] == 256 and mar["params"]["cfg"] == 2.9


def test_usage_errors_exit_2(tmp_path, capsys):
    assert peers.main(["--peers-dir", str(tmp_path / "missing"), "--cases", "mar-b-64"]) == 2
    assert "--peers-dir" in capsys.readouterr().err
    assert peers.main(["--peers-dir", str(tmp_path), "--budget-s", "-1"]) == 2


_FAKE_MAR = '''
import os, time
import torch

class MAR(torch.nn.Module):
    """Stand-in: num_iter 4 kills its process, 8 hangs, anything else returns tokens."""
    def __init__(self, **kw):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def sample_tokens(self, bsz, num_iter, cfg, cfg_schedule, labels, temperature):
        if num_iter == 4:
            os._exit(7)
        if num_iter == 8:
            time.sleep(60)
        return torch.zeros(bsz, 16, 4, 4)

def mar_base(**kw):
    return MAR(**kw)
'''


@pytest.mark.slow  # two worker processes, each importing torch
def test_a_crashing_or_hanging_peer_is_a_result(tmp_path, capsys):
    release = tmp_path / "peers" / "mar" / "models"
    release.mkdir(parents=True)
    (release / "mar.py").write_text(textwrap.dedent(_FAKE_MAR))
    (release.parent / "SOURCE").write_text("someone/mar 0123456789abcdef\n")
    out = tmp_path / "r.json"
    rc = peers.main(["--peers-dir", str(tmp_path / "peers"), "--cases", "mar", "--tiny", "--device", "cpu",
                     "--cap-s", "4", "--json", str(out), "--log", str(tmp_path / "log.txt")])
    assert rc == 0
    rows = {r["case"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["mar-b-64"]["status"] == "fail" and "worker died (exit 7)" in rows["mar-b-64"]["error"]
    assert rows["mar-b-256"]["status"] == "timeout", rows["mar-b-256"]
    printed = capsys.readouterr().out
    assert "someone/mar@0123456" in printed and "| mar-b-256 |" in printed
