import json

import pytest

from stablesynth.evaluation.cost import transfer_ms
from stablesynth.models.payload import format_payload_table, payload_main, payload_table
from stablesynth.presets import get_preset
from stablesynth.registry import UnknownNameError

PAPER_KB = {"msrvtt-qa": 568.5, "msvd-qa": 379.4, "tgif-frameqa": 583.8}


def _row(rows, preset, encoding):
    (row,) = [r for r in rows if r["preset"] == preset and r["encoding"] == encoding]
    return row


def test_fp32_matches_table5_sizes():
    rows = payload_table(list(PAPER_KB))
    for name, paper_kb in PAPER_KB.items():
        r = _row(rows, name, "fp32")
        K = get_preset(name).num_classes
        assert r["K"] == K and r["bytes_down"] == 97 * K * 4
        assert abs(r["kb_down"] - paper_kb) < 0.5, (name, r["kb_down"])
        assert r["paper_kb_down"] == paper_kb
        assert r["bytes_up"] == 768 and r["kb_up"] == pytest.approx(0.75)


def _within_rounding(ours: float, paper: float) -> bool:
    # The paper prints 2-3 significant figures and computed from its own (slightly different) sizes.
    return abs(ours - paper) <= max(0.01, 0.005 * paper)


def test_transfer_times_match_table5():
    rows = payload_table(list(PAPER_KB))
    for name in PAPER_KB:
        r = _row(rows, name, "fp32")
        paper = get_preset(name).paper.transfer_ms
        for bw, figures in paper.items():
            assert _within_rounding(r["ms_down"][bw], figures["down"]), (name, bw, r["ms_down"][bw])
            assert _within_rounding(r["ms_up"][bw], figures["up"]), (name, bw, r["ms_up"][bw])
    # The paper's convention: 568.5 KB at 100 MB/s (KB = 1024 B, MB/s = 1024 KB/s) is 5.55 ms.
    assert round(transfer_ms(568.5 * 1024, 100), 2) == 5.55


def test_encodings_are_smaller_and_consistent():
    rows = payload_table(["msrvtt-qa", "msrvtt-ret"])
    K = 1501
    assert _row(rows, "msrvtt-qa", "fp16")["bytes_down"] == 97 * K * 2
    # int8: one byte per number, an fp32 scale per weight row and one for the bias.
    assert _row(rows, "msrvtt-qa", "int8")["bytes_down"] == 97 * K + 4 * K + 4
    assert _row(rows, "msrvtt-qa", "driver-fp32")["bytes_down"] == 384
    assert _row(rows, "msrvtt-ret", "driver-fp32")["bytes_down"] == 256 * 4
    fp32 = _row(rows, "msrvtt-qa", "fp32")["bytes_down"]
    for enc in ("lowrank", "film"):
        assert 0 < _row(rows, "msrvtt-qa", enc)["bytes_down"] < fp32 / 10


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(UnknownNameError, match=r"known: .*msrvtt-qa"):
        payload_table(["msrvtt"])


def test_format_and_main(capsys):
    text = format_payload_table(payload_table(["tgif-frameqa"]))
    assert "583.89" in text and "583.8" in text and "1541" in text and "0.75 KB" in text
    assert payload_main("msvd-qa", as_json=True) == 0
    data = json.loads(capsys.readouterr().out)
    assert {r["preset"] for r in data} == {"msvd-qa"} and data[0]["K"] == 1001
    assert payload_main(None, as_json=False) == 0
    out = capsys.readouterr().out
    assert "msrvtt-mc" in out and "easyvqa" in out


def test_presets_hold_the_papers_settings():
    from stablesynth.presets import TaskPreset, preset_names

    assert set(preset_names()) >= {"msrvtt-qa", "msvd-qa", "tgif-frameqa", "msrvtt-mc", "msrvtt-ret", "easyvqa"}
    qa = get_preset("msrvtt-qa")
    assert (qa.task, qa.num_classes, qa.driver_dim, qa.encoder, qa.frames, qa.text_len, qa.image_size) == (
        "open_qa", 1501, 96, "allinone-ti", 3, 40, 224)
    assert (qa.stage1_lr, qa.stage1_epochs, qa.stage2_lr, qa.stage2_epochs) == (2e-5, 10, 1e-4, 40)
    assert qa.paper.accuracy["stablesynth"] == 36.9 and qa.paper.duet["duet"]["latency_s"] == 1.80
    mc = get_preset("msrvtt-mc")
    assert (mc.task, mc.num_classes, mc.num_candidates) == ("mc_qa", 1, 5)
    assert mc.paper.accuracy["fine_tune"] == 75.6
    ret = get_preset("msrvtt-ret")
    assert ret.driver_dim == 256 and ret.paper.retrieval["stablesynth"]["TR@10"] == 33.1
    ez = get_preset("easyvqa")
    assert (ez.num_classes, ez.encoder) == (13, "allinone-cpu-stem")
    with pytest.raises(TypeError):
        qa.paper.accuracy["stablesynth"] = 99.0  # shared figures are read-only
    with pytest.raises(ValueError, match="num_classes"):
        TaskPreset(name="bad", task="open_qa", num_classes=0, description="")
    assert qa.replace(image_size=64).image_size == 64 and qa.image_size == 224
