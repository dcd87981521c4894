"""Paper presets: one per task/dataset of the paper, plus the embedded easy-VQA benchmark.

A preset fixes what the paper fixes (task kind, label count K, driver size, encoder,
frames D, text length, image size, the two training stages' schedules) and carries the
paper's own figures so that reports can print them beside ours. The payload table,
the video datasets and training all read K from here, so the bytes a report prints
are the bytes the system sends.

K values are All-in-One's label sizes (its ``msrvttqa_label_size`` 1501; 1000 + 1
background for MSVD-QA; 1540 + 1 background for TGIF FrameQA). Multiple choice and
retrieval score one (question, candidate) or (video, caption) pair per row, so their
dynamic layer has a single output (K = 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal

from stablesynth.registry import Registry

Task = Literal["open_qa", "mc_qa", "retrieval"]
TASKS: tuple[str, ...] = ("open_qa", "mc_qa", "retrieval")

# The four methods of the paper's Tables 1, 3 and 6, in the paper's row order.
PAPER_METHODS: tuple[str, ...] = ("f_linear", "fine_tune", "f_hyper", "stablesynth")
# Table 5's bandwidth columns (the paper's MB/s = 1024 KB/s, KB = 1024 B).
PAPER_BANDWIDTHS_MBPS: tuple[float, ...] = (5.0, 15.0, 50.0, 100.0)

PRESETS: Registry[TaskPreset] = Registry("preset")


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclasses.dataclass(frozen=True)
class PaperFigures:
    """The paper's published numbers for one preset (empty where the paper has none).

    accuracy:        Table 1 (open-ended) or Table 6 (multiple choice), percent, by method
    time_delay_ms:   the same tables' "Time Delay" lower bounds (≥), milliseconds, by method
    retrieval:       Table 3, method → {"VR@1", ..., "TR@10"} in percent
    duet:            Table 2, {"duet": {"accuracy", "latency_s"}, "stablesynth": {...}}
    download_kb:     Table 5 ↓ size (KB = 1024 B)
    upload_kb:       Table 5 ↑ size
    transfer_ms:     Table 5, bandwidth in MB/s → {"up": ms, "down": ms}
    """

    accuracy: Mapping[str, float] = dataclasses.field(default_factory=dict, hash=False)
    time_delay_ms: Mapping[str, float] = dataclasses.field(default_factory=dict, hash=False)
    retrieval: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict, hash=False)
    duet: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict, hash=False)
    download_kb: float | None = None
    upload_kb: float | None = None
    transfer_ms: Mapping[float, Mapping[str, float]] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # Read-only views: a preset is shared module state and must not drift between reports.
        for name in ("accuracy", "time_delay_ms", "retrieval", "duet", "transfer_ms"):
            value = getattr(self, name)
            inner = {k: _frozen(v) if isinstance(v, Mapping) else v for k, v in value.items()}
            object.__setattr__(self, name, _frozen(inner))

    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            if isinstance(v, Mapping):
                return {str(k): plain(x) for k, x in v.items()}
            return v

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class TaskPreset:
    """Everything the paper fixes for one task/dataset.

    num_classes is K, the output size of the device's dynamic layer (96 → K);
    num_candidates is 5 for multiple choice (one row, one logit per candidate), else 1.
    """

    name: str
    task: Task
    num_classes: int
    description: str
    driver_dim: int = 96
    hidden_dim: int = 96
    feature_dim: int = 192
    encoder: str = "allinone-ti"
    frames: int = 3
    text_len: int = 40
    image_size: int = 224
    num_candidates: int = 1
    stage1_lr: float = 2e-5
    stage1_epochs: int = 10
    stage2_lr: float = 1e-4
    stage2_epochs: int = 40
    paper: PaperFigures = dataclasses.field(default_factory=PaperFigures, hash=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field of an impossible preset."""
        if self.task not in TASKS:
            raise ValueError(f"preset {self.name!r}: task {self.task!r} is not one of {list(TASKS)}")
        for key in ("num_classes", "driver_dim", "hidden_dim", "feature_dim", "frames", "text_len",
                    "image_size", "num_candidates", "stage1_epochs", "stage2_epochs"):
            if getattr(self, key) < 1:
                raise ValueError(f"preset {self.name!r}: {key} must be >= 1, got {getattr(self, key)}")
        for key in ("stage1_lr", "stage2_lr"):
            if not getattr(self, key) > 0:
                raise ValueError(f"preset {self.name!r}: {key} must be > 0, got {getattr(self, key)}")
        if self.task == "mc_qa" and self.num_candidates < 2:
            raise ValueError(f"preset {self.name!r}: num_candidates must be >= 2 for multiple choice")

    @property
    def dynamic_numel(self) -> int:
        """Floats in Θ_d: weight K × hidden plus bias K."""
        return self.num_classes * (self.hidden_dim + 1)

    def replace(self, **changes: Any) -> TaskPreset:
        """A copy with some fields changed (validated), e.g. a smaller image size for a CPU run."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "paper"}
        out["paper"] = self.paper.to_dict()
        return out


def register_preset(preset: TaskPreset) -> TaskPreset:
    PRESETS.register(preset.name)(preset)
    return preset


def get_preset(name: str) -> TaskPreset:
    """The preset called ``name``; an unknown name raises an error listing the known presets."""
    return PRESETS.get(name)


def preset_names() -> list[str]:
    return PRESETS.names()


def _table5(download_kb: float, down_ms: tuple[float, ...]) -> dict[str, Any]:
    up_ms = (0.15, 0.05, 0.01, 0.007)
    return {
        "download_kb": download_kb,
        "upload_kb": 0.75,
        "transfer_ms": {bw: {"up": u, "down": d} for bw, u, d in zip(PAPER_BANDWIDTHS_MBPS, up_ms, down_ms)},
    }


def _methods(values: tuple[float, ...]) -> dict[str, float]:
    return dict(zip(PAPER_METHODS, values))


#: The paper's cloud-step FLOPs at K = 1501 (§4.4): DUET's full generator and StableSynthNet's step.
PAPER_CLOUD_MFLOPS: dict[str, float] = {"duet": 28.2, "stablesynth": 0.62}


def _duet(duet_acc: float, duet_s: float, ours_acc: float, ours_s: float) -> dict[str, dict[str, float]]:
    return {"duet": {"accuracy": duet_acc, "latency_s": duet_s, "cloud_mflops": PAPER_CLOUD_MFLOPS["duet"]},
            "stablesynth": {"accuracy": ours_acc, "latency_s": ours_s,
                            "cloud_mflops": PAPER_CLOUD_MFLOPS["stablesynth"]}}


_SLOW = 60000.0  # the paper's "≥ 60000 ms" for anything that fine-tunes

def _open_qa(name: str, K: int, description: str, accuracy: tuple[float, ...], hypernet_ms: float,
             duet: tuple[float, float, float, float], download_kb: float, down_ms: tuple[float, ...]) -> None:
    """Register an open-ended QA preset with the paper's figures (Tables 1, 2 and 5)."""
    delays = _methods((_SLOW, _SLOW, hypernet_ms, hypernet_ms))
    register_preset(TaskPreset(
        name=name, task="open_qa", num_classes=K, description=description,
        paper=PaperFigures(accuracy=_methods(accuracy), time_delay_ms=delays, duet=_duet(*duet),
                           **_table5(download_kb, down_ms)),
    ))


_open_qa("msrvtt-qa", 1501, "MSRVTT-QA open-ended video QA (All-in-One label size 1501)",
         accuracy=(13.6, 36.7, 11.1, 36.9), hypernet_ms=5.55, duet=(33.4, 1.80, 36.9, 1.24),
         download_kb=568.5, down_ms=(111.0, 37.0, 11.1, 5.55))
_open_qa("msvd-qa", 1001, "MSVD-QA open-ended video QA (1000 answers + 1 background)",
         accuracy=(17.3, 34.3, 6.34, 35.3), hypernet_ms=3.71, duet=(34.2, 1.88, 35.3, 1.16),
         download_kb=379.4, down_ms=(74.0, 24.7, 7.41, 3.71))
_open_qa("tgif-frameqa", 1541, "TGIF-QA FrameQA open-ended QA (1540 answers + 1 background)",
         accuracy=(2.73, 54.7, 19.6, 55.5), hypernet_ms=5.70, duet=(55.2, 2.00, 55.5, 0.99),
         download_kb=583.8, down_ms=(114.0, 38.0, 11.4, 5.70))

register_preset(TaskPreset(
    name="msrvtt-mc", task="mc_qa", num_classes=1, num_candidates=5,
    description="MSRVTT multiple-choice QA: question [SEP] candidate, 5 candidates, highest logit wins",
    paper=PaperFigures(
        accuracy=_methods((3.58, 75.6, 46.0, 76.2)),
        time_delay_ms=_methods((_SLOW, _SLOW, 5.70, 5.70)),
    ),
))

register_preset(TaskPreset(
    name="msrvtt-ret", task="retrieval", num_classes=1, driver_dim=256,
    description="MSRVTT text-video retrieval (9k train / 1k-A test), one match score per pair",
    paper=PaperFigures(
        retrieval={
            "f_linear": {"VR@1": 2.0, "VR@5": 7.7, "VR@10": 14.1, "TR@1": 3.1, "TR@5": 10.1, "TR@10": 16.9},
            "fine_tune": {"VR@1": 4.8, "VR@5": 17.6, "VR@10": 27.9, "TR@1": 6.2, "TR@5": 20.7, "TR@10": 31.8},
            "f_hyper": {"VR@1": 2.6, "VR@5": 8.6, "VR@10": 14.7, "TR@1": 2.7, "TR@5": 11.4, "TR@10": 17.6},
            "stablesynth": {"VR@1": 5.8, "VR@5": 20.2, "VR@10": 31.2, "TR@1": 6.4, "TR@5": 20.4,
                            "TR@10": 33.1},
        },
    ),
))


# easy-VQA scenes are 64 × 64; the default demo's encoder sees them at 32 px (16 tokens from a
# small conv stem), which keeps every shape and colour legible and the demo within its budget.
register_preset(TaskPreset(
    name="easyvqa", task="open_qa", num_classes=13, encoder="allinone-cpu-stem", image_size=32, text_len=16,
    description="the embedded easy-VQA device benchmark (13 answers)",
))
