"""report.md's multiple-choice and retrieval sections of the embedded benchmark (results.json ``tasks``)."""

from __future__ import annotations

from typing import Any

from stablesynth.evaluation.report import _pct, per_session_said, verdicts

GROUPS: tuple[str, ...] = ("seen", "unseen")


def _task_view(task: dict[str, Any]) -> dict[str, Any]:
    """The slice of a task that :func:`verdicts` reads, shaped as a results.json."""
    return {"methods": task["methods"], "benchmark": {"devices": task["devices"]}, "oracle": task.get("oracle")}


def _said(task: dict[str, Any], metric: str, per_session: bool = False) -> list[str]:
    view = _task_view(task)
    said = verdicts(view, metric)
    out = ["", "What the numbers say:", ""] + [f"- {v}" for v in said] if said else []
    if per_session:
        out += per_session_said(view, metric, "Per session:")
    return out


def render_mc(task: dict[str, Any]) -> list[str]:
    paper = task.get("paper", {}).get("accuracy", {})
    lines = ["## Multiple choice on captions (the paper's Table 6 layout)", "",
             f"{task['clips']} real-time clips ({task['clips_per_device']} per device, the start of each session). "
             f"Each clip's caption (\"a red circle\") is one of {task['candidates']} candidates; of the four "
             f"distractors {task['same_colour']} share its colour and the rest its shape. The highest score wins; "
             f"chance {_pct(task['chance'])} %. The matching model fine-tunes the open-ended stage-1 model on "
             f"{task['train_rows']:,} (clip, caption) rows of the seen devices' history (each clip with its caption "
             "and one such distractor). Paper column: MSRVTT-MC, Table 6.", "",
             "| method | seen mean | seen worst | unseen mean | unseen worst | per session: seen | unseen | paper |",
             "|---|---|---|---|---|---|---|---|"]
    rows = list(task["methods"].items())
    if task.get("oracle"):
        rows.append(("oracle", {"label": "per-device fine-tuning (oracle)", "accuracy": {
            "per_sample": task["oracle"]["accuracy"], "per_session": None}}))
    for name, m in rows:
        a, s = m["accuracy"]["per_sample"], m["accuracy"]["per_session"]
        p = paper.get(name)
        lines.append(f"| {m['label']} | {_pct(a['seen']['mean'])} | {_pct(a['seen']['worst'])} | "
                     f"{_pct(a['unseen']['mean'])} | {_pct(a['unseen']['worst'])} | "
                     f"{_pct(s['seen']['mean']) if s else '—'} | {_pct(s['unseen']['mean']) if s else '—'} | "
                     f"{p if p is not None else '—'} |")
    return lines + _said(task, "MC accuracy", per_session=True) + [""]


def render_ret(task: dict[str, Any]) -> list[str]:
    ks = task["ks"]
    keys = [f"{d}@{k}" for d in ("VR", "TR") for k in ks]
    paper = task.get("paper", {}).get("retrieval", {})
    chance = task["chance"]
    lines = ["## Retrieval on captions (the paper's Table 3 layout)", "",
             f"The same {task['clips']} clips against all {task['captions']} captions. Captions repeat across "
             "clips, so a hit is any item with the right caption: VR@K (text → video) counts a caption as found "
             "when one of its K best-scoring clips has it, TR@K (video → text) counts a clip as named when its "
             "caption is among the K best captions; ties count against the query. Chance levels are computed "
             "for these clips and captions. Paper values (MSRVTT 1k-A) in brackets.", "",
             "Pooled: the clips of all seen (or all unseen) devices ranked together.", "",
             "| method | devices | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    rows = list(task["methods"].items())
    if task.get("oracle"):
        rows.append(("oracle", {"label": "per-device fine-tuning (oracle)", **task["oracle"]}))
    for group in GROUPS:
        for name, m in rows:
            r = m["pooled"].get(group)
            if not r:
                continue
            p = paper.get(name, {}) if group == "seen" else {}
            cells = [_pct(r[k]) + (f" ({p[k]})" if k in p else "") for k in keys]
            lines.append(f"| {m['label']} | {group} | " + " | ".join(cells) + " |")
        if group in chance["pooled"]:
            lines.append(f"| chance | {group} | " + " | ".join(_pct(chance["pooled"][group][k]) for k in keys) + " |")
    lines += ["", f"Within a session: each device's {task['clips_per_device']} clips ranked among themselves, "
              "mean over the group's devices (the per-device figure of the comparisons below is session VR@1).", "",
              "| method | devices | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for group in GROUPS:
        for _, m in rows:
            r = m["session"].get(group)
            if r:
                lines.append(f"| {m['label']} | {group} | " + " | ".join(_pct(r[k]) for k in keys) + " |")
        if group in chance["session"]:
            lines.append(f"| chance | {group} | " + " | ".join(_pct(chance["session"][group][k]) for k in keys) + " |")
    return lines + _said(task, "session VR@1") + [""]


def render_tasks(results: dict[str, Any]) -> list[str]:
    """The sections of every caption task the run measured."""
    tasks = results.get("tasks") or {}
    lines: list[str] = [""]
    if "mc" in tasks:
        lines += render_mc(tasks["mc"])
    if "ret" in tasks:
        lines += render_ret(tasks["ret"])
    return lines
