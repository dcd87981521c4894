"""The payload table: bytes up and down per preset and encoding, and their transfer times.

Units follow the paper's Table 5: KB = 1024 B, MB/s = 1024 KB/s, so 568.5 KB at
100 MB/s takes 5.55 ms. Up is always one 192-float frame feature (768 B = 0.75 KB).
Down, for a 96 → K dynamic layer (Θ_d = weight K×96 + bias K = 97·K floats):

- ``fp32``: 97·K·4 B, the paper's figure;
- ``fp16``: 97·K·2 B;
- ``int8``: 97·K B plus one fp32 scale per weight row and one for the bias (as the
  wire protocol encodes it);
- ``lowrank`` / ``film`` factors (fp32), when the device caches the shared W0/b0 once:
  the floats the generator's ``factors(driver)`` returns, counted on the generator itself;
- ``driver``: only the driver (96 floats; 256 for retrieval) when the device runs the
  generator itself; fp32, or int8 with one fp32 scale.

Only the fp32 row is comparable with the paper; it lands within 0.5 KB of Table 5
because the paper's sizes are not exactly 97·K·4 B for any integer K.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from stablesynth import presets as _presets
from stablesynth.evaluation.cost import kb, payload_bytes, transfer_ms
from stablesynth.presets import PAPER_BANDWIDTHS_MBPS, TaskPreset, get_preset

FEATURE_FLOATS = 192
# Table 5's presets first, in the paper's order, then the rest.
_ORDER = ("msrvtt-qa", "msvd-qa", "tgif-frameqa", "msrvtt-mc", "msrvtt-ret", "easyvqa")


def _factor_numel(generator: str, preset: TaskPreset) -> tuple[int, str]:
    """Floats the ``generator``'s factors hold for this preset, and a label naming its size knobs."""
    import torch

    from stablesynth.models.device import dynamic_specs
    from stablesynth.models.generators import create_generator

    gen = create_generator(generator, dynamic_specs(preset.num_classes, preset.hidden_dim), preset.driver_dim)
    with torch.no_grad():
        factors = gen.factors(torch.zeros(1, preset.driver_dim))
    numel = sum(int(t[0].numel()) for t in factors.values())
    knobs = [f"{k}={getattr(gen, k)}" for k in ("rank",) if isinstance(getattr(gen, k, None), int)]
    return numel, f"{generator} factors ({', '.join([*knobs, 'W0/b0 cached'])})"


def _encodings(preset: TaskPreset) -> list[tuple[str, str, int]]:
    """(encoding, what is sent, bytes) for one preset."""
    K, H = preset.num_classes, preset.hidden_dim
    theta = preset.dynamic_numel
    rows = [
        ("fp32", "Θ_d", payload_bytes(theta, "fp32")),
        ("fp16", "Θ_d", payload_bytes(theta, "fp16")),
        # Protocol: one scale per weight row (K) and one for the 1-D bias.
        ("int8", "Θ_d, fp32 scale per row", payload_bytes(K * H, "int8", rows=K) + payload_bytes(K, "int8")),
    ]
    for generator in ("lowrank", "film"):
        numel, label = _factor_numel(generator, preset)
        rows.append((f"{generator}", label, payload_bytes(numel, "fp32")))
    d = preset.driver_dim
    rows.append(("driver-fp32", f"driver ({d} floats)", payload_bytes(d, "fp32")))
    rows.append(("driver-int8", f"driver ({d} floats, one fp32 scale)", payload_bytes(d, "int8")))
    return rows


def payload_table(preset_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per (preset, encoding) with bytes, KB and transfer ms at 5/15/50/100 MB/s.

    Rows carry the paper's Table 5 figures (fp32 rows of the three open-ended presets).
    Unknown preset names raise an error listing the known presets.
    """
    known = _presets.preset_names()
    names = list(preset_names) if preset_names else [*(n for n in _ORDER if n in known),
                                                     *(n for n in known if n not in _ORDER)]
    presets = [get_preset(n) for n in names]  # fail on a bad name before any work
    up = FEATURE_FLOATS * 4
    rows: list[dict[str, Any]] = []
    for p in presets:
        for encoding, what, down in _encodings(p):
            paper = p.paper if encoding == "fp32" else None
            rows.append({
                "preset": p.name,
                "task": p.task,
                "K": p.num_classes,
                "encoding": encoding,
                "payload": what,
                "bytes_up": up,
                "kb_up": kb(up),
                "bytes_down": down,
                "kb_down": kb(down),
                "ms_up": {bw: transfer_ms(up, bw) for bw in PAPER_BANDWIDTHS_MBPS},
                "ms_down": {bw: transfer_ms(down, bw) for bw in PAPER_BANDWIDTHS_MBPS},
                "paper_kb_up": paper.upload_kb if paper else None,
                "paper_kb_down": paper.download_kb if paper else None,
                "paper_ms_down": ({bw: v["down"] for bw, v in paper.transfer_ms.items()}
                                  if paper and paper.transfer_ms else None),
            })
    return rows


def _fmt_ms(v: float) -> str:
    return f"{v:.3g}" if v < 0.1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def format_payload_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table: ours beside the paper's Table 5 (KB = 1024 B, MB/s = 1024 KB/s)."""
    if not rows:
        return "(no presets)"
    bws = list(PAPER_BANDWIDTHS_MBPS)
    header = ["preset", "K", "encoding", "↓ KB", *[f"↓ms@{bw:g}MB/s" for bw in bws], "paper ↓ KB",
              "paper ↓ms@5/15/50/100", "payload"]
    body = []
    for r in rows:
        paper_ms = r["paper_ms_down"]
        body.append([
            r["preset"], str(r["K"]), r["encoding"], f"{r['kb_down']:.2f}",
            *[_fmt_ms(r["ms_down"][bw]) for bw in bws],
            f"{r['paper_kb_down']:.1f}" if r["paper_kb_down"] is not None else "-",
            "/".join(_fmt_ms(paper_ms[bw]) for bw in bws) if paper_ms else "-",
            r["payload"],
        ])
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    r0 = rows[0]
    up_ms = "/".join(_fmt_ms(r0["ms_up"][bw]) for bw in bws)
    lines.append("")
    lines.append(f"↑ every preset: one {FEATURE_FLOATS}-float fp32 frame feature = {r0['bytes_up']} B = "
                 f"{r0['kb_up']:.2f} KB, {up_ms} ms at {'/'.join(f'{bw:g}' for bw in bws)} MB/s "
                 "(paper: 0.75 KB, 0.15/0.05/0.01/0.007 ms)")
    lines.append("Θ_d = weight K×96 + bias K; fp32 = 97·K·4 B. "
                 "KB = 1024 B, MB/s = 1024 KB/s (the paper's units).")
    return "\n".join(lines)


def payload_main(preset: str | None = None, as_json: bool = False) -> int:
    """Print the payload table for one preset (or all); the ``stablesynth payload`` command."""
    rows = payload_table([preset] if preset else None)
    if as_json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        print(format_payload_table(rows))
    return 0
