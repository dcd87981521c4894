"""Every command line refuses bad values at parse time: one line naming the flag or file, exit status 2,
no traceback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from stablesynth.cli import main as stablesynth_main
from stablesynth_device.cli import main as device_main

SERVE = ["serve", "--checkpoint", "{dir}"]
EXPORT = ["device", "export", "--checkpoint", "{dir}", "--out", "{new}"]
CLIP = ["device", "clip", "--out", "{new}"]
BENCH = ["bench", "serve"]
WIMPORT = ["weights", "import", "--from", "timm", "--preset", "allinone-test"]
WOUT = ["--out", "{new}.safetensors"]
PREDICT = ["predict", "--bundle", "{dir}", "--npy", "{file}", "--question", "q", "--server", "http://127.0.0.1:9"]

CASES: list[tuple[str, list[str], list[str], str]] = [
    # (entry point, command, bad arguments, what the message must name)
    *[("stablesynth", SERVE, ["--port", v], "--port") for v in ("99999", "0", "-1", "eighty")],
    *[("stablesynth", SERVE, [flag, v], flag) for flag, v in [
        ("--max-batch", "0"), ("--max-wait-ms", "nan"), ("--max-wait-ms", "-1"), ("--inline-ms", "inf"),
        ("--torch-threads", "0"), ("--encode-threads", "0"), ("--workers", "0"), ("--header-timeout", "0"),
        ("--body-timeout", "-1"), ("--send-timeout", "nan"), ("--idle-timeout", "0"), ("--keep-alive", "0"),
        ("--max-header-bytes", "10"), ("--limit-concurrency", "0"), ("--max-connections-per-client", "0"),
        ("--token-file", "{missing}"), ("--ssl-certfile", "{missing}"), ("--ssl-keyfile", "{dir}"),
        ("--drain-timeout", "-1"), ("--drain-timeout", "nan"), ("--drain-timeout", "inf"),
        ("--drain-timeout", "soon")]],
    ("stablesynth", ["serve"], ["--checkpoint", "{file}"], "--checkpoint"),
    ("stablesynth", ["serve"], ["--checkpoint", "{missing}"], "--checkpoint"),
    ("stablesynth", SERVE, ["--ssl-certfile", "{file}"], "--ssl-certfile"),
    ("stablesynth", SERVE, ["--ssl-certfile", "{file}", "--ssl-keyfile", "{file}"], "--ssl-certfile"),
    ("stablesynth", SERVE, ["--protect-metrics"], "--protect-metrics"),
    ("stablesynth", ["device", "export", "--checkpoint", "{dir}"], ["--out", "{file}"], "--out"),
    ("stablesynth", ["device", "export", "--out", "{new}"], ["--checkpoint", "{file}"], "--checkpoint"),
    ("stablesynth", EXPORT, ["--run-dir", "{missing}"], "--run-dir"),
    ("stablesynth", ["device", "clip"], ["--out", "{file}"], "--out"),
    ("stablesynth", ["device", "clip"], ["--out", "{file}/sub"], "--out"),
    ("stablesynth", CLIP, ["--device", "-1"], "--device"),
    ("stablesynth", CLIP, ["--clip", "-1"], "--clip"),
    *[("stablesynth", BENCH, [flag, v], flag) for flag, v in [
        ("--requests", "-1"), ("--requests", "0"), ("--concurrency", "0"), ("--time-cap", "nan"),
        ("--clients", "0"), ("--out", "{file}"), ("--checkpoint", "{missing}")]],
    *[("stablesynth-device", PREDICT, [flag, v], flag) for flag, v in [
        ("--server", "http://[::1"), ("--server", "ftp://host"), ("--server", "http://"), ("--timeout", "0"),
        ("--timeout", "nan"), ("--retries", "-1"), ("--threads", "0"), ("--upload-index", "-1"),
        ("--global-index", "a,b"), ("--token-file", "{missing}"), ("--ca-file", "{dir}")]],
    ("stablesynth", ["demo"], ["--out", "{file}"], "--out"),
    ("stablesynth", ["demo"], ["--seed", "-1"], "--seed"),
    ("stablesynth", ["demo"], ["--seeds", "0"], "--seeds"),
    ("stablesynth", ["train", "--preset", "msrvtt-qa", "--data-root", "{dir}"], ["--out", "{file}"], "--out"),
    ("stablesynth", ["train", "--preset", "msrvtt-qa", "--out", "{new}"], ["--data-root", "{missing}"],
     "--data-root"),
    ("stablesynth", ["train", "--preset", "msrvtt-qa", "--data-root", "{dir}", "--out", "{new}"],
     ["--config", "{dir}"], "--config"),
    ("stablesynth", ["train", "--preset", "msrvtt-qa", "--data-root", "{dir}", "--out", "{new}"],
     ["--train-from", "{missing}"], "--train-from"),
    ("stablesynth", ["eval"], ["--checkpoint-dir", "{file}"], "--checkpoint-dir"),
    ("stablesynth", ["data", "describe"], ["--out", "{file}"], "--out"),
    ("stablesynth", ["data", "describe"], ["--seed", "-3"], "--seed"),
    ("stablesynth", ["bench", "ablate"], ["--seeds", "0"], "--seeds"),
    ("stablesynth", ["bench", "headroom"], ["--seeds", "0"], "--seeds"),
    ("stablesynth", ["bench", "headroom"], ["--only", "nope"], "--only nope"),
    ("stablesynth", ["bench", "device"], ["--bundle", "{missing}"], "--bundle"),
    ("stablesynth", ["bench", "device", "--bundle", "{dir}"], ["--iters", "0"], "--iters"),
    ("stablesynth", ["bench", "train"], ["--steps", "0"], "--steps"),
    ("stablesynth", ["bench", "train"], ["--json", "{dir}"], "--json"),
    ("stablesynth", WIMPORT + WOUT, ["{missing}"], "SRC"),
    ("stablesynth", [*WIMPORT, "{file}"], ["--out", "{new}.bin"], "--out"),
    ("stablesynth", [*WIMPORT, "{file}"], ["--out", "{dir}"], "--out"),
    ("stablesynth", [*WIMPORT, "{file}", *WOUT], ["--set", "max_text_len"], "--set"),
    ("stablesynth", ["weights", "import", "{file}", "--preset", "allinone-test", *WOUT], ["--from", "onnx"], "--from"),
    ("stablesynth", ["weights", "import", "{file}", "--preset", "allinone-test", *WOUT], [], "--from"),
    ("stablesynth", ["weights", "import", "--from", "timm", "{file}", *WOUT], ["--preset", "nope"], "nope"),
    ("stablesynth", WIMPORT + WOUT, ["{file}"], "unsupported weight format"),
    ("stablesynth", ["weights", "inspect"], ["{missing}"], "SRC"),
    ("stablesynth", ["weights", "inspect", "{file}"], ["--json", "{dir}"], "--json"),
    ("stablesynth", ["weights", "inspect", "{file}"], ["--from", "bert"], "--from"),
    ("stablesynth", ["weights", "check"], ["--seed", "-1"], "--seed"),
    ("stablesynth", ["weights", "check"], ["--keep", "{file}"], "--keep"),
    ("stablesynth", ["serve"], [], "--checkpoint"),  # required flags are named too
    ("stablesynth-device", ["predict", "--npy", "{file}", "--question", "q", "--offline"], ["--bundle", "{file}"],
     "--bundle"),
    ("stablesynth-device", ["predict", "--bundle", "{dir}", "--question", "q", "--offline"], ["--npy", "{missing}"],
     "--npy"),
    ("stablesynth-device", ["predict", "--bundle", "{dir}", "--question", "q", "--offline"], ["--frames", "{file}"],
     "--frames"),
    ("stablesynth-device", ["verify"], ["--bundle", "{missing}"], "--bundle"),
]

MAINS: dict[str, Callable[[list[str]], int]] = {"stablesynth": stablesynth_main, "stablesynth-device": device_main}


@pytest.mark.parametrize(("prog", "command", "bad", "named"), CASES,
                         ids=[f"{c[0]}-{'-'.join(a for a in c[1][:2] if not a.startswith('{'))}{' '.join(c[2])}"
                              for c in CASES])
def test_bad_values_exit_2_naming_the_flag(prog: str, command: list[str], bad: list[str], named: str,
                                           tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STABLESYNTH_TOKEN", raising=False)
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("not what it should be\n")
    paths = {"dir": tmp_path / "dir", "file": tmp_path / "file", "missing": tmp_path / "missing",
             "new": tmp_path / "new"}
    argv = [a.format(**paths) for a in command + bad]
    try:
        code = MAINS[prog](argv)
    except SystemExit as exc:  # argparse's own refusal
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert named in err and "error" in err, err
