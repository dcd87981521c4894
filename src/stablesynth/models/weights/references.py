"""The source models an import is checked against, built here at an encoder preset's sizes.

Nothing is downloaded: each source is built with random weights, and every parameter (biases and
norms included) is drawn at random, so a weight that lands in the wrong place changes the output.

- :func:`hf_model`: a transformers ``ViTModel`` / ``DeiTModel`` with the preset's width, depth,
  heads, MLP, patch and image size (or another image size, to check resampling); eager attention.
- :func:`hf_hidden_states`: its forward, every hidden state; for DeiT also the forward with the
  distillation token removed (Hugging Face's own modules on ``[CLS] + patches``), which is what
  an import that drops the token must compute.
- :func:`timm_state_from_hf`: the same weights in timm's names (query, key and value stacked),
  written here by hand, independently of the import's table (``layouts.py``).
- :func:`allinone_state`, :func:`allinone_checkpoint`: a state dict in the All-in-One release's key
  layout and shapes (``layouts.py`` lists them), and the PyTorch Lightning checkpoint around it.
- :func:`allinone_forward`: the release's ``infer`` (``AllInOne/modules/allinone_module.py``) on such
  a state dict: transformers' ``BertEmbeddings`` for the text, the release's timm-style blocks,
  the temporal token roll before every block, any patch order, mean over frames and the pooler.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

#: The release's TemporalRoll(n_div=8): a fold of (1 + patches) // 8 visual tokens rolls each way.
ROLL_DIV = 8


def _jitter(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def hf_model(kind: str, spec: Any, seed: int = 0, image_size: int | None = None,
             layer_norm_eps: float = 1e-12) -> Any:
    """A random ``ViTModel`` (``kind="vit"``) or ``DeiTModel`` (``"deit"``) at ``spec``'s sizes, in eval mode."""
    from transformers import DeiTConfig, DeiTModel, ViTConfig, ViTModel

    config_cls, model_cls = {"vit": (ViTConfig, ViTModel), "deit": (DeiTConfig, DeiTModel)}[kind]
    config = config_cls(hidden_size=spec.width, num_hidden_layers=spec.depth, num_attention_heads=spec.num_heads,
                        intermediate_size=int(spec.width * spec.mlp_ratio), image_size=image_size or spec.image_size,
                        patch_size=spec.patch_size, num_channels=spec.in_chans, qkv_bias=spec.qkv_bias,
                        layer_norm_eps=layer_norm_eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        attn_implementation="eager")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _jitter(model, seed)
    return model


@torch.no_grad()
def hf_hidden_states(model: Any, pixels: torch.Tensor, *, drop_distillation: bool = False,
                     interpolate: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(hidden states, pooler output)``: the embeddings, each layer's output, the final norm's."""
    if not drop_distillation:
        out = model(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=interpolate)
        return [*out.hidden_states, out.last_hidden_state], out.pooler_output
    emb = model.embeddings
    pos = emb.position_embeddings
    patches = emb.patch_embeddings(pixels)
    cls = (emb.cls_token + pos[:, :1]).expand(pixels.shape[0], -1, -1)
    x = torch.cat([cls, patches + pos[:, 2:]], dim=1)
    states = [x]
    layers = model.layers if hasattr(model, "layers") else model.encoder.layer  # transformers 5 / 4
    for layer in layers:
        x = layer(x, None)
        x = x[0] if isinstance(x, tuple) else x
        states.append(x)
    last = model.layernorm(x)
    return [*states, last], model.pooler(last)


def timm_state_from_hf(saved: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """A Hugging Face ViT's weights, as ``save_pretrained`` wrote them, under timm's names (DeiT's releases)."""
    sd = {k.removeprefix("vit."): v.detach().clone() for k, v in saved.items()}
    out = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    for i in range(depth):
        hf, timm = f"encoder.layer.{i}.", f"blocks.{i}."
        for s in ("weight", "bias"):
            out[f"{timm}attn.qkv.{s}"] = torch.cat([sd[f"{hf}attention.attention.{p}.{s}"]
                                                   for p in ("query", "key", "value")])
            out[f"{timm}attn.proj.{s}"] = sd[f"{hf}attention.output.dense.{s}"]
            out[f"{timm}norm1.{s}"] = sd[f"{hf}layernorm_before.{s}"]
            out[f"{timm}norm2.{s}"] = sd[f"{hf}layernorm_after.{s}"]
            out[f"{timm}mlp.fc1.{s}"] = sd[f"{hf}intermediate.dense.{s}"]
            out[f"{timm}mlp.fc2.{s}"] = sd[f"{hf}output.dense.{s}"]
    # The ImageNet head a timm file carries beside the tower (dropped on import).
    width = out["cls_token"].shape[-1]
    out["head.weight"] = torch.randn(1000, width, generator=torch.Generator().manual_seed(0)) * 0.02
    out["head.bias"] = torch.zeros(1000)
    return out


def allinone_state(spec: Any, seed: int = 0, frames: int = 3, max_text_len: int = 40, temporal: bool = True,
                   heads: bool = True) -> dict[str, torch.Tensor]:
    """A random state dict in the All-in-One release's key layout and shapes for ``spec``'s tower.

    ``BertEmbeddings`` of ``max_text_len`` positions (with the ``position_ids`` buffer older
    transformers saved), the modality embedding, the timm-style ViT under ``transformer.`` (with
    ``temporal_embed`` of ``frames`` rows when ``temporal``), the pooler and, with ``heads``,
    the pretraining heads ``mlm_score`` (ViLT's MLMHead) and ``itm_score``.
    """
    g = torch.Generator().manual_seed(seed)
    C, V, P = spec.width, spec.vocab_size, spec.patch_size
    hidden = int(C * spec.mlp_ratio)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g) * 0.05

    sd = {"text_embeddings.word_embeddings.weight": r(V, C),
          "text_embeddings.position_embeddings.weight": r(max_text_len, C),
          "text_embeddings.token_type_embeddings.weight": r(2, C),
          "text_embeddings.LayerNorm.weight": 1 + r(C), "text_embeddings.LayerNorm.bias": r(C),
          "text_embeddings.position_ids": torch.arange(max_text_len).unsqueeze(0),
          "token_type_embeddings.weight": r(2, C),
          "transformer.cls_token": r(1, 1, C), "transformer.pos_embed": r(1, 1 + spec.num_patches, C),
          "transformer.patch_embed.proj.weight": r(C, spec.in_chans, P, P), "transformer.patch_embed.proj.bias": r(C),
          "transformer.norm.weight": 1 + r(C), "transformer.norm.bias": r(C),
          "pooler.dense.weight": r(C, C), "pooler.dense.bias": r(C)}
    for i in range(spec.depth):
        b = f"transformer.blocks.{i}."
        sd |= {b + "norm1.weight": 1 + r(C), b + "norm1.bias": r(C), b + "attn.qkv.weight": r(3 * C, C),
               b + "attn.qkv.bias": r(3 * C), b + "attn.proj.weight": r(C, C), b + "attn.proj.bias": r(C),
               b + "norm2.weight": 1 + r(C), b + "norm2.bias": r(C), b + "mlp.fc1.weight": r(hidden, C),
               b + "mlp.fc1.bias": r(hidden), b + "mlp.fc2.weight": r(C, hidden), b + "mlp.fc2.bias": r(C)}
    if temporal:
        sd["transformer.temporal_embed"] = r(1, frames, C)
    if heads:
        sd |= {"mlm_score.transform.dense.weight": r(C, C), "mlm_score.transform.dense.bias": r(C),
               "mlm_score.transform.LayerNorm.weight": 1 + r(C), "mlm_score.transform.LayerNorm.bias": r(C),
               "mlm_score.decoder.weight": r(V, C), "mlm_score.bias": r(V),
               "itm_score.fc.weight": r(2, C), "itm_score.fc.bias": r(2)}
    return sd


def allinone_hyper_parameters(spec: Any, frames: int = 3, max_text_len: int = 40) -> dict[str, Any]:
    """The release's ``hyper_parameters`` (``save_hyperparameters()`` of its ``config``), the fields that matter."""
    return {"config": {
        "exp_name": "mlm_itm", "vit": "vit_deit_tiny_patch16_224", "hidden_size": spec.width,
        "num_heads": spec.num_heads, "num_layers": spec.depth, "mlp_ratio": spec.mlp_ratio, "drop_rate": 0.1,
        "vocab_size": spec.vocab_size, "max_text_len": max_text_len, "num_frames": frames,
        "image_size": spec.image_size, "patch_size": spec.patch_size, "max_image_len": -1,
        "loss_names": {"itm": 1, "mlm": 1, "vqa": 0, "openend_vqa": 0}, "load_path": "", "precision": 16,
        "learning_rate": 1e-4, "weight_decay": 0.01, "datasets": ["webvid", "howto100m"],
    }}


def allinone_checkpoint(state: dict[str, torch.Tensor], hyper_parameters: Any,
                        optimizer: bool = True) -> dict[str, Any]:
    """The PyTorch Lightning checkpoint the release's trainer writes around ``state`` (with AdamW's state)."""
    params = [k for k, v in state.items() if v.is_floating_point()] if optimizer else []
    adam = {i: {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(state[k]),
                "exp_avg_sq": torch.zeros_like(state[k])} for i, k in enumerate(params)}
    return {
        "epoch": 9, "global_step": 25000, "pytorch-lightning_version": "1.5.10",
        "state_dict": dict(state),
        "callbacks": {"ModelCheckpoint": {"monitor": "val/the_metric", "best_model_score": torch.tensor(0.5)}},
        "optimizer_states": [{"state": adam, "param_groups": [{
            "lr": 1e-4, "betas": (0.9, 0.98), "eps": 1e-8, "weight_decay": 0.01, "params": list(range(len(params)))}]}],
        "lr_schedulers": [{"last_epoch": 25000, "base_lrs": [1e-4]}],
        "hyper_parameters": hyper_parameters,
    }


def _layer_norm(x: torch.Tensor, state: dict[str, torch.Tensor], name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], eps)


def _block(x: torch.Tensor, state: dict[str, torch.Tensor], p: str, heads: int, keep: torch.Tensor) -> torch.Tensor:
    """The release's ``Block``: pre-norm attention (masked keys to -inf) and MLP, LayerNorm eps 1e-6."""
    B, N, C = x.shape
    h = _layer_norm(x, state, p + "norm1", 1e-6)
    qkv = F.linear(h, state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"])
    q, k, v = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1)) * (C // heads) ** -0.5
    attn = attn.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(B, N, C)
    x = x + F.linear(out, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
    h = _layer_norm(x, state, p + "norm2", 1e-6)
    h = F.linear(F.gelu(F.linear(h, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"])),
                 state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
    return x + h


def _roll(image: torch.Tensor, frames: int) -> torch.Tensor:
    """The release's TemporalRoll (v=0): keep the visual CLS, roll the first and last folds across frames."""
    nt, length, c = image.shape
    x = image.view(nt // frames, frames, length, c)
    fold = length // ROLL_DIV
    out = x.clone()
    out[:, :, 1:fold + 1] = torch.roll(x[:, :, 1:fold + 1], 1, 1)
    out[:, :, -fold:] = torch.roll(x[:, :, -fold:], -1, 1)
    return out.view(nt, length, c)


@torch.no_grad()
def allinone_forward(state: dict[str, torch.Tensor], frames: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, num_heads: int, *, roll: bool = True,
                     order: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """The release's ``infer`` on ``frames [B, D, 3, S, S]`` with the question ``input_ids [B, L]``.

    Returns ``tokens`` (every frame's ``[text, visual CLS, patches]`` after the final norm,
    ``[B·D, L + 1 + N, C]``, the patches in ``order``: the release draws a random order per
    forward) and ``cls_feats`` (the pooler on the text [CLS] averaged over frames, ``[B, C]``).
    ``roll=False`` runs it without the temporal token roll.
    """
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertEmbeddings

    C = state["token_type_embeddings.weight"].shape[1]
    table = state["text_embeddings.word_embeddings.weight"]
    positions = state["text_embeddings.position_embeddings.weight"].shape[0]
    bert = BertEmbeddings(BertConfig(vocab_size=table.shape[0], hidden_size=C, max_position_embeddings=positions,
                                     hidden_dropout_prob=0.0, layer_norm_eps=1e-12)).eval()
    bert.load_state_dict({k[len("text_embeddings."):]: v for k, v in state.items()
                          if k.startswith("text_embeddings.") and not k.endswith(("position_ids", "token_type_ids"))})
    B, D = frames.shape[:2]
    types = state["token_type_embeddings.weight"]
    text = (bert(input_ids) + types[0]).repeat_interleave(D, dim=0)
    patches = F.conv2d(frames.flatten(0, 1), state["transformer.patch_embed.proj.weight"],
                       state["transformer.patch_embed.proj.bias"], stride=state["transformer.patch_embed.proj.weight"]
                       .shape[-1]).flatten(2).transpose(1, 2)
    pos = state["transformer.pos_embed"]
    patches = patches + pos[:, 1:]
    if "transformer.temporal_embed" in state:  # the exports that carry it add row f to frame f's patches
        t = state["transformer.temporal_embed"][0, :D]
        patches = patches + t.repeat(B, 1).unsqueeze(1)
    if order is not None:
        patches = patches[:, list(order)]
    cls = (state["transformer.cls_token"] + pos[:, :1]).expand(B * D, -1, -1)
    image = torch.cat([cls, patches], dim=1) + types[1]
    keep = torch.cat([attention_mask.bool().repeat_interleave(D, dim=0),
                      torch.ones(B * D, image.shape[1], dtype=torch.bool)], dim=1)
    x = torch.cat([text, image], dim=1)
    L = text.shape[1]
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.blocks."))
    for i in range(depth):
        if roll and D > 1:
            x = torch.cat([x[:, :L], _roll(x[:, L:], D)], dim=1)
        x = _block(x, state, f"transformer.blocks.{i}.", num_heads, keep)
    x = _layer_norm(x, state, "transformer.norm", 1e-6)
    pooled = x.view(B, D, x.shape[1], C).mean(dim=1)[:, 0]
    cls_feats = torch.tanh(F.linear(pooled, state["pooler.dense.weight"], state["pooler.dense.bias"]))
    return {"tokens": x, "cls_feats": cls_feats}


def random_patch_order(num_patches: int, seed: int) -> list[int]:
    """A random order of the patches, as the release's ``torch.multinomial`` draws one per forward."""
    return torch.randperm(num_patches, generator=torch.Generator().manual_seed(seed)).tolist()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference (inf when the shapes differ)."""
    return float((a - b).abs().max()) if a.shape == b.shape else math.inf
