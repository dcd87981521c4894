"""``stablesynth device export``: write the self-contained device bundle of a method checkpoint.

The bundle's format is the device package's (:mod:`stablesynth_device.bundle`); this module
writes it from the PyTorch models:

- the encoder (the run's stage-1 encoder) to ONNX with the TorchScript exporter: frames
  ``[B, F, 3, S, S]``, ``input_ids`` and ``attention_mask`` ``[B, L]`` (the mask a real input:
  the export traces :meth:`MultimodalEncoder.fuse`, which always applies it) → F_m ``[B, F, 192]``,
  with B, F and L dynamic;
- the word table pruned to the tokens the tokenizer emits for the task's questions (every easy-VQA
  question, train and test, plus the special tokens): 30,522 rows of MiniLM's 384-wide table are
  47 MB of a 51 MB encoder, of which the questions use under a hundred. The bundle's tokenizer is
  the same WordPiece over the kept tokens (renumbered to the table's rows), so every task
  question tokenizes exactly as before; a word outside them becomes ``[UNK]`` (the device reports
  how many). Quantising the whole table instead would keep 12.9 MB for words no question uses;
- the head (static MLP baked in, Θ_d as graph inputs), the tokenizer, the preprocessing, the answer
  names, the global Θ_d and the generator's weights;
- with ``int8``, a dynamically quantised encoder (ONNX Runtime's ``quantize_dynamic``) as well.

Parity is measured while exporting, on real-time clips of the run's benchmark, and written to the
manifest: the encoder's largest feature difference from PyTorch for questions of every length in
the task (padded to the model's length and unpadded), the head's logit difference, the share of
clips whose answer through ONNX Runtime equals PyTorch's, and for int8 the accuracy change with
an interval. The bundle is written to a temporary folder and renamed into place, so a failure
leaves nothing half-written.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stablesynth.cloud.model import CloudModel
from stablesynth.models.device import StaticHead, dynamic_linear
from stablesynth_device import bundle as fmt
from stablesynth_device.frames import MAX_FRAMES
from stablesynth_device.tensors import write_tensors

#: Largest |ONNX Runtime − PyTorch| allowed on encoder features (fp32; values of order 1) and head logits.
ENCODER_TOLERANCE = 1e-4
HEAD_TOLERANCE = 1e-5
OPSET = 17
#: Answer agreement between the ONNX and the PyTorch device path below which the export warns.
MIN_AGREEMENT = 0.999


class ExportError(ValueError):
    """The checkpoint cannot be exported, or the exported models disagree with PyTorch."""


# ----------------------------------------------------------------------------- the ONNX graphs

class _ExportedHead(nn.Module):
    """M_d with Θ_d as arguments: logits = W_d · static(F_g) + b_d."""

    def __init__(self, static: StaticHead) -> None:
        super().__init__()
        self.static = static

    def forward(self, f_g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return dynamic_linear(self.static(f_g), weight, bias)


class _ExportedEncoder(nn.Module):
    """F_m of each frame fused with the question, one frame at a time (as ``encode_frames`` does)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, frames: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, f = frames.shape[0], frames.shape[1]
        flat = frames.reshape(b * f, 1, frames.shape[2], frames.shape[3], frames.shape[4])
        length = input_ids.shape[1]
        # expand + reshape rather than repeat_interleave: it exports with F dynamic.
        ids = input_ids[:, None, :].expand(b, f, length).reshape(b * f, length)
        mask = attention_mask[:, None, :].expand(b, f, length).reshape(b * f, length)
        return self.encoder.fuse(flat, ids, mask).reshape(b, f, -1)


def _onnx_export(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, inputs: Sequence[str],
                 output: str, axes: dict[str, dict[int, str]]) -> None:
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo; it needs no onnxscript at run
        # time and gives a small static graph, so its notices are silenced.
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), example, str(path), input_names=list(inputs), output_names=[output],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)


def export_head_onnx(static: StaticHead, path: Path, num_classes: int) -> None:
    """The device head with ``weight``/``bias`` as graph inputs; batch and K are dynamic axes."""
    was = static.training
    example = (torch.zeros(2, static.fc.in_features), torch.zeros(num_classes, static.fc.out_features),
               torch.zeros(num_classes))
    _onnx_export(_ExportedHead(static), example, path, fmt.HEAD_INPUTS, fmt.HEAD_OUTPUT,
                 {"f_g": {0: "batch"}, "weight": {0: "num_classes"}, "bias": {0: "num_classes"},
                  fmt.HEAD_OUTPUT: {0: "batch", 1: "num_classes"}})
    static.train(was)


def export_encoder_onnx(encoder: nn.Module, path: Path, kept_ids: torch.Tensor | None = None) -> None:
    """The encoder with a pruned word table (rows ``kept_ids``, renumbered 0..V'−1) to ONNX."""
    enc = copy.deepcopy(encoder).eval()
    if kept_ids is not None:
        table = enc.text_embeddings.word_embeddings.weight.detach()[kept_ids].clone()
        enc.text_embeddings.word_embeddings = nn.Embedding.from_pretrained(table, freeze=True)
    cfg = enc.cfg
    length = min(4, cfg.max_text_len)
    example = (torch.rand(1, 2, cfg.in_chans, cfg.image_size, cfg.image_size),
               torch.ones(1, length, dtype=torch.long), torch.tensor([[1] * (length - 1) + [0]]))
    _onnx_export(_ExportedEncoder(enc), example, path, fmt.ENCODER_INPUTS, fmt.ENCODER_OUTPUT,
                 {"frames": {0: "batch", 1: "frames"}, "input_ids": {0: "batch", 1: "length"},
                  "attention_mask": {0: "batch", 1: "length"}, fmt.ENCODER_OUTPUT: {0: "batch", 1: "frames"}})


def quantise_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation of every MatMul/Gather weight (activations stay fp32)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    # The quantiser logs a pre-processing hint at warning level on the root logger for every model.
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


# ----------------------------------------------------------------------------- the tokenizer

def task_token_ids(questions: Sequence[str], tokenizer_json: dict[str, Any]) -> list[int]:
    """Sorted BERT ids of every token of ``questions`` plus the tokenizer's special tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(tokenizer_json))
    tok.no_padding()
    tok.no_truncation()
    ids = {t["id"] for t in tokenizer_json.get("added_tokens", [])}
    for enc in tok.encode_batch(list(questions)):
        ids.update(enc.ids)
    return sorted(ids)


def pruned_tokenizer(tokenizer_json: dict[str, Any], kept: Sequence[int]) -> dict[str, Any]:
    """The WordPiece tokenizer over the ``kept`` ids only, renumbered to their order (0..len−1)."""
    new_id = {old: new for new, old in enumerate(kept)}
    tj = copy.deepcopy(tokenizer_json)
    vocab = tj["model"]["vocab"]
    tj["model"]["vocab"] = {tok: new_id[i] for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i in new_id}
    for t in tj.get("added_tokens", []):
        t["id"] = new_id[t["id"]]
    for special in (tj.get("post_processor") or {}).get("special_tokens", {}).values():
        special["ids"] = [new_id[i] for i in special["ids"]]
    if tj["model"].get("unk_token") not in tj["model"]["vocab"]:
        raise ExportError("the pruned vocabulary lost the [UNK] token")
    # The device pads and refuses over-long questions itself (runtime.QuestionTokenizer).
    tj["padding"] = None
    tj["truncation"] = None
    return tj


# ----------------------------------------------------------------------------- the Θ_d files

def global_params(cloud: CloudModel) -> dict[str, torch.Tensor]:
    """Θ_d the device uses when it has nothing better.

    The generator's shared base (W0, b0) when it has one (``lowrank``/``film``: the
    parameters every adaptation is an offset from); otherwise its output at the zero driver.
    """
    gen = getattr(cloud.method, "generator", None)
    if gen is None:
        raise ExportError(f"method {cloud.method_name!r} has no generator; nothing to export")
    shared = gen.shared()
    if {"weight", "bias"} <= set(shared):
        return {"weight": shared["weight"].detach().clone(), "bias": shared["bias"].detach().clone()}
    with torch.inference_mode():
        out = gen(torch.zeros(1, gen.driver_dim))
    return {"weight": out["weight"][0].clone(), "bias": out["bias"][0].clone()}


def _numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().to("cpu", torch.float32).contiguous().numpy() for k, v in tensors.items()}


# ----------------------------------------------------------------------------- parity

def _paired_interval(diff: np.ndarray, groups: np.ndarray, n_boot: int = 2000, seed: int = 0) -> list[float]:
    """95 % percentile-bootstrap interval of the mean per-group difference (devices resampled)."""
    ids = np.unique(groups)
    means = np.array([diff[groups == g].mean() for g in ids])
    rng = np.random.default_rng(seed)
    boots = means[rng.integers(0, len(means), size=(n_boot, len(means)))].mean(axis=1)
    return [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]


def measure_parity(encoder: nn.Module, cloud: CloudModel, bundle_dir: Path, batches: Callable[[], Any],
                   vocab_table: np.ndarray, int8: bool) -> dict[str, Any]:
    """Features, logits and answers of the ONNX device path against PyTorch on real-time clips.

    ``batches()`` yields clip-loader batches of the real-time split (normalised frames, tokens,
    labels, devices, the frames chosen for F_g and the upload); ``vocab_table`` maps BERT ids to
    the bundle's renumbered ones. The first batch's questions are also run unpadded (L = their own
    length), so the attention mask is shown to matter exactly as in PyTorch.
    """
    from stablesynth.models.global_model import encode_frames
    from stablesynth_device.bundle import Bundle
    from stablesynth_device.runtime import DeviceRuntime

    bundle = Bundle.load(bundle_dir)
    fp32 = DeviceRuntime(bundle, threads=max(1, (os.cpu_count() or 1)))
    q8 = DeviceRuntime(bundle, threads=max(1, (os.cpu_count() or 1)), int8=True) if int8 else None
    feat_diff = logit_diff = 0.0
    labels, devices, torch_pred, onnx_pred, int8_pred, cosines = [], [], [], [], [], []
    lengths_checked: set[int] = set()
    for bi, batch in enumerate(batches()):
        frames = batch["frames"]
        ids_np = remap_ids(batch["input_ids"].numpy(), vocab_table)
        mask_np = batch["attention_mask"].numpy()
        with torch.inference_mode():
            ref = encode_frames(encoder, frames, batch["input_ids"], batch["attention_mask"]).numpy()
        got = fp32.encode_tokens(frames.numpy(), ids_np, mask_np)
        feat_diff = max(feat_diff, float(np.abs(got - ref).max()))
        if bi == 0:
            # The same clips with every question unpadded (L = its own length): the mask must not matter.
            for i in range(min(len(frames), 16)):
                n = int(mask_np[i].sum())
                lengths_checked.add(n)
                one = fp32.encode_tokens(frames[i:i + 1].numpy(), ids_np[i:i + 1, :n], mask_np[i:i + 1, :n])
                feat_diff = max(feat_diff, float(np.abs(one - ref[i:i + 1]).max()))
        idx = np.arange(len(frames))
        g_index = batch["global_index"].numpy()
        up = batch["upload_index"].numpy()

        def device_path(features: np.ndarray, runtime: Any, idx: np.ndarray = idx, g_index: np.ndarray = g_index,
                        up: np.ndarray = up) -> tuple[np.ndarray, np.ndarray]:
            f_g = features[idx[:, None], g_index].mean(axis=1)
            upload = features[idx, up]
            with torch.inference_mode():
                theta = cloud.method.adapt(torch.from_numpy(upload))
            logits = np.stack([runtime.predict(f_g[i], theta["weight"][i].numpy(), theta["bias"][i].numpy())[0]
                               for i in range(len(f_g))])
            with torch.inference_mode():
                torch_logits = cloud.method.predict(torch.from_numpy(f_g), theta).numpy()
            return logits, torch_logits

        logits, _ = device_path(got, fp32)
        _, ref_logits = device_path(ref, fp32)
        with torch.inference_mode():
            f_g_ref = torch.from_numpy(ref[idx[:, None], g_index].mean(axis=1))
            theta_ref = cloud.method.adapt(torch.from_numpy(ref[idx, up]))
            head_ref = cloud.method.predict(f_g_ref, theta_ref).numpy()
        head_onnx = np.stack([fp32.predict(f_g_ref[i].numpy(), theta_ref["weight"][i].numpy(),
                                           theta_ref["bias"][i].numpy())[0] for i in range(len(f_g_ref))])
        logit_diff = max(logit_diff, float(np.abs(head_onnx - head_ref).max()))
        labels.append(batch["label"].numpy())
        devices.append(batch["device"].numpy())
        torch_pred.append(ref_logits.argmax(-1))
        onnx_pred.append(logits.argmax(-1))
        if q8 is not None:
            got8 = q8.encode_tokens(frames.numpy(), ids_np, mask_np)
            cos = (got8 * got).sum(-1) / (np.linalg.norm(got8, axis=-1) * np.linalg.norm(got, axis=-1) + 1e-12)
            cosines.append(cos.reshape(-1))
            int8_pred.append(device_path(got8, q8)[0].argmax(-1))
    label, device = np.concatenate(labels), np.concatenate(devices)
    tp, op = np.concatenate(torch_pred), np.concatenate(onnx_pred)
    valid = label >= 0
    out: dict[str, Any] = {
        "clips": len(label),
        "encoder_max_abs_diff": feat_diff,
        "encoder_tolerance": ENCODER_TOLERANCE,
        "question_lengths_unpadded": sorted(lengths_checked),
        "head_max_abs_diff": logit_diff,
        "head_tolerance": HEAD_TOLERANCE,
        "answer_agreement": float((tp == op).mean()),
        "accuracy_pytorch": float((tp[valid] == label[valid]).mean()),
        "accuracy_onnx": float((op[valid] == label[valid]).mean()),
    }
    if q8 is not None:
        p8 = np.concatenate(int8_pred)
        diff = (p8[valid] == label[valid]).astype(float) - (op[valid] == label[valid]).astype(float)
        out["int8"] = {
            "accuracy": float((p8[valid] == label[valid]).mean()),
            "accuracy_change_points": float(diff.mean() * 100),
            "accuracy_change_interval_points": [x * 100 for x in _paired_interval(diff, device[valid])],
            "answer_agreement_with_fp32": float((p8 == op).mean()),
            "feature_cosine_min": float(np.concatenate(cosines).min()),
            "feature_cosine_mean": float(np.concatenate(cosines).mean()),
        }
    return out


def remap_ids(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """BERT ids → the pruned vocabulary's ids (``table``: a lookup array, −1 where a token was pruned)."""
    out = table[ids]
    if (out < 0).any():
        raise ExportError("a benchmark question holds a token outside the pruned vocabulary")
    return out


# ----------------------------------------------------------------------------- the bundle

def export_device_bundle(cloud: CloudModel, stage1: nn.Module, preprocessing: dict[str, Any], answers: Sequence[str],
                         questions: Sequence[str], tokenizer_json: dict[str, Any], out_dir: str | Path,
                         batches: Callable[[], Any] | None = None, int8: bool = False,
                         encoder_name: str = "", progress: Callable[[str], None] = lambda _: None) -> Path:
    """Write the device bundle of ``cloud`` (encoder from ``stage1``) to ``out_dir``, atomically.

    ``batches`` (real-time clip-loader batches) is where parity is measured; without it the
    manifest says parity was not measured.
    """
    out = Path(out_dir)
    static = getattr(cloud.method, "static", None)
    if static is None:
        raise ExportError(f"method {cloud.method_name!r} has no static head")
    if len(answers) != cloud.num_classes:
        raise ExportError(f"the benchmark has {len(answers)} answers, the checkpoint K={cloud.num_classes}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / fmt.MANIFEST).is_file())):
        raise ExportError(f"--out {out}: exists and is not a device bundle; refusing to replace it")
    encoder = stage1.encoder.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        kept = task_token_ids(questions, tokenizer_json)
        progress(f"encoder: {len(kept)} of {len(tokenizer_json['model']['vocab'])} word-table rows kept")
        export_encoder_onnx(encoder, tmp / fmt.ENCODER, torch.tensor(kept, dtype=torch.long))
        if int8:
            progress("encoder: int8 quantisation")
            quantise_int8(tmp / fmt.ENCODER, tmp / fmt.ENCODER_INT8)
        export_head_onnx(static, tmp / fmt.HEAD, cloud.num_classes)
        (tmp / fmt.TOKENIZER).write_text(json.dumps(pruned_tokenizer(tokenizer_json, kept)), encoding="utf-8")
        # Each frame is fused with the question on its own (one temporal position), so the encoder's
        # max_frames does not bound a clip on the device; the device's own reader limit does.
        pre = fmt.Preprocessing.from_dict({**preprocessing, "max_frames": MAX_FRAMES}, "preprocessing")
        (tmp / fmt.PREPROCESSING).write_text(json.dumps(pre.to_dict(), indent=2) + "\n", encoding="utf-8")
        (tmp / fmt.ANSWERS).write_text(json.dumps(list(answers), indent=0) + "\n", encoding="utf-8")
        meta = {"model_id": cloud.model_id, "model_version": cloud.version}
        write_tensors(tmp / fmt.GLOBAL, _numpy(global_params(cloud)), meta)
        write_tensors(tmp / fmt.GENERATOR, _numpy(cloud.method.generator.state_dict()), meta)
        manifest: dict[str, Any] = {
            "format": fmt.BUNDLE_FORMAT, "bundle_version": fmt.BUNDLE_VERSION,
            "model_id": cloud.model_id, "model_version": cloud.version, "num_classes": cloud.num_classes,
            "hidden_dim": int(static.fc.out_features), "feature_dim": int(static.fc.in_features),
            "method": cloud.method_name, "method_config": cloud.method_config,
            "encodings": list(cloud.encodings),
            "encoder": {"preset": encoder_name, "vocab_rows": len(kept),
                        "vocab_rows_full": len(tokenizer_json["model"]["vocab"]),
                        "vocab": "pruned to the task's question tokens plus the special tokens"},
            "exporter": {"tool": "torch.onnx (TorchScript)", "torch": torch.__version__, "opset": OPSET},
            "files": {},
            "parity": None,
        }
        _write_manifest(tmp, manifest)
        if batches is not None:
            progress("parity: the real-time split through PyTorch and ONNX Runtime")
            table = np.full(len(tokenizer_json["model"]["vocab"]) + 1024, -1, dtype=np.int64)
            table[np.asarray(kept)] = np.arange(len(kept))
            parity = measure_parity(encoder, cloud, tmp, batches, table, int8)
            if parity["encoder_max_abs_diff"] > ENCODER_TOLERANCE or parity["head_max_abs_diff"] > HEAD_TOLERANCE:
                raise ExportError(f"ONNX Runtime and PyTorch differ by {parity['encoder_max_abs_diff']:.2e} "
                                  f"(encoder) / "
                                  f"{parity['head_max_abs_diff']:.2e} (head), beyond {ENCODER_TOLERANCE:g} / "
                                  f"{HEAD_TOLERANCE:g}")
            if parity["answer_agreement"] < MIN_AGREEMENT:
                # Within the feature tolerance a disagreement is a near-tie; it is reported, not fatal.
                progress(f"warning: answers agree on {parity['answer_agreement']:.4f} of the clips, "
                         f"under {MIN_AGREEMENT}")
            manifest["parity"] = parity
            _write_manifest(tmp, manifest)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    manifest["files"] = {p.name: fmt.file_entry(p) for p in sorted(folder.iterdir())
                         if p.is_file() and p.name != fmt.MANIFEST}
    (folder / fmt.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
