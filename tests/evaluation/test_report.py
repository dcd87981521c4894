"""report.md's claims: per-sample and per-session comparisons each carry their paired interval."""

from __future__ import annotations

from typing import Any

from stablesynth.evaluation.report import session_costs, verdicts

SEEN, UNSEEN = [str(d) for d in range(8)], ["8", "9", "10", "11"]


def _mode(per_device: dict[str, float]) -> dict[str, Any]:
    def block(ids: list[str]) -> dict[str, float]:
        return {"mean": sum(per_device[d] for d in ids) / len(ids), "worst": min(per_device[d] for d in ids),
                "std": 0.0, "n": len(ids)}

    return {"per_device": per_device, "seen": block(SEEN), "unseen": block(UNSEEN), "all": block(SEEN + UNSEEN)}


def _results() -> dict[str, Any]:
    ids = SEEN + UNSEEN
    # Ours: per sample 0.9 everywhere; per session clearly worse on seen devices, mixed on unseen ones.
    ours_session = {d: (0.7 + 0.01 * (int(d) % 3) if d in SEEN else 0.9 + (0.05 if int(d) % 2 else -0.05))
                    for d in ids}
    other_session = {d: 0.85 for d in ids}
    return {
        "benchmark": {"devices": [{"id": int(d), "seen": d in SEEN} for d in ids]},
        "methods": {
            "ours": {"label": "Ours", "proposed": True, "adaptive": True,
                     "accuracy": {"per_sample": _mode(dict.fromkeys(ids, 0.9)), "per_session": _mode(ours_session)}},
            "base": {"label": "Base", "adaptive": False,
                     "accuracy": {"per_sample": _mode(dict.fromkeys(ids, 0.8)),
                                  "per_session": _mode(other_session)}},
        },
    }


def test_per_session_comparisons_use_the_per_session_figures() -> None:
    per_sample = verdicts(_results())
    per_session = verdicts(_results(), mode="per_session")
    assert [s.split(":")[0] for s in per_sample] == ["On seen devices Ours beats Base",
                                                      "On unseen devices Ours beats Base"]
    assert per_session[0].startswith("On seen devices Ours loses to Base: -14.1") and "over 8 devices" in per_session[0]
    assert per_session[1].startswith("On unseen devices Ours ties with Base") and "tie)" in per_session[1]


def test_session_costs_pair_each_adaptive_method_with_itself_per_sample() -> None:
    said = session_costs(_results())
    assert len(said) == 2  # the non-adaptive method has no upload to move
    assert said[0].startswith("On seen devices Ours per session loses to Ours per sample: -19.1")
    assert "over 8 devices" in said[0]
    assert said[1].startswith("On unseen devices Ours per session ties with Ours per sample: +0.0")
