import pytest
from PIL import Image

from stablesynth.cli import main


def test_data_describe_writes_png_and_table(tmp_path, capsys):
    cfg = tmp_path / "bench.yaml"
    cfg.write_text("n_devices: 4\nn_unseen: 1\nhistory_per_device: 20\nrealtime_per_device: 10\nseed: 3\n")
    out = tmp_path / "out"
    assert main(["data", "describe", "--config", str(cfg), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "UNSEEN" in text and "gains R/G/B" in text
    png = out / "devices.png"
    with Image.open(png) as im:
        assert im.size[0] > 400 and im.size[1] > 200
    assert (out / "devices.json").is_file()


def test_data_describe_bad_config_is_one_clear_error(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("n_devices: 2\nn_unseen: 2\n")
    assert main(["data", "describe", "--config", str(cfg), "--out", str(tmp_path)]) == 2
    assert "n_unseen" in capsys.readouterr().err


@pytest.mark.parametrize("below", [False, True])
def test_data_describe_out_that_is_a_file_is_one_line_naming_it(tmp_path, capsys, below):
    existing = tmp_path / "results.txt"
    existing.write_text("not a folder\n")
    out = existing / "sub" if below else existing
    assert main(["data", "describe", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert str(existing) in err and "not a folder" in err
    assert existing.read_text() == "not a folder\n"
