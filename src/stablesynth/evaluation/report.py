"""report.md, every figure read from results.json (its schema: :mod:`stablesynth.evaluation.schema`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from stablesynth.evaluation.cost import transfer_ms
from stablesynth.evaluation.stats import format_ci, paired_difference, verdict
from stablesynth.presets import PAPER_BANDWIDTHS_MBPS


def _pct(v: float | None) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _pct_ci(mean: float, low: float, high: float) -> str:
    """``92.1 [90.2, 93.9]``: a fraction with its interval, in percent."""
    return f"{_pct(mean)} [{_pct(low)}, {_pct(high)}]"


def _kb(nbytes: float) -> str:
    return f"{nbytes / 1024:.2f} KB" if nbytes < 100 * 1024 else f"{nbytes / 1024:.1f} KB"


def _ms(v: float) -> str:
    if v >= 1000:
        return f"{v / 1000:.1f} s"
    return f"{v:.3f} ms" if v < 1 else f"{v:.2f} ms"


def oracle_summary(results: dict[str, Any]) -> dict[str, Any] | None:
    oracle = results.get("oracle")
    return oracle["accuracy"] if oracle else None


def proposed_method(results: dict[str, Any]) -> str | None:
    """The name of the method the report is about (the entry marked ``proposed``), if it ran."""
    return next((n for n, m in results["methods"].items() if m.get("proposed")), None)


def device_groups(results: dict[str, Any]) -> dict[str, list[str]]:
    """Device ids (as results.json's per_device keys) of the seen and the unseen devices."""
    devices = results["benchmark"]["devices"]
    return {"seen": [str(d["id"]) for d in devices if d["seen"]],
            "unseen": [str(d["id"]) for d in devices if not d["seen"]]}


def compare(results: dict[str, Any], a: str, b: str, group: str, mode: str = "per_sample") -> dict[str, float]:
    """Paired per-device difference of methods ``a`` − ``b`` on ``group``'s devices, with its 95 % interval."""
    methods = results["methods"]
    return paired_difference(methods[a]["accuracy"][mode]["per_device"], methods[b]["accuracy"][mode]["per_device"],
                             device_groups(results)[group])


def _sentence(group: str, subject: str, ci: dict[str, float], other: str, metric: str) -> str:
    verb = verdict(ci)
    return (f"On {group} devices {subject} {verb} {other}: {format_ci(ci)} points of {metric} "
            f"(mean per-device difference, 95 % bootstrap interval over {ci['n']} devices"
            + ("; the interval covers zero, so this is a tie)." if verb == "ties with" else ")."))


def verdicts(results: dict[str, Any], metric: str = "accuracy", mode: str = "per_sample") -> list[str]:
    """Plain sentences comparing the proposed method with each other one, each with its interval.

    ``results`` needs ``methods``, ``benchmark.devices`` and optionally ``oracle``; ``metric``
    names what the per-device figures are, ``mode`` which of them (``per_sample`` or
    ``per_session``; the oracle sentence is per sample only).
    """
    methods = results["methods"]
    out: list[str] = []
    name_ours = proposed_method(results)
    if name_ours is None:
        return out
    label_ours = methods[name_ours]["label"]
    ours = methods[name_ours]["accuracy"][mode]
    for name, m in methods.items():
        if name == name_ours or not m["accuracy"].get(mode):
            continue
        for group in ("seen", "unseen"):
            if ours[group]["n"]:
                out.append(_sentence(group, label_ours, compare(results, name_ours, name, group, mode),
                                     m["label"], metric))
    oracle = results.get("oracle")
    if oracle and mode == "per_sample":
        d = 100 * (ours["all"]["mean"] - oracle["accuracy"]["all"]["mean"])
        ft = oracle["finetune_seconds"]["median"]
        ad = methods[name_ours]["adapt_ms"]["median"]
        out.append(
            f"Against per-device fine-tuning (the oracle, {ft:.2f} s per device) {label_ours} is "
            f"{d:+.1f} points over all devices while adapting in {_ms(ad)} ({ft * 1000 / max(ad, 1e-9):,.0f}× faster)."
        )
    return out


def session_costs(results: dict[str, Any], metric: str = "accuracy") -> list[str]:
    """For each adaptive method: per-session minus per-sample figures, paired by device, with intervals.

    What one upload at a session's start costs against an upload per clip."""
    out = []
    for m in results["methods"].values():
        acc = m["accuracy"]
        if not m.get("adaptive") or not acc.get("per_session"):
            continue
        for group, devices in device_groups(results).items():
            if devices:
                ci = paired_difference(acc["per_session"]["per_device"], acc["per_sample"]["per_device"], devices)
                out.append(_sentence(group, f"{m['label']} per session", ci, f"{m['label']} per sample", metric))
    return out


def per_session_said(results: dict[str, Any], metric: str = "accuracy",
                     title: str = "What the per-session numbers say:") -> list[str]:
    """Report lines under ``title``: the per-session verdicts and what one upload per session costs."""
    said = verdicts(results, metric, mode="per_session") + session_costs(results, metric)
    return ["", title, ""] + [f"- {v}" for v in said] if said else []


def _bench_seed(results: dict[str, Any]) -> Any:
    return (results.get("config") or {}).get("benchmark", {}).get("seed", "?")


def render_report(results: dict[str, Any], ablation: dict[str, Any] | None = None,
                  seeds: dict[str, Any] | None = None) -> str:
    """report.md as a string; figures come only from ``results`` (and ``ablation``)."""
    b = results["benchmark"]
    methods = results["methods"]
    K = b["num_classes"]
    n_seen = sum(d["seen"] for d in b["devices"])
    dataset = b.get("dataset", "the easy-VQA device benchmark")
    lines = [
        f"# StableSynthNet on {dataset}",
        "",
        f"Generated {results['created']} by `{results.get('command', 'stablesynth demo')}`; "
        f"wall time {results['wall_seconds']:.0f} s. "
        f"{len(b['devices'])} devices ({n_seen} seen in training, {len(b['devices']) - n_seen} unseen), "
        f"K = {K} {'answers' if K > 1 else 'output (one score per pair)'}, seed {results['seed']}. "
        f"Accuracy: {b.get('accuracy_convention', 'top-1')}. "
        "Every number below is read from `results.json` in this folder.",
        "",
        (f"**The tables below are one draw** (benchmark seed {_bench_seed(results)}, run seed {results['seed']}); "
         "the section \"Across benchmark seeds\" at the end gives every headline as its mean and min–max over "
         f"{seeds['n_seeds']} seeds, and that is the finding." if seeds else
         "**These figures are one draw** of the benchmark and the training seed: on another seed or machine they "
         "move by a few points (more for the caption tasks); `stablesynth demo --seeds 3` gives each headline as its "
         "mean and spread over seeds."),
        "",
    ]
    s0 = results.get("stage0")
    if s0:
        clean = s0.get("clean_test") or {}
        acc = clean.get("accuracy", clean.get("all")) if isinstance(clean, dict) else None
        lines += ["## Stage 0 (pretraining on clean easy-VQA)", "",
                  f"Checkpoint `{s0['checkpoint']}` (cached; {s0.get('train_seconds') or 0:.0f} s when it was trained, "
                  f"{s0['seconds']:.0f} s in this run)"
                  + (f"; clean test accuracy {_pct(acc)}." if isinstance(acc, float) else "."), ""]
    if methods:
        lines += _qa_sections(results)
    if results.get("tasks"):
        from stablesynth.evaluation.task_report import render_tasks  # it builds on this module's verdicts

        lines += render_tasks(results)
    figures = results.get("figures", ["per_device_accuracy.png", "accuracy_vs_cost.png"])
    lines += ["", "## Plots", ""]
    for fig in figures:
        lines += [f"![{fig.removesuffix('.png').replace('_', ' ')}]({fig})", ""]
    if seeds:
        lines += render_seeds(seeds)
    if ablation:
        lines += render_ablation(ablation)
    text = "\n".join(lines) + "\n"
    if "task" in b:
        text += pair_report(results)
    return text



def _on_device_table(methods: dict[str, Any]) -> list[str]:
    """What each on-device correction costs the device per clip, and what validation chose for it."""
    rows = [(m, m["device_cost"], m["on_device"]) for m in methods.values() if "device_cost" in m and "on_device" in m]
    if not rows:
        return []
    lines = ["", "### On-device adaptation: what the device spends per clip", "",
             "Each correction streams its session at batch size 1 and starts afresh at the session's start; "
             "FLOPs are counted by torch's counter over one session (the head's forward included, the backward "
             "where there is one), state is what the device keeps after that session.", "",
             "| method | chosen on validation | time per clip | FLOPs per clip | state (bytes) "
             "| backprop on the device |",
             "|---|---|---|---|---|---|"]
    for m, cost, dev in rows:
        chosen = ", ".join(f"{k} = {v:g}" for k, v in dev.get("hyper", {}).items()) or "—"
        lines.append(f"| {m['label']} | {chosen} | {_ms(cost['ms_per_clip'])} | {cost['flops_per_clip']:,.0f} | "
                     f"{cost['state_bytes']:,} (after {cost['session_clips']} clips) | "
                     f"{'yes' if cost['backprop'] else 'no'} |")
    return lines


def _qa_sections(results: dict[str, Any]) -> list[str]:
    """The open-ended QA sections: informativeness, Tables 1, 2 and 5, encodings and costs."""
    b = results["benchmark"]
    methods = results["methods"]
    K = b["num_classes"]
    lines: list[str] = []
    inf = results.get("informative")
    if inf:
        lines += [
            "## Is the benchmark informative? (DESIGN §5)",
            "",
            "| check | accuracy |",
            "|---|---|",
            f"| global head (Fine-tuning), seen devices (their casts are in its training data) "
            f"| {_pct(inf['global_seen'])} |",
            f"| global head, unseen devices | {_pct(inf['global_unseen'])} |",
            f"| global head, the same clips captured clean (identity profile) | {_pct(inf['global_clean'])} |",
            f"| global head, validation clips (seen devices' held-out history; stage-1 settings are chosen here) "
            f"| {_pct(inf.get('global_validation'))} |",
            f"| per-device fine-tuning (oracle), seen devices | {_pct(inf['oracle_seen'])} |",
            f"| per-device fine-tuning (oracle), unseen devices | {_pct(inf['oracle_unseen'])} |",
            "",
            inf.get("verdict", ""),
            "",
        ]
        if inf.get("by_question_type"):
            lines += _question_type_table(inf["by_question_type"], inf.get("shape_probe"))
    diag = results.get("diagnostics")
    if diag and oracle_summary(results):
        o = oracle_summary(results)
        lines += [
            "### What one uploaded frame can tell the cloud",
            "",
            f"- A linear probe identifies a seen device from one uploaded frame feature with "
            f"{_pct(diag['device_probe_accuracy'])} % accuracy (chance {_pct(diag['chance'])} %).",
            f"- Re-weighting the global head by each device's answer frequencies in its history (its usage "
            f"skew) gives {_pct(diag.get('prior_corrected_seen'))} on seen and "
            f"{_pct(diag.get('prior_corrected_unseen'))} on unseen devices, against "
            f"{_pct(diag.get('global_seen'))} / {_pct(diag.get('global_unseen'))} without and "
            f"{_pct(o['seen']['mean'])} / {_pct(o['unseen']['mean'])} for per-device fine-tuning: that share "
            "of the oracle's gain is the device's label prior, which an unlabeled frame of an unseen device "
            "does not carry.",
            "",
        ]
    paper = results.get("paper", {})
    paper_acc = paper.get("accuracy", {})
    paper_delay = paper.get("time_delay_ms", {})
    lines += [
        "## Accuracy and time to adapt (the paper's Table 1 layout)",
        "",
        "Per-sample mode: every real-time clip uploads one of its own frames. Time to adapt = measured "
        "median from one uploaded feature to a device model that predicts (in process; the network round "
        "trip is in `stablesynth bench serve`). Paper columns: "
        f"{results.get('paper', {}).get('preset', 'msrvtt-qa')}, Table 1 (Table 6 for multiple choice).",
        "",
        "| method | seen mean | seen worst | seen std | unseen mean | unseen worst | unseen std | "
        "time to adapt | paper acc | paper delay |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        a = m["accuracy"]["per_sample"]
        t = m["adapt_ms"]["median"] if m["adaptive"] else None
        adapt = _ms(t) if t is not None else "— (no adaptation)"
        if "device_cost" in m:
            on_dev = f"{_ms(m['device_cost']['ms_per_clip'])} per clip on the device"
            adapt = f"{adapt} + {on_dev}" if m["adaptive"] else f"{on_dev}, no upload"
        pa = paper_acc.get(name)
        pd = paper_delay.get(name)
        lines.append(
            f"| {m['label']} | {_pct(a['seen']['mean'])} | {_pct(a['seen']['worst'])} | {_pct(a['seen']['std'])} "
            f"| {_pct(a['unseen']['mean'])} | {_pct(a['unseen']['worst'])} | {_pct(a['unseen']['std'])} "
            f"| {adapt} | {pa if pa is not None else '—'} | "
            f"{('≥ ' + _ms(pd)) if pd is not None else '—'} |"
        )
    oracle = results.get("oracle")
    if oracle:
        a = oracle["accuracy"]
        lines.append(
            f"| per-device fine-tuning (oracle) | {_pct(a['seen']['mean'])} | {_pct(a['seen']['worst'])} | "
            f"{_pct(a['seen']['std'])} | {_pct(a['unseen']['mean'])} | {_pct(a['unseen']['worst'])} | "
            f"{_pct(a['unseen']['std'])} | {oracle['finetune_seconds']['median']:.2f} s (fine-tuning) | — | — |"
        )
    lines += ["", "### Per-session mode", "",
              "The device uploads one frame at the start of its session and reuses Θ_d for all its clips.", "",
              "| method | seen mean | seen worst | unseen mean | unseen worst | all std |", "|---|---|---|---|---|---|"]
    for m in methods.values():
        a = m["accuracy"]["per_session"]
        lines.append(f"| {m['label']} | {_pct(a['seen']['mean'])} | {_pct(a['seen']['worst'])} | "
                     f"{_pct(a['unseen']['mean'])} | {_pct(a['unseen']['worst'])} | {_pct(a['all']['std'])} |")
    lines += _on_device_table(methods)
    said = verdicts(results)
    if said:
        lines += ["", "### What the numbers say", ""] + [f"- {v}" for v in said]
    lines += per_session_said(results)

    pduet = paper.get("duet") or {}
    table2 = [n for n in pduet if n in methods]
    if len(table2) == len(pduet) >= 2:
        first = methods[table2[0]]
        lines += ["", "## DUET vs StableSynthNet (the paper's Table 2, plus cost)", "",
                  f"| method | accuracy (all devices) | time to adapt | cloud FLOPs (K={K}) | cloud FLOPs "
                  f"(K={first['flops']['paper_K']}) | upload | paper acc | paper latency |",
                  "|---|---|---|---|---|---|---|---|"]
        for name in table2:
            m = methods[name]
            p = pduet.get(name, {})
            lines.append(
                f"| {m['label']} | {_pct(m['accuracy']['per_sample']['all']['mean'])} | {_ms(m['adapt_ms']['median'])} "
                f"| {m['flops']['benchmark'] / 1e6:.3f} M | {m['flops']['paper'] / 1e6:.2f} M | {m['bytes']['up']} B "
                f"| {p.get('accuracy', '—')} | {p.get('latency_s', '—')} s |"
            )
        lines += ["", "The paper counts " + " and ".join(
            f"{pduet[n]['cloud_mflops']} M FLOPs for {methods[n]['label']}" for n in table2
            if "cloud_mflops" in pduet[n]) + f" per cloud step at K = {first['flops']['paper_K']}."]

    lines += ["", "## Bytes and transfer time (the paper's Table 5 layout)", "",
              f"Per adaptation at K = {K}; KB = 1024 B, MB/s = 1024 KB/s as in the paper. `factors` is what the "
              "cloud sends when the device caches the generator's shared W0; `driver` when the device holds the "
              "generator.", "",
              "| method | encoding | size | " + " | ".join(f"{bw:g} MB/s" for bw in PAPER_BANDWIDTHS_MBPS) + " |",
              "|---|---|---|" + "---|" * len(PAPER_BANDWIDTHS_MBPS)]
    for m in methods.values():
        if not m["adaptive"]:
            continue
        lines.append(f"| {m['label']} | ↑ upload | {_kb(m['bytes']['up'])} | "
                     + " | ".join(_ms(transfer_ms(m["bytes"]["up"], bw)) for bw in PAPER_BANDWIDTHS_MBPS) + " |")
        for enc, nbytes in m["bytes"]["down"].items():
            if nbytes:
                lines.append(f"| {m['label']} | ↓ {enc} | {_kb(nbytes)} | "
                             + " | ".join(_ms(transfer_ms(nbytes, bw)) for bw in PAPER_BANDWIDTHS_MBPS) + " |")
    studied = next((n for n, m in methods.items() if m.get("encodings")), None)
    enc = methods[studied]["encodings"] if studied else None
    if enc:
        lines += ["", f"### Compact downloads, measured ({methods[studied]['label']})", "",
                  "Every real-time clip's parameters go through the wire format and back; bytes include the "
                  "frame header. Device time = decode + rebuild Θ_d + predict, per adaptation, in Python "
                  "(the ONNX runtime's prediction alone is in `stablesynth bench serve`). `factors*` need the "
                  "generator's W0 on the device, `driver*` the whole generator.", "",
                  "| encoding | bytes down | accuracy | Δ vs fp32 (points) | device time | device must hold |",
                  "|---|---|---|---|---|---|"]
        for name, e in enc.items():
            holds = _kb(e["device_holds_bytes"]) if e["device_holds_bytes"] else "—"
            lines.append(f"| {name} | {e['bytes']:,} B | {_pct(e['accuracy'])} | {e['delta_points']:+.2f} | "
                         f"{_ms(e['device_ms'])} | {holds} |")
        small = [n for n, e in enc.items() if e["bytes"] <= 1024 and abs(e["delta_points"]) <= 0.5]
        lines += ["", ("Within 1 KB and 0.5 points of fp32: " + ", ".join(small) + ".") if small else
                  "No encoding reaches 1 KB within 0.5 points of fp32 here."]
    if results.get("payload"):
        lines += render_payload(results["payload"])
    lines += ["", "## Cost of each method", "",
              "| method | cloud params | cloud FLOPs per upload | stage-2 training |", "|---|---|---|---|"]
    for m in methods.values():
        lines.append(f"| {m['label']} | {m['params']['cloud']:,} | {m['flops']['benchmark']:,} | "
                     f"{m['train_seconds']:.1f} s |")
    return lines

def render_payload(rows: list[dict[str, Any]]) -> list[str]:
    """The paper presets' bytes per encoding, fp32 next to the paper's Table 5."""
    by_preset: dict[str, dict[str, Any]] = {}
    for r in rows:
        by_preset.setdefault(r["preset"], {"K": r["K"]})[r["encoding"]] = r
    encodings = [e for e in ("fp32", "fp16", "int8", "film", "lowrank", "driver-fp32", "driver-int8")
                 if any(e in p for p in by_preset.values())]
    lines = ["", "### The paper's presets", "",
             "Download per adaptation for the paper's label sizes (computed, not measured); upload is "
             "0.75 KB everywhere. `film` / `lowrank`: factors sent when the device caches W0.", "",
             "| preset | K | " + " | ".join(f"↓ {e}" for e in encodings) + " | paper ↓ | fp32 @100 MB/s | paper |",
             "|---|---|" + "---|" * len(encodings) + "---|---|---|"]
    for name, p in by_preset.items():
        fp32 = p.get("fp32", {})
        paper_ms = (fp32.get("paper_ms_down") or {})
        paper_100 = paper_ms.get(100.0, paper_ms.get("100.0"))
        lines.append(
            f"| {name} | {p['K']} | " + " | ".join(_kb(p[e]["bytes_down"]) if e in p else "—" for e in encodings)
            + f" | {fp32.get('paper_kb_down') or '—'} KB | "
            + (_ms(transfer_ms(fp32["bytes_down"], 100)) if fp32 else "—")
            + f" | {(str(paper_100) + ' ms') if paper_100 else '—'} |"
        )
    return lines


def _spread(x: dict[str, Any]) -> str:
    """``92.1 (90.2–93.9)``: a mean over seeds with its min–max, in percent."""
    return f"{_pct(x['ci']['mean'])} ({_pct(x['min'])}–{_pct(x['max'])})"


def _seed_rows(methods: dict[str, Any]) -> list[str]:
    lines = ["| method | seen | unseen | proposed − this, seen | proposed − this, unseen |", "|---|---|---|---|---|"]
    for m in methods.values():
        cells = [_spread(m[g]) for g in ("seen", "unseen")]
        diffs = [f"{format_ci(m[g]['proposed_minus_this'])} ({verdict(m[g]['proposed_minus_this'])})"
                 if "proposed_minus_this" in m[g] else "—" for g in ("seen", "unseen")]
        lines.append(f"| {m['label']} | " + " | ".join(cells + diffs) + " |")
    return lines


def render_seeds(seeds: dict[str, Any]) -> list[str]:
    """The headline over several benchmark seeds (``demo --seeds N``)."""
    n = seeds["n_seeds"]
    ours = seeds["methods"][seeds["proposed"]]["label"] if seeds.get("proposed") else "the proposed method"
    lines = ["## Across benchmark seeds", "",
             f"{n} benchmark seeds ({', '.join(map(str, seeds['seeds']))}), each a new draw of devices, casts, "
             "usage and clips and a new training seed, trained from stage 1 on. Each cell: the mean over the seeds "
             "(min–max over the seeds); the last columns pool every seed's devices for the paired difference to "
             f"{ours} with its 95 % bootstrap interval. These, not one seed's tables above, are the finding.", ""]
    h = seeds.get("headroom")
    if h:
        lines += ["| headroom | seen | unseen |", "|---|---|---|",
                  f"| global head (Fine-tuning) | {_spread(h['global_seen'])} | {_spread(h['global_unseen'])} |",
                  f"| per-device fine-tuning (oracle) | {_spread(h['oracle_seen'])} | {_spread(h['oracle_unseen'])} |",
                  f"| oracle − global head (points) | {_spread(h['oracle_minus_global_seen'])} "
                  f"| {_spread(h['oracle_minus_global_unseen'])} |",
                  f"| global head on the same clips captured clean | {_spread(h['global_clean'])} | |"]
        if "prior_gain_unseen" in h:
            share = h.get("prior_share_unseen")
            lines.append(f"| global head re-weighted by the device's history label prior, gain (points) | | "
                         f"{_spread(h['prior_gain_unseen'])}"
                         + (f"; {100 * share:.0f} % of the mean headroom |" if share is not None else " |"))
        lines.append("")
    lines += ["### Open-ended QA", "", *_seed_rows(seeds["methods"]), ""]
    titles = {"mc": "Multiple choice (accuracy)", "ret": "Retrieval (per-device session VR@1)"}
    for task, block in (seeds.get("tasks") or {}).items():
        lines += [f"### {titles.get(task, task)}", "", *_seed_rows(block["methods"]), ""]
    return lines


def render_ablation(ablation: dict[str, Any]) -> list[str]:
    lines = ["## Ablations", "",
             f"StableSynthNet with one change at a time, {ablation['n_seeds']} stage-2 seeds each: mean accuracy "
             "over all devices with its 95 % interval (bootstrap over devices of the per-device mean over "
             "seeds), std across seeds, and the paired difference to the defaults; per sample (an upload per "
             "clip) and per session (one upload at each session's start).", "",
             "| group | variant | per sample [95 %] | seed std | vs defaults (points) | worst device "
             "| per session [95 %] | vs defaults (points) |",
             "|---|---|---|---|---|---|---|---|"]

    def interval(mean: float, ci: dict[str, float] | None) -> str:
        return _pct_ci(mean, ci["low"], ci["high"]) if ci else _pct(mean)

    for r in ablation["rows"]:
        diff, session = r.get("vs_reference"), r.get("session") or {}
        s_diff = session.get("vs_reference")
        lines.append(f"| {r['group']} | {r['name']} | {interval(r['mean'], r.get('ci'))} | {_pct(r['std'])} | "
                     f"{format_ci(diff) if diff else '—'} | {_pct(r['worst'])} | "
                     f"{interval(session['mean'], session.get('ci')) if session else '—'} | "
                     f"{format_ci(s_diff) if s_diff else '—'} |")
    if ablation.get("notes"):
        lines += [""] + [f"- {n}" for n in ablation["notes"]]
    lines += ["", "![ablations](ablation.png)", ""]
    return lines


def pair_report(results: dict[str, Any]) -> str:
    """The report.md section of multiple choice (paper Table 6) or retrieval (paper Table 3)."""
    bench = results["benchmark"]
    methods = results["methods"]
    paper = results.get("paper", {})
    lines = [""]
    if bench.get("task") == "retrieval":
        keys = ("VR@1", "VR@5", "VR@10", "TR@1", "TR@5", "TR@10")
        lines += ["## Retrieval (the paper's Table 3 layout)", "",
                  f"{bench['items']['realtime']} test videos, one caption each; {bench['scoring_cost']}. "
                  f"Training: {bench['train_data']}; {bench['loss']}. Paper values in brackets.", "",
                  "| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, m in methods.items():
            p = paper.get("retrieval", {}).get(name, {})
            cells = [f"{100 * m['retrieval'][k]:.1f}" + (f" ({p[k]})" if k in p else "") for k in keys]
            lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    else:
        lines += ["## Multiple choice (the paper's Table 6 layout)", "",
                  f"{bench['items']['realtime']} test items, {bench['candidates']} candidates each. Training: "
                  f"{bench['train_data']}; {bench['loss']}.", "",
                  "| method | accuracy, per sample | per session | paper |", "|---|---|---|---|"]
        for name, m in methods.items():
            p = paper.get("accuracy", {}).get(name)
            lines.append(f"| {m['label']} | {100 * m['mc_accuracy']:.1f} | {100 * m['mc_accuracy_per_session']:.1f} "
                         f"| {p if p is not None else '—'} |")
    return "\n".join(lines) + "\n"


def _question_type_table(by_type: Mapping[str, Mapping[str, Any]],
                         probe: Mapping[str, Any] | None = None) -> list[str]:
    """The global head per question type, its worst device with a 95 % Wilson interval, and the
    devices under the per-device goal (all of them, and those whose interval lies under it); then
    the probe of one question type with many questions per device, when the run made one."""
    goal = next(iter(by_type.values())).get("goal")
    lines = ["The global head by question type (all real-time clips). A device answers few questions of "
             "one type, so its accuracy carries a 95 % Wilson interval"
             + (f"; the goal is {_pct(goal)} % on every device." if goal else "."), "",
             "| question type | accuracy | worst device [95 % interval] | devices under the goal | "
             "of which clearly (interval under it) |", "|---|---|---|---|---|"]
    for t, q in by_type.items():
        if "worst_n" in q:
            worst = (f"{_pct_ci(q['worst'], q['worst_low'], q['worst_high'])} "
                     f"(device {q['worst_device']}, {q['worst_n']} question{'' if q['worst_n'] == 1 else 's'})")
            under = f"{q['below_goal']} of {q['devices']} | {q['clearly_below_goal']}"
        else:  # results written before the intervals were recorded
            worst, under = f"{_pct(q['worst'])} (device {q['worst_device']})", "— | —"
        lines.append(f"| {t} | {_pct(q['mean'])} | {worst} | {under} |")
    if probe:
        n, t = probe["per_device"], probe["question_type"]
        lines.append(f"| {t}, probe of {n} fresh questions per device | {_pct(probe['mean'])} | "
                     f"{_pct_ci(probe['worst'], probe['worst_low'], probe['worst_high'])} "
                     f"(device {probe['worst_device']}) | {probe['below_goal']} of {probe['devices']} | "
                     f"{probe['clearly_below_goal']} |")
        met = ("met on every device" if not probe["below_goal"] else "not met")
        lines += ["", f"The probe asks each device {n} {t} questions from the real-time scenes, captured as a "
                  f"real-time session of that length, so each device's interval is a few points wide. Goal "
                  f"{_pct(probe['goal'])} % on every device: {met}; {probe['clearly_below_goal']} of "
                  f"{probe['devices']} devices are clearly under it and {probe['clearly_above_goal']} clearly "
                  "at or above it."]
    return [*lines, ""]
