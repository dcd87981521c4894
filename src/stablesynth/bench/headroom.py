"""`stablesynth bench headroom`: where the unseen-device headroom goes, and what recovers it, over seeds.

For each benchmark seed it opens the demo's run folder of that seed (``out`` for the first, then
``out/seeds/<k>``, the layout of ``stablesynth demo --seeds``), so stage 1, the feature caches and
the demo's method checkpoints are reused, then measures the study of
:mod:`stablesynth.experiment.headroom` and trains the candidate fixes (:data:`CANDIDATES`):
the generator pulled towards each training device's last-layer optimum (``optimum_weight``), and
an on-device correction after Θ_d. Every figure is a mean over seeds with its min–max; each
method's gain over the global head is paired per device and pooled over the seeds' devices with its
95 % interval. The best cloud method is the candidate with the best validation accuracy (the seen
devices' held-out history), never the scored clips. Writes ``headroom.json`` and ``headroom.png``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from stablesynth.data.batch import FeatureBatch
from stablesynth.evaluation.stats import bootstrap_mean_ci
from stablesynth.experiment import headroom, studies
from stablesynth.experiment.demo import DemoRun, RunConfig
from stablesynth.experiment.seeds import seed_config, spread
from stablesynth.files import atomic_write_json
from stablesynth.methods import Method
from stablesynth.training.stage2 import train_method

HEADROOM_FILE = "headroom.json"
#: How far under the global head's seen validation accuracy a method may be and still be chosen (the goal's 0.5 pt).
SEEN_TOLERANCE = 0.005
#: The simulated devices of benchmark seed s are a benchmark draw of seed SIMULATED_SEED_BASE + s.
SIMULATED_SEED_BASE = 7_000
PLOT_FILE = "headroom.png"
#: The ceilings, lowest to highest, in the order the study and the plot give them.
CEILINGS: tuple[tuple[str, str], ...] = (
    ("global", "global head (Fine-tuning)"),
    ("prior", "global head × device's history answer prior"),
    ("bias", "per-device bias b_d (W shared)"),
    ("last_layer_camera", "per-device last layer, usage weighted out"),
    ("last_layer", "per-device last layer W_d, b_d"),
    ("oracle", "per-device fine-tuning (oracle)"),
)


@dataclass(frozen=True)
class Candidate:
    """A method of the study: ``method`` with ``overrides``; ``then``: an on-device correction method
    (``stablesynth_then_*``) run on this candidate's trained model; ``simulated``: simulated devices
    added to stage 2's training clips (``headroom.simulated_devices``). Without overrides or simulated
    devices the demo's own checkpoint is used."""

    key: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)
    then: str | None = None
    simulated: int = 0
    #: With simulated devices: the real training clips are repeated until they are this share of stage 2's
    #: clips (0: once), so the seen devices are not drowned by the simulated ones.
    real_share: float = 0.0
    cloud: bool = True  # uploads one frame and gets Θ_d (a candidate for "the best cloud method")

    @property
    def trained_key(self) -> tuple[str, str, int]:
        return self.method, repr(sorted(self.overrides.items())), self.simulated, self.real_share


#: History clips of each simulated device (the harsh profile's seen devices have 120, 20 of them validation).
SIMULATED_PER_DEVICE = 60

CANDIDATES: tuple[Candidate, ...] = (
    Candidate("fine_tune", "fine_tune", cloud=False),
    Candidate("em_prior", "em_prior", cloud=False),
    Candidate("label_shift", "label_shift", cloud=False),
    Candidate("f_hyper", "f_hyper"),
    Candidate("stablesynth", "stablesynth"),
    Candidate("stablesynth+em_prior", "stablesynth", then="stablesynth_then_em_prior"),
    Candidate("stablesynth+label_shift", "stablesynth", then="stablesynth_then_label_shift"),
    Candidate("stablesynth+opt10", "stablesynth", {"optimum_weight": 10.0}),
    Candidate("stablesynth+sim64", "stablesynth", simulated=64),
    Candidate("control+sim256", "stage2_control", simulated=256),
    Candidate("f_hyper+sim256", "f_hyper", simulated=256),
    Candidate("stablesynth+sim256", "stablesynth", simulated=256),
    Candidate("stablesynth+sim256+opt1", "stablesynth", {"optimum_weight": 1.0}, simulated=256),
    Candidate("stablesynth+sim256+opt10", "stablesynth", {"optimum_weight": 10.0}, simulated=256),
    Candidate("stablesynth+sim256+opt1+real50", "stablesynth", {"optimum_weight": 1.0}, simulated=256,
              real_share=0.5),
    Candidate("stablesynth+sim256+opt10+real50", "stablesynth", {"optimum_weight": 10.0}, simulated=256,
              real_share=0.5),
    Candidate("stablesynth+sim256+label_shift", "stablesynth", then="stablesynth_then_label_shift", simulated=256),
    Candidate("stablesynth+sim256+biasopt1", "stablesynth", {"optimum_weight": 1.0, "optimum_target": "bias"},
              simulated=256),
    Candidate("stablesynth+sim256+biasopt1+real50", "stablesynth", {"optimum_weight": 1.0, "optimum_target": "bias"},
              simulated=256, real_share=0.5),
)
#: Simulated devices that no candidate trains on: a validation set of cameras the cloud has not seen.
SIMULATED_VALIDATION = (32, 20)


def select_candidates(keys: Sequence[str] | None) -> tuple[Candidate, ...]:
    """The candidates named by ``keys`` (all with None), in :data:`CANDIDATES`' order; an unknown key is an error."""
    if not keys:
        return CANDIDATES
    known = {c.key for c in CANDIDATES}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ValueError(f"--only {unknown[0]}: no such candidate (known: {', '.join(c.key for c in CANDIDATES)})")
    return tuple(c for c in CANDIDATES if c.key in set(keys))


def seed_folder(out: Path, k: int) -> Path:
    """The demo's folder of seed ``k`` (``stablesynth demo --seeds``'s layout)."""
    return out if k == 0 else out / "seeds" / str(k)


def _candidate(run: DemoRun, c: Candidate, trained: dict[tuple[str, str, int, float], Method], seed: int,
               simulated_per_device: int = SIMULATED_PER_DEVICE) -> Method:
    """The candidate's method: the demo's checkpoint where it changes nothing, else trained here."""
    ws = run.ws
    key = c.trained_key
    if key not in trained:
        if not c.overrides and not c.simulated:
            trained[key] = ws.train_or_load(c.method)[0]
        else:
            method = ws.method(c.method, overrides=c.overrides)
            train = ws.data("history", method.cfg.category, devices="train")
            if c.simulated:
                sim = headroom.simulated_devices(run, c.simulated, simulated_per_device,
                                                 seed=SIMULATED_SEED_BASE + run.cfg.benchmark.seed)
                repeat = max(1, round(c.real_share / (1 - c.real_share) * len(sim) / len(train))) \
                    if 0 < c.real_share < 1 else 1
                train = FeatureBatch.cat([train] * repeat + [sim])
            validation = ws.data("history", method.cfg.category, devices="validation")
            method.prepare(train, validation)
            m = method.cfg
            train_method(method, train, m.epochs, m.batch_size, m.lr, m.weight_decay, seed=seed,
                         desc=f"stage 2 {c.key}", device=ws.device)
            trained[key] = method.cpu()
    base = trained[key]
    if c.then is None:
        return base
    method = ws.method(c.then, overrides=c.overrides)
    method.load_state_dict(base.state_dict(), strict=False)
    method.prepare(ws.data("history", devices="train"), ws.data("history", devices="validation"))
    return method


def run_seed(cfg: RunConfig, out: Path, candidates: Sequence[Candidate], log: Callable[[str], None],
             device: str = "cpu", simulated_per_device: int = SIMULATED_PER_DEVICE,
             simulated_validation: tuple[int, int] = SIMULATED_VALIDATION) -> dict[str, Any]:
    t0 = time.perf_counter()
    run = DemoRun(cfg, out, reuse=True, log=log, device=device)
    run.stage1()
    run.cache_features()
    ws = run.ws
    history, realtime = ws.data("history"), ws.data("realtime")
    oracle = studies.oracle(ws, cfg.oracle, history, realtime)
    ceil, optima, head = headroom.ceilings(ws, history, realtime, oracle["accuracy"]["per_device"])
    base = ws.train_or_load("fine_tune")[0]
    upload = {**studies.diagnostics(ws, base, history, realtime, n_devices=len(run.bench.devices)),
              "cast": headroom.cast_regression(ws, run.bench, history, realtime)}
    trained: dict[tuple[str, str, int, float], Method] = {}
    methods = {}
    sim_val = headroom.simulated_devices(run, *simulated_validation,
                                         seed=SIMULATED_SEED_BASE + 500 + cfg.benchmark.seed)
    for c in candidates:
        method = _candidate(run, c, trained, seed=cfg.seed, simulated_per_device=simulated_per_device)
        methods[c.key] = {**headroom.method_scores(ws, method, history, realtime, optima, head, sim_val),
                          "cloud": c.cloud, "overrides": c.overrides, "then": c.then, "simulated": c.simulated,
                          "real_share": c.real_share}
    optimum_shift = {str(d): float((o.flat() - head.flat()).norm()) for d, o in optima.items()}
    return {"seed": cfg.benchmark.seed, "seen_devices": sorted(str(d) for d in ws.seen), "ceilings": ceil,
            "methods": methods, "upload": upload,
            "optimum_shift_norm": optimum_shift, "seconds": time.perf_counter() - t0}


def _paired_gain(runs: list[dict[str, Any]], get: Callable[[dict[str, Any]], dict[str, Any]], group: str,
                 mode: str = "per_sample") -> dict[str, float]:
    """Per-device gain over the global head, pooled over every seed's devices of ``group``."""
    diffs = []
    for r in runs:
        glob = r["ceilings"]["global"]["per_device"]
        mine = get(r)[mode]["per_device"] if mode in get(r) else get(r)["per_device"]
        seen = {d for d, e in glob.items() if _is_seen(r, d)}
        for d, v in mine.items():
            if (d in seen) == (group == "seen"):
                diffs.append(v - glob[d])
    return bootstrap_mean_ci(diffs)


def _is_seen(run: dict[str, Any], device: str) -> bool:
    return device in run["seen_devices"]


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds with min–max, shares of the unseen headroom, paired gains, the best cloud method."""
    def mean(vals: list[float]) -> float:
        return sum(vals) / len(vals)

    out: dict[str, Any] = {"n_seeds": len(runs), "seeds": [r["seed"] for r in runs]}
    g_un = mean([r["ceilings"]["global"]["unseen"]["mean"] for r in runs])
    room = mean([r["ceilings"]["oracle"]["unseen"]["mean"] for r in runs]) - g_un
    out["headroom_unseen"] = room

    def share(values: list[float]) -> float | None:
        return (mean(values) - g_un) / room if room > 0 else None

    out["ceilings"] = {}
    for key, label in CEILINGS:
        row: dict[str, Any] = {"label": label}
        for group in ("seen", "unseen"):
            row[group] = spread([r["ceilings"][key][group]["mean"] for r in runs])
        row["share_unseen"] = share(row["unseen"]["per_seed"])
        if key != "global":
            row["gain_unseen"] = _paired_gain(runs, lambda r, k=key: r["ceilings"][k], "unseen")
        out["ceilings"][key] = row
    out["methods"] = {}
    for key in runs[0]["methods"]:
        first = runs[0]["methods"][key]
        row = {"label": first["label"], "cloud": first["cloud"], "overrides": first["overrides"],
               "then": first["then"], "simulated": first["simulated"], "real_share": first["real_share"]}
        for mode in ("per_sample", "per_session"):
            for group in ("seen", "unseen"):
                row[f"{mode}_{group}"] = spread([r["methods"][key][mode][group]["mean"] for r in runs])
                row[f"{mode}_{group}"]["gain"] = _paired_gain(runs, lambda r, k=key: r["methods"][k], group, mode)
        row["share_unseen"] = share(row["per_sample_unseen"]["per_seed"])
        row["share_unseen_per_session"] = share(row["per_session_unseen"]["per_seed"])
        for v in ("validation", "validation_simulated"):
            if all(v in r["methods"][key] for r in runs):
                row[v] = spread([r["methods"][key][v] for r in runs])
        if "validation" in row and "validation_simulated" in row:
            row["validation_both"] = (row["validation"]["ci"]["mean"] + row["validation_simulated"]["ci"]["mean"]) / 2
        if "driver_ceiling" in first:
            row["driver_ceiling"] = {g: spread([r["methods"][key]["driver_ceiling"][g]["mean"] for r in runs])
                                     for g in ("seen", "unseen")}
            row["driver_ceiling"]["share_unseen"] = share(row["driver_ceiling"]["unseen"]["per_seed"])
            al = [r["methods"][key]["alignment"] for r in runs]
            row["alignment"] = {
                "cosine_unseen": spread([a["cosine"]["unseen"]["mean"] for a in al]),
                "cosine_seen": spread([a["cosine"]["seen"]["mean"] for a in al]),
                "norm_ratio_unseen": spread([a["norm_ratio"]["unseen"]["mean"] for a in al]),
                "norm_ratio_seen": spread([a["norm_ratio"]["seen"]["mean"] for a in al]),
                "between_share": spread([a["between_share"] for a in al]),
            }
        out["methods"][key] = row
    # Chosen on validation only: among the cloud methods whose accuracy on the seen devices' held-out
    # history is within SEEN_TOLERANCE of the global head's (the seen devices must not pay), the best on
    # the held-out simulated devices (cameras nobody trained on: the unseen devices' stand-in).
    ref = out["methods"].get("fine_tune", {}).get("validation")
    cloud = [k for k, m in out["methods"].items() if m["cloud"] and "validation_both" in m
             and (ref is None or m["validation"]["ci"]["mean"] >= ref["ci"]["mean"] - SEEN_TOLERANCE)]
    best = max(cloud, key=lambda k: out["methods"][k]["validation_simulated"]["ci"]["mean"]) if cloud else None
    out["best_cloud"] = best
    if best is not None:
        b = out["methods"][best]
        out["goals"] = {
            "share_unseen": b["share_unseen"], "share_goal": 0.5,
            "gain_unseen": b["per_sample_unseen"]["gain"], "gain_seen": b["per_sample_seen"]["gain"],
            "session_minus_sample_unseen": b["per_session_unseen"]["ci"]["mean"] - b["per_sample_unseen"]["ci"]["mean"],
            "session_minus_sample_seen": b["per_session_seen"]["ci"]["mean"] - b["per_sample_seen"]["ci"]["mean"],
        }
    up = [r["upload"] for r in runs]
    out["upload"] = {
        "device_probe": spread([u["device_probe_accuracy"] for u in up]),
        "probe_chance": up[0]["chance"],
        "cast_r2_seen": spread([u["cast"]["seen"]["r2_mean"] for u in up]),
        "cast_r2_unseen": spread([u["cast"]["unseen"]["r2_mean"] for u in up]),
        "cast_r2_unseen_per_target": [spread([u["cast"]["unseen"]["r2"][i] for u in up]) for i in range(4)],
        "cast_targets": up[0]["cast"]["targets"],
    }
    return out


def plot(summary: dict[str, Any], path: Path, shown: Sequence[str]) -> None:
    """Left: the ladder of ceilings and methods on unseen devices (mean, min–max over seeds), with the
    global head and the oracle as lines. Right: per hypernetwork method, the generated Θ_d's cosine to
    the per-device optimum and the between-device share of its variance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(v["label"], v["unseen"], None) for v in summary["ceilings"].values()]
    rows += [(_variant_label(summary["methods"][k]) + ("" if summary["methods"][k]["cloud"] else " (device only)"),
              summary["methods"][k]["per_sample_unseen"], summary["methods"][k]["per_session_unseen"])
             for k in shown if k in summary["methods"]]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 0.42 * len(rows) + 1.6),
                                 gridspec_kw={"width_ratios": [1.6, 1]})
    ys = list(range(len(rows)))[::-1]
    for y, (_, s, session) in zip(ys, rows, strict=True):
        m = 100 * sum(s["per_seed"]) / len(s["per_seed"])
        if session is not None:
            ax.plot(100 * sum(session["per_seed"]) / len(session["per_seed"]), y, marker="x", color="C3", ms=6,
                    label="per session (one upload a session)" if y == ys[len(summary["ceilings"])] else None)
        colour = "C0" if y >= len(rows) - len(summary["ceilings"]) else "C1"
        ax.barh(y, m, color=colour, alpha=0.6)
        ax.plot([100 * s["min"], 100 * s["max"]], [y, y], color="k", lw=1.2)
        ax.text(m + 0.5, y, f"{m:.1f}", va="center", fontsize=7)
    g = summary["ceilings"]["global"]["unseen"]
    o = summary["ceilings"]["oracle"]["unseen"]
    for s, style in ((g, "--"), (o, ":")):
        ax.axvline(100 * sum(s["per_seed"]) / len(s["per_seed"]), color="k", ls=style, lw=0.8)
    ax.set_yticks(ys, [label for label, _, _ in rows], fontsize=7)
    lo = 100 * min(min(s["min"] for _, s, _ in rows) - 0.05, 1.0)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xlim(max(0.0, lo - 15), 100)
    ax.set_xlabel("unseen-device accuracy (%), mean over seeds, bar: min–max")
    ax.set_title("Ceilings (blue) and methods (orange, per sample); dashed: global head, dotted: oracle", fontsize=9)
    hyper = [k for k in shown if "alignment" in summary["methods"].get(k, {})]
    xs = range(len(hyper))
    for off, (key, label, colour) in enumerate((("cosine_unseen", "cos(Θ_d shift, optimum shift), unseen", "C2"),
                                                ("cosine_seen", "the same, seen", "C4"),
                                                ("between_share", "between-device share of Θ_d variance", "C3"))):
        vals = [summary["methods"][k]["alignment"][key] for k in hyper]
        bx.bar([x + 0.27 * (off - 1) for x in xs], [sum(v["per_seed"]) / len(v["per_seed"]) for v in vals], 0.25,
               color=colour, label=label, alpha=0.8)
    bx.set_xticks(list(xs), [_variant_label(summary["methods"][k]) for k in hyper], rotation=30, ha="right", fontsize=7)
    bx.axhline(0, color="k", lw=0.6)
    bx.set_title("Does the generated Θ_d follow the device?", fontsize=9)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def run_headroom_bench(base: RunConfig, out: Path, seeds: int = 3, candidates: Sequence[Candidate] = CANDIDATES,
                       log: Callable[[str], None] = print, device: str = "cpu",
                       simulated_per_device: int = SIMULATED_PER_DEVICE,
                       simulated_validation: tuple[int, int] = SIMULATED_VALIDATION) -> dict[str, Any]:
    """Every seed's study (reusing the demo's folders), then headroom.json and headroom.png in ``out``."""
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: must be >= 1")
    out = Path(out)
    t0 = time.perf_counter()
    runs = []
    quiet: list[str] = []
    for k in tqdm(range(seeds), desc="bench headroom", dynamic_ncols=True):
        cfg = seed_config(base, k)
        r = run_seed(cfg, seed_folder(out, k), candidates, log=quiet.append, device=device,
                     simulated_per_device=simulated_per_device, simulated_validation=simulated_validation)
        runs.append(r)
        log(f"seed {cfg.benchmark.seed}: global {100 * r['ceilings']['global']['unseen']['mean']:.1f}, "
            f"last layer {100 * r['ceilings']['last_layer']['unseen']['mean']:.1f}, "
            f"oracle {100 * r['ceilings']['oracle']['unseen']['mean']:.1f} unseen ({r['seconds']:.0f} s)")
    summary = {**summarise(runs), "runs": runs, "base_config": base.to_dict(), "seconds": time.perf_counter() - t0}
    atomic_write_json(out / HEADROOM_FILE, summary)
    plot(summary, out / PLOT_FILE, [c.key for c in candidates])
    return summary


def _cell(s: dict[str, Any]) -> str:
    return f"{100 * s['ci']['mean']:.1f} ({100 * s['min']:.1f}–{100 * s['max']:.1f})"


def _gain(ci: dict[str, float]) -> str:
    word = "tie" if ci["low"] <= 0 <= ci["high"] else ("gain" if ci["low"] > 0 else "loss")
    return f"{100 * ci['mean']:+.1f} [{100 * ci['low']:+.1f}, {100 * ci['high']:+.1f}] {word}"


def _share(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f} %"


def _variant_label(row: dict[str, Any]) -> str:
    """The method's label with what the candidate changes: its overrides and its simulated devices."""
    extra = [f"{k} {v}" for k, v in row["overrides"].items()]
    if row.get("simulated"):
        extra.append(f"+{row['simulated']} simulated devices")
    if row.get("real_share"):
        extra.append(f"real clips {100 * row['real_share']:.0f} %")
    return row["label"] + (f" [{', '.join(extra)}]" if extra else "")


def format_table(summary: dict[str, Any]) -> str:
    """The ceilings, the methods (both modes, gain over the global head, share of the unseen headroom),
    the alignment of Θ_d and what the upload carries, as markdown."""
    n = summary["n_seeds"]
    lines = [f"Unseen headroom (oracle − global head): {100 * summary['headroom_unseen']:.1f} points, mean over "
             f"{n} seeds. Cells: mean (min–max over seeds); gains paired per device over the global head, pooled "
             "over the seeds' devices, with 95 % intervals.", "",
             "| ceiling | seen | unseen | unseen gain | share of unseen headroom |", "|---|---|---|---|---|"]
    for row in summary["ceilings"].values():
        gain = _gain(row["gain_unseen"]) if "gain_unseen" in row else "—"
        lines.append(f"| {row['label']} | {_cell(row['seen'])} | {_cell(row['unseen'])} | {gain} | "
                     f"{_share(row['share_unseen'])} |")
    lines += ["", "| method | validation: seen / simulated | seen | unseen | unseen gain | share | "
              "per session unseen | "
              "session gain | seen gain |", "|---|---|---|---|---|---|---|---|---|"]
    for key, row in summary["methods"].items():
        label = _variant_label(row) + ("" if row["cloud"] else " (device only)")
        best = " **(chosen on validation)**" if key == summary.get("best_cloud") else ""
        val = (f"{_cell(row['validation'])} / {_cell(row['validation_simulated'])}"
               if "validation_both" in row else "—")
        lines.append(
            f"| {label}{best} | {val} | {_cell(row['per_sample_seen'])} | {_cell(row['per_sample_unseen'])} | "
            f"{_gain(row['per_sample_unseen']['gain'])} | {_share(row['share_unseen'])} | "
            f"{_cell(row['per_session_unseen'])} | {_gain(row['per_session_unseen']['gain'])} | "
            f"{_gain(row['per_sample_seen']['gain'])} |")
    hyper = [(k, r) for k, r in summary["methods"].items() if "alignment" in r]
    if hyper:
        lines += ["", "| generator | driver ceiling, unseen | its share | cos to optimum, seen | cos, unseen | "
                  "norm ratio, unseen | between-device share of Θ_d variance |", "|---|---|---|---|---|---|---|"]
        for _, r in hyper:
            a = r["alignment"]
            label = _variant_label(r)
            lines.append(f"| {label} | {_cell(r['driver_ceiling']['unseen'])} | "
                         f"{_share(r['driver_ceiling']['share_unseen'])} | {a['cosine_seen']['ci']['mean']:.2f} | "
                         f"{a['cosine_unseen']['ci']['mean']:.2f} | {a['norm_ratio_unseen']['ci']['mean']:.2f} | "
                         f"{a['between_share']['ci']['mean']:.2f} |")
    up = summary["upload"]
    lines += ["", f"Upload: the device probe names a seen device from one frame in "
              f"{_cell(up['device_probe'])} % (chance {100 * up['probe_chance']:.0f} %); the colour cast is "
              f"regressed from the 192 floats with R² {up['cast_r2_seen']['ci']['mean']:.2f} on seen and "
              f"{up['cast_r2_unseen']['ci']['mean']:.2f} on unseen devices."]
    if summary.get("goals"):
        g = summary["goals"]
        lines.append(f"Best cloud method (validation): {_variant_label(summary['methods'][summary['best_cloud']])}; "
                     f"{_share(g['share_unseen'])} of the unseen headroom (goal ≥ 50 %), unseen gain "
                     f"{_gain(g['gain_unseen'])}, seen gain {_gain(g['gain_seen'])}, per session − per sample "
                     f"{100 * g['session_minus_sample_unseen']:+.1f} unseen / "
                     f"{100 * g['session_minus_sample_seen']:+.1f} seen.")
    return "\n".join(lines)
