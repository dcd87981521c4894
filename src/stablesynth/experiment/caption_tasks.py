"""Multiple choice (the paper's Table 6) and retrieval (Table 3) on the embedded benchmark.

Every clip's scene has a caption ("a red circle", :mod:`stablesynth.data.captions`). One
(clip, caption) matching model serves both tasks, as All-in-One's ITM head does: stage 1
starts from the open-ended task's stage-1 encoder (and stage 0 before it, both cached) and
fine-tunes it with a K = 1 head on the seen devices' history, each clip with its caption
and one distractor; stage 2 trains every method on those rows (:mod:`stablesynth.methods.pairs`).
The test scores each device's first real-time clips against all 24 captions; that one
[clips × captions] matrix gives

- **multiple choice**: the clip's caption among four distractors that share its colour or
  its shape, the highest score wins (chance 1/5);
- **retrieval**: VR@K / TR@K within each device's session and over the pooled clips of the
  seen and of the unseen devices, a hit being any item with the right caption
  (:mod:`stablesynth.evaluation.caption_metrics`, chance levels computed alongside).

Per-device figures (MC accuracy; session VR@1) feed the same paired intervals as QA.
Methods that need answer classes (the label-prior baseline) do not apply and are skipped.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from pydantic import Field
from torch import nn

from stablesynth.checkpoint import read_manifest
from stablesynth.config import Config
from stablesynth.data.captions import CAPTIONS, MC_CANDIDATES, ROWS_VERSION, CaptionPairs, PairBatches
from stablesynth.evaluation.caption_metrics import RECALL_KS, caption_recall, caption_recall_chance, mc_hits
from stablesynth.evaluation.metrics import accuracy_block
from stablesynth.experiment.results import method_entry
from stablesynth.experiment.studies import tune_device_heads
from stablesynth.experiment.workspace import Workspace, drop_stale_checkpoint
from stablesynth.methods import METHODS, Method, MethodConfig
from stablesynth.methods.pairs import PairModel, pair_method_class, pair_scores, two_logits
from stablesynth.presets import get_preset
from stablesynth.training.features import cached_features, module_fingerprint
from stablesynth.training.stage1 import Stage1Config, train_stage1

MODES: tuple[str, ...] = ("per_sample", "per_session")


class CaptionTaskConfig(Config):
    """The multiple-choice and retrieval tasks of ``stablesynth demo --task mc|ret|all``."""

    #: Real-time clips per device scored against every caption (the start of each session).
    clips_per_device: int = Field(12, ge=2)
    #: Of a multiple-choice item's four distractors, how many share the clip's colour (the rest its shape).
    mc_same_colour: int = Field(2, ge=0, le=2)
    #: Stage-2 epochs of every method on the (clip, caption) rows (None: each method's own, 40 by
    #: default); the rows are twice the clips, so 10 epochs are as many steps as 20 of the QA task.
    stage2_epochs: int | None = Field(10, ge=1)
    #: Fine-tuning of the open-ended stage-1 model into the (clip, caption) matching model. 12 epochs:
    #: at 4 the pair loss was still falling steeply when the schedule ended, so the outcome followed
    #: float noise (thread count, CPU) and the seed; 12 reach the plateau (docs/choices.md).
    stage1: Stage1Config = Field(default_factory=lambda: Stage1Config(epochs=12, lr=5e-4, warmup_ratio=0.1))


class CaptionRun:
    """The matching model, its caches and its workspace (``out/captions``), built on a finished demo run."""

    def __init__(self, run: Any, cfg: CaptionTaskConfig) -> None:
        self.run, self.cfg = run, cfg
        base = run.ws
        self.pairs = CaptionPairs(run.bench, cfg.clips_per_device, cfg.mc_same_colour, seed=run.cfg.seed)
        dropout = cfg.stage1.head_dropout
        model = PairModel(copy.deepcopy(base.model.encoder), 1, dropout=dropout)
        model.static.load_state_dict(base.model.static.state_dict())
        initial = PairModel(copy.deepcopy(base.initial.encoder), 1, dropout=dropout)
        initial.static.load_state_dict(base.initial.static.state_dict())
        self.ws = Workspace(
            out=base.out / "captions", seed=base.seed, K=1, seen=base.seen, model=model, initial=initial,
            method_config=self.method_config, num_categories=self.num_categories,
            answer_names=["no match", "match"], paper_preset="msrvtt-mc", eval_batch_size=base.eval_batch_size,
            adapt_timing_repeats=base.adapt_timing_repeats, method_class=self.method_class,
            model_prefix="easyvqa-captions", reuse=base.reuse, log=base.log, device=base.device,
            validation_ids=base.validation_ids,
        )
        self.ws.out.mkdir(parents=True, exist_ok=True)
        # The scored clips, in score-matrix row order: their captions, devices and MC items.
        clip_rows = self.pairs.test_clip_rows
        self.clip_caps = self.pairs.clip_caption["realtime"][clip_rows]
        self.clip_device = run.bench.splits["realtime"].device[clip_rows]
        self.clip_seen = torch.isin(self.clip_device, torch.tensor(sorted(self.ws.seen)))
        self.mc_options, self.mc_answers = self.pairs.mc_items()

    def _key(self) -> dict[str, Any]:
        """What the matching model's rows depend on (its stage-1 and cache keys)."""
        return {**self.cfg.model_dump(exclude={"stage1", "stage2_epochs"}), "rows_version": ROWS_VERSION}

    def method_config(self, name: str) -> MethodConfig:
        mcfg = self.run.cfg.method_config(name)
        if self.cfg.stage2_epochs is not None:
            mcfg = mcfg.replace(epochs=self.cfg.stage2_epochs)
        # Match / non-match are the two categories of a K = 1 task.
        return mcfg.replace(num_categories=2) if mcfg.category == "answer" and mcfg.num_categories is None else mcfg

    def num_categories(self, kind: str) -> int:
        return 2 if kind == "answer" else self.run.bench.num_categories(kind)

    @staticmethod
    def method_class(name: str) -> type[Method]:
        return pair_method_class(METHODS.get(name))

    # -- stage 1 and features ----------------------------------------------------------------

    def stage1(self) -> None:
        t = time.perf_counter()
        ws, cfg = self.ws, self.cfg
        fields = {"from_stage1": read_manifest(self.run.ws.out / "stage1")["sha256"],
                  "benchmark": self.run.bench.fingerprint(), "captions": self._key(), "seed": ws.seed}
        drop_stale_checkpoint(ws.out / "stage1", {**fields, "config": cfg.stage1.to_dict()}, ws.log, Stage1Config)
        rows = self.pairs.select("history", "train")

        def loader(epoch: int) -> PairBatches:
            gen = torch.Generator().manual_seed(ws.seed * 1000 + 500 + epoch)
            order = rows[torch.randperm(len(rows), generator=gen)]
            order = order[:len(order) - len(order) % cfg.stage1.batch_size] if len(order) > cfg.stage1.batch_size \
                else order
            return PairBatches(self.pairs, "history", order, cfg.stage1.batch_size)

        ws.stage1_info = train_stage1(ws.model, loader, cfg.stage1, ws.out / "stage1", ws.seed,
                                      manifest_extra=fields, log=ws.log, device=ws.device)
        ws.model.cpu()
        ws.stage1_info["seconds"] = time.perf_counter() - t
        ws.timed("stage1", t)

    def _cache(self, tag: str, encoder: nn.Module, split: str, devices: str) -> dict[str, torch.Tensor]:
        index = self.pairs.select(split, devices)
        bs = self.ws.eval_batch_size
        batches = PairBatches(self.pairs, split, index, bs)
        key = {"encoder": module_fingerprint(encoder), "benchmark": self.run.bench.fingerprint(), "split": split,
               "devices": devices, "rows": len(index), "captions": self._key()}
        return cached_features(encoder, lambda: batches, len(batches), self.ws.out / "features" / f"{tag}-{split}",
                               key, f"features captions {tag}/{split}", self.ws.log, self.ws.device)

    def cache_features(self) -> None:
        t = time.perf_counter()
        ws = self.ws
        ws.rows = {"history": self._cache("trained", ws.model.encoder, "history", "all"),
                   "realtime": self._cache("trained", ws.model.encoder, "realtime", "all")}
        if ws.wants_untrained_features(self.run.cfg.methods):
            ws.rows["init_history"] = self._cache("init", ws.initial.encoder, "history", "seen")
            ws.rows["init_realtime"] = self._cache("init", ws.initial.encoder, "realtime", "all")
        ws.timed("features", t)

    # -- evaluation --------------------------------------------------------------------------

    def scored(self, scores: torch.Tensor) -> dict[str, Any]:
        """Both tasks' figures from one [clips × captions] score vector (row order of the real-time rows)."""
        n_cap = len(CAPTIONS)
        sim = scores.view(-1, n_cap)
        caps, device = self.clip_caps, self.clip_device
        hits = mc_hits(sim, self.mc_options, self.mc_answers)
        seen = self.ws.seen
        mc_dev = {int(d): float(hits[device == d].double().mean()) for d in device.unique().tolist()}
        session = {int(d): caption_recall(sim[device == d], caps[device == d]) for d in device.unique().tolist()}
        ret = {"accuracy": accuracy_block({d: r["VR@1"] for d, r in session.items()}, seen),
               "session": _group_means(session, seen), "pooled": {}}
        for group, mask in (("seen", self.clip_seen), ("unseen", ~self.clip_seen)):
            if mask.any():
                ret["pooled"][group] = caption_recall(sim[mask], caps[mask])
        return {"mc": {"accuracy": accuracy_block(mc_dev, seen), "all": float(hits.double().mean())}, "ret": ret}

    def evaluate(self) -> dict[str, dict[str, Any]]:
        ws = self.ws
        out: dict[str, dict[str, Any]] = {"mc": {}, "ret": {}}
        for name in self.run.cfg.methods:
            if self.method_class(name).needs_answer_classes:
                ws.log(f"captions {name}: skipped, it needs answer classes and these tasks score (clip, caption) pairs")
                continue
            method, train_seconds = ws.train_or_load(name)
            rt = ws.data(ws.feature_key("realtime", method), method.cfg.category)
            entry = {**method_entry(method, train_seconds), **ws.costs(name, method, rt)}
            per_mode = {mode: self.scored(pair_scores(method, rt, ws.eval_batch_size, mode)) for mode in MODES}
            for task in ("mc", "ret"):
                out[task][name] = {**entry, "accuracy": {m: per_mode[m][task]["accuracy"] for m in MODES},
                                   **{k: v for k, v in per_mode["per_sample"][task].items() if k != "accuracy"},
                                   "per_session": {k: v for k, v in per_mode["per_session"][task].items()
                                                   if k != "accuracy"}}
            m = out["mc"][name]["accuracy"]["per_sample"]
            r = out["ret"][name]["accuracy"]["per_sample"]
            ws.log(f"{'captions ' + name:>24}: MC seen {100 * m['seen']['mean']:.1f} unseen "
                   f"{100 * m['unseen']['mean']:.1f} | session VR@1 seen {100 * r['seen']['mean']:.1f} "
                   f"unseen {100 * r['unseen']['mean']:.1f}")
        return out

    def oracle(self) -> dict[str, dict[str, Any]]:
        """Per-device fine-tuning of the matching head on each device's history rows."""
        ws = self.ws
        realtime = ws.data("realtime")
        heads, seconds = tune_device_heads(ws, self.run.cfg.oracle, ws.data("history"),
                                           realtime.device.unique().tolist(), logits=two_logits)
        scores = torch.empty(len(realtime), dtype=torch.float64)
        with torch.inference_mode():
            for d, head in heads.items():
                idx = torch.nonzero(realtime.device == d).flatten()
                scores[idx] = head(realtime.index(idx).f_g)[:, 0].double()
        res = self.scored(scores)
        med = sorted(seconds.values())[len(seconds) // 2]
        return {task: {**res[task], "finetune_seconds": {"median": med, "per_device": seconds}}
                for task in ("mc", "ret")}


def _group_means(per_device: dict[int, dict[str, float]], seen: set[int]) -> dict[str, dict[str, float]]:
    out = {}
    for group in ("seen", "unseen"):
        rows = [v for d, v in per_device.items() if (d in seen) == (group == "seen")]
        if rows:
            out[group] = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    return out


def run_caption_tasks(run: Any, cfg: CaptionTaskConfig, tasks: set[str], oracle: bool) -> dict[str, Any]:
    """Stage 1, caches, stage 2 and evaluation of the caption tasks; results.json's ``tasks`` entries."""
    t0 = time.perf_counter()
    cr = CaptionRun(run, cfg)
    cr.stage1()
    cr.cache_features()
    methods = cr.evaluate()
    oracles = cr.oracle() if oracle else {}
    devices = [{"id": d.id, "seen": d.seen} for d in run.bench.devices]
    caps, device, seen_mask = cr.clip_caps, cr.clip_device, cr.clip_seen
    common = {"devices": devices, "clips": len(caps), "clips_per_device": cfg.clips_per_device,
              "captions": len(CAPTIONS), "train_rows": len(cr.pairs.select("history", "train")),
              "stage1": cr.ws.stage1_info, "timings": cr.ws.timings, "seconds": time.perf_counter() - t0}
    out: dict[str, Any] = {}
    if "mc" in tasks:
        out["mc"] = {**common, "methods": methods["mc"], "oracle": oracles.get("mc"), "chance": 1 / MC_CANDIDATES,
                     "candidates": MC_CANDIDATES, "same_colour": cfg.mc_same_colour,
                     "paper": {"preset": "msrvtt-mc", **get_preset("msrvtt-mc").paper.to_dict()}}
    if "ret" in tasks:
        chance = {"session": _group_means(
            {int(d): caption_recall_chance(caps[device == d], len(CAPTIONS)) for d in device.unique().tolist()},
            cr.ws.seen),
            "pooled": {g: caption_recall_chance(caps[m], len(CAPTIONS))
                       for g, m in (("seen", seen_mask), ("unseen", ~seen_mask)) if m.any()}}
        out["ret"] = {**common, "methods": methods["ret"], "oracle": oracles.get("ret"), "chance": chance,
                      "ks": list(RECALL_KS),
                      "paper": {"preset": "msrvtt-ret", **get_preset("msrvtt-ret").paper.to_dict()}}
    return out
