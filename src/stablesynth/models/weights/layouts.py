"""How each public checkpoint layout's keys map onto the encoder's: one table per layout.

The encoder's parameter names are timm's (``models/vit.py``). A :class:`Layout` is a table of
:class:`Rule` rows: each names an encoder key, the source keys it is made from and the operation
that makes it (``convert.OPS``), or names source keys that are dropped and says why. ``{i}`` stands
for a block index; a trailing ``*`` matches any suffix (drops only). The ViT block's parameters are
declared once (:data:`BLOCK_PARAMS`) and each layout says only what it calls them.

Layouts:

- ``timm``: timm's ``VisionTransformer`` / DeiT's released ``.pth`` (``{"model": state_dict}``).
- ``hf-vit``, ``hf-deit``: Hugging Face ``ViTModel`` / ``DeiTModel`` (and their ``*ForImageClassification``
  under ``vit.`` / ``deit.``), as ``save_pretrained`` writes them (query, key and value separate,
  ``layernorm_before`` …); the in-memory names of transformers 5 (``q_proj`` …) are read as aliases.
- ``allinone``: the All-in-One release (``AllInOne/modules/allinone_module.py``): a PyTorch Lightning
  checkpoint whose ``state_dict`` holds ``transformer.*`` (its timm-style ViT,
  ``base_vision_transformer.py``), ``text_embeddings.*`` (transformers' ``BertEmbeddings``:
  ``word_embeddings``, ``position_embeddings``, ``token_type_embeddings``, ``LayerNorm``, and the
  ``position_ids`` buffer), ``token_type_embeddings`` (the modality embedding: 0 text, 1 video),
  ``transformer.temporal_embed`` (read by the release's ``_inflate_positional_embeds``; written
  ``temporal_embed`` by some exports), ``pooler.dense``, and the heads of its objectives
  (``mlm_score``, ``itm_score``, ``mpp_score``, ``vqa_classifier``, ``rank_output``, ...), with
  ``hyper_parameters`` (``{"config": {...}}``) and ``optimizer_states`` pickled beside.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from stablesynth.models.weights.errors import WeightLoadError
from stablesynth.registry import Registry

#: The encoder's parameters inside one ViT block (``models/vit.py``'s ``Block``), each with ``.weight``
#: and ``.bias``: declared once, every layout's block table is checked against it.
BLOCK_PARAMS: tuple[str, ...] = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")

#: The encoder's vision tower: a converted file must hold every key under these prefixes.
VISION_PREFIXES: tuple[str, ...] = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of a layout's table."""

    #: The encoder key made ("{i}": the block index); "" drops the sources.
    target: str
    #: The source keys, in the order the operation takes them.
    sources: tuple[str, ...]
    #: How the sources become the target (``convert.OPS``); "drop" for a drop row.
    op: str = "copy"
    #: Why a drop is safe, or what the operation does (``weights inspect`` shows it).
    why: str = ""
    #: The import fails when the source lacks it; otherwise the target is left to the model.
    required: bool = True
    #: What the target becomes when the source lacks it and it is not required ("zeros"; "": the model keeps its own).
    absent: str = ""
    #: A source key whose presence the operation is told (DeiT's distillation token shifts pos_embed by one).
    flag: str = ""
    #: A preset without this target is an error; False: the sources are dropped (the preset chose to omit it).
    needs_target: bool = True


@dataclasses.dataclass(frozen=True)
class ConfigCheck:
    """One field of the source's own config compared with the preset's architecture."""

    #: The field in the source's config (``config.json``, All-in-One's ``hyper_parameters["config"]``).
    key: str
    #: The encoder config field it must agree with.
    spec: str
    #: "==" (must equal) or ">=" (the source may have more, e.g. blocks beyond the preset's depth are dropped).
    relation: str = "=="


@dataclasses.dataclass(frozen=True)
class Layout:
    """A source layout: its table, the other spellings of its keys and what its config must say."""

    name: str
    #: What the layout is, with its article, in the errors' words ("not {title} state dict").
    title: str
    description: str
    rules: tuple[Rule, ...]
    #: ``(regex, replacement)`` applied in order to each source key first: other spellings of the same key.
    aliases: tuple[tuple[str, str], ...] = ()
    #: Where the source's config is: "config" (a Hugging Face folder's config.json), "hyper_parameters.config"
    #: (Lightning's), or "" (a timm state dict has none).
    config_from: str = ""
    checks: tuple[ConfigCheck, ...] = ()
    #: Values the source's config must have where it states them (Hugging Face's activation, model type).
    expect: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: The config field holding the LayerNorm epsilon, and the value when it is not stated.
    eps_key: str = ""
    eps_default: float = 1e-6

    def canonical(self, key: str) -> str:
        """``key`` in the table's spelling."""
        for pattern, replacement in self.aliases:
            key = re.sub(pattern, replacement, key, count=1)
        return key

    def match(self, key: str) -> list[tuple[Rule, int | None]]:
        """The rows whose sources include the canonical ``key``, with the block index it carries."""
        found = []
        for rule in self.rules:
            for source in rule.sources:
                m = _pattern(source).fullmatch(key)
                if m:
                    found.append((rule, int(m.group("i")) if "i" in m.groupdict() else None))
                    break
        return found


_PATTERNS: dict[str, re.Pattern[str]] = {}


def _pattern(template: str) -> re.Pattern[str]:
    if template not in _PATTERNS:
        text = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")
        if text.endswith(r"\*"):
            text = text[:-2] + ".*"
        _PATTERNS[template] = re.compile(text)
    return _PATTERNS[template]


def fill(template: str, index: int | None) -> str:
    """``template`` with its block index filled in."""
    return template if index is None else template.replace("{i}", str(index))


def _block_rules(prefix: str, names: Mapping[str, tuple[str, ...]]) -> tuple[Rule, ...]:
    """The block's rows: ``names`` gives, for each of :data:`BLOCK_PARAMS`, the source's name(s) under ``prefix``."""
    if set(names) != set(BLOCK_PARAMS):
        raise ValueError(f"a block table must name exactly {BLOCK_PARAMS}, got {sorted(names)}")
    rules = []
    for param in BLOCK_PARAMS:
        for suffix in ("weight", "bias"):
            sources = tuple(f"{prefix}{name}.{suffix}" for name in names[param])
            merged = len(sources) > 1
            rules.append(Rule(f"blocks.{{i}}.{param}.{suffix}", sources, "concat" if merged else "copy",
                              why="query, key and value stacked into one projection" if merged else ""))
    return tuple(rules)


def _pair(target: str, source: str, **kwargs: Any) -> tuple[Rule, Rule]:
    """A module's ``weight`` and ``bias`` rows."""
    return tuple(Rule(f"{target}.{s}", (f"{source}.{s}",), **kwargs) for s in ("weight", "bias"))  # type: ignore[return-value]


def _drops(*rows: tuple[str, str]) -> tuple[Rule, ...]:
    return tuple(Rule("", (pattern,), "drop", why) for pattern, why in rows)


_POS = "the grid resampled (bicubic) to the preset's patches when it differs; a distillation token's row removed"
_CLASSIFIER = "the ImageNet classifier: the device's dynamic layer answers instead"
_DIST = "DeiT's distillation token: the encoder has one class token (its row of the position embedding is cut)"
_POOLER = "tanh(Linear) on the class token, as the encoder's pooler"

TIMM_BLOCK: dict[str, tuple[str, ...]] = {p: (p,) for p in BLOCK_PARAMS}
HF_BLOCK: dict[str, tuple[str, ...]] = {
    "norm1": ("layernorm_before",),
    "attn.qkv": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    "attn.proj": ("attention.output.dense",),
    "norm2": ("layernorm_after",),
    "mlp.fc1": ("intermediate.dense",),
    "mlp.fc2": ("output.dense",),
}
#: transformers 5's module names (``ViTModel().state_dict()``), read as the names ``save_pretrained`` writes.
HF_V5_ALIASES: tuple[tuple[str, str], ...] = (
    (r"^layers\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
    (r"^layers\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
    (r"^layers\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.layernorm_", r"encoder.layer.\1.layernorm_"),
)

TIMM = Layout(
    name="timm", title="a timm/DeiT vision",
    description="timm's VisionTransformer state dict, as DeiT's releases save it ({'model': ...})",
    rules=(
        *_pair("patch_embed.proj", "patch_embed.proj"),
        Rule("cls_token", ("cls_token",)),
        Rule("pos_embed", ("pos_embed",), "pos_embed", why=_POS, flag="dist_token"),
        *_block_rules("blocks.{i}.", TIMM_BLOCK),
        *_pair("norm", "norm"),
        *_drops(("dist_token", _DIST), ("head.*", _CLASSIFIER), ("head_dist.*", "DeiT's distillation classifier"),
                ("pre_logits.*", "the classifier's pre-logits layer"), ("fc_norm.*", "the classifier's norm")),
    ),
    eps_default=1e-6,  # timm's ViT and DeiT: LayerNorm(eps=1e-6)
)

_HF_RULES: tuple[Rule, ...] = (
    *_pair("patch_embed.proj", "embeddings.patch_embeddings.projection"),
    Rule("cls_token", ("embeddings.cls_token",)),
    Rule("pos_embed", ("embeddings.position_embeddings",), "pos_embed", why=_POS, flag="embeddings.distillation_token"),
    *_block_rules("encoder.layer.{i}.", HF_BLOCK),
    *_pair("norm", "layernorm"),
    *_pair("pooler.dense", "pooler.dense", why=_POOLER, required=False, needs_target=False),
    *_drops(("classifier.*", _CLASSIFIER), ("embeddings.mask_token", "the mask token of masked-image modelling")),
)
_HF_CHECKS = (ConfigCheck("hidden_size", "width"), ConfigCheck("num_attention_heads", "num_heads"),
              ConfigCheck("num_hidden_layers", "depth", ">="), ConfigCheck("patch_size", "patch_size"),
              ConfigCheck("num_channels", "in_chans"), ConfigCheck("qkv_bias", "qkv_bias"))

HF_VIT = Layout(
    name="hf-vit", title="a Hugging Face ViT",
    description="a Hugging Face ViTModel / ViTForImageClassification (config.json + model.safetensors)",
    rules=_HF_RULES, aliases=((r"^vit\.", ""), *HF_V5_ALIASES), config_from="config", checks=_HF_CHECKS,
    expect={"model_type": "vit", "hidden_act": "gelu", "pooler_act": "tanh"},
    eps_key="layer_norm_eps", eps_default=1e-12,  # transformers' ViTConfig default
)

HF_DEIT = Layout(
    name="hf-deit", title="a Hugging Face DeiT",
    description="a Hugging Face DeiTModel / DeiTForImageClassification(WithTeacher) (config.json + weights)",
    rules=(*_HF_RULES, *_drops(("embeddings.distillation_token", _DIST),
                               ("cls_classifier.*", _CLASSIFIER),
                               ("distillation_classifier.*", "DeiT's distillation classifier"))),
    aliases=((r"^deit\.", ""), *HF_V5_ALIASES), config_from="config", checks=_HF_CHECKS,
    expect={"model_type": "deit", "hidden_act": "gelu", "pooler_act": "tanh"},
    eps_key="layer_norm_eps", eps_default=1e-12,
)

_HEAD = "a head of one of All-in-One's objectives: the device's dynamic layer answers instead"

ALLINONE = Layout(
    name="allinone", title="an All-in-One",
    description="the All-in-One release: a PyTorch Lightning checkpoint (state_dict, hyper_parameters, "
                "optimizer_states)",
    rules=(
        *_pair("patch_embed.proj", "transformer.patch_embed.proj"),
        Rule("cls_token", ("transformer.cls_token", "token_type_embeddings.weight"), "add_video_type",
             why="All-in-One adds the video token type to its class token as well (it is part of the video "
                 "tokens): folded into cls_token"),
        Rule("pos_embed", ("transformer.pos_embed",), "pos_embed", why=_POS, flag="transformer.dist_token"),
        *_block_rules("transformer.blocks.{i}.", TIMM_BLOCK),
        *_pair("norm", "transformer.norm"),
        Rule("text_embeddings.word_embeddings.weight", ("text_embeddings.word_embeddings.weight",)),
        Rule("text_embeddings.position_embeddings.weight",
             ("text_embeddings.position_embeddings.weight", "text_embeddings.token_type_embeddings.weight"),
             "text_positions",
             why="the first max_text_len rows, plus BERT's segment-0 row folded in (All-in-One never passes "
                 "segment ids, so every text token gets row 0)"),
        *_pair("text_embeddings.LayerNorm", "text_embeddings.LayerNorm"),
        Rule("token_type_embeddings.weight", ("token_type_embeddings.weight",),
             why="the modality embedding: row 0 on text, row 1 on video tokens, as in the encoder"),
        Rule("temporal_embed", ("transformer.temporal_embed",), "temporal", required=False, absent="zeros",
             why="one row per frame, added to that frame's patches; fewer rows than max_frames are padded with "
                 "zeros (the release's own _inflate_positional_embeds rule), more are cut; absent (the release's "
                 "base_vision_transformer adds none): zeros, which adds nothing, as All-in-One does"),
        *_pair("pooler.dense", "pooler.dense", needs_target=False,
               why="All-in-One's tanh(Linear) pooler; there it reads the text [CLS] averaged over frames, here "
                   "each frame's class token (docs/weights.md)"),
        *_drops(("text_embeddings.position_ids", "BERT's buffer of position ids 0..L-1, recomputed"),
                ("text_embeddings.token_type_ids", "BERT's buffer of zero segment ids"),
                ("transformer.dist_token", _DIST),
                ("mlm_score.*", "the masked-language-model head of pretraining"),
                ("itm_score.*", "the video-text matching head of pretraining"),
                ("mpp_score.*", "the masked-patch head of pretraining"),
                ("vqa_classifier.*", _HEAD), ("mc_vqa_classifier.*", _HEAD), ("nlvr2_classifier.*", _HEAD),
                ("rank_output.*", _HEAD), ("rank_output_2.*", _HEAD), ("vcop_classifier.*", _HEAD),
                ("txt_proj.*", "the text projection of contrastive pretraining"),
                ("vid_proj.*", "the video projection of contrastive pretraining")),
    ),
    aliases=((r"^temporal_embed$", "transformer.temporal_embed"),),
    config_from="hyper_parameters.config",
    checks=(ConfigCheck("hidden_size", "width"), ConfigCheck("num_heads", "num_heads"),
            ConfigCheck("num_layers", "depth", ">="), ConfigCheck("mlp_ratio", "mlp_ratio"),
            ConfigCheck("vocab_size", "vocab_size")),
    eps_default=1e-6,  # base_vision_transformer: partial(nn.LayerNorm, eps=1e-6); BERT's 1e-12 is the encoder's too
)

LAYOUTS: Registry[Layout] = Registry("weight layout")
for _layout in (TIMM, HF_VIT, HF_DEIT, ALLINONE):
    LAYOUTS.register(_layout.name)(_layout)

#: What ``--from`` accepts: the layouts, and "hf" (ViT or DeiT, read from config.json or the keys).
SOURCE_KINDS: tuple[str, ...] = ("timm", "hf", "hf-vit", "hf-deit", "allinone")


def source_config(layout: Layout, config: Mapping[str, Any], hyper_parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a checkpoint's own config ``layout`` reads (empty when the layout has none)."""
    if layout.config_from == "config":
        return dict(config)
    if layout.config_from == "hyper_parameters.config":
        inner = hyper_parameters.get("config")
        return dict(inner) if isinstance(inner, Mapping) else {}
    return {}


def match_fraction(layout: Layout, keys: list[str]) -> float:
    """The share of ``keys`` that ``layout``'s table knows (what ``weights inspect`` guesses by)."""
    if not keys:
        return 0.0
    return sum(1 for k in keys if layout.match(layout.canonical(k))) / len(keys)


def resolve(kind: str, keys: list[str], config: Mapping[str, Any]) -> Layout:
    """The layout ``--from kind`` means: "hf" is ViT or DeiT by config.json's model_type (else by the keys)."""
    if kind != "hf":
        return LAYOUTS.get(kind)
    model_type = config.get("model_type")
    if model_type is not None:
        if model_type not in ("vit", "deit"):
            raise WeightLoadError(f"config.json: model_type {model_type!r} is not a ViT or DeiT (--from hf reads "
                             "model_type 'vit' or 'deit')")
        return HF_VIT if model_type == "vit" else HF_DEIT
    deit = any(HF_DEIT.canonical(k) == "embeddings.distillation_token" for k in keys)
    return HF_DEIT if deit else HF_VIT


def guess(keys: list[str], config: Mapping[str, Any]) -> list[tuple[str, float]]:
    """Every layout with the share of ``keys`` it knows, best first (a config's model_type decides Hugging Face's)."""
    scores = [(layout.name, match_fraction(layout, keys)) for layout in (LAYOUTS.get(n) for n in LAYOUTS.in_order())]
    model_type = config.get("model_type")
    if model_type in ("vit", "deit"):
        other = "hf-deit" if model_type == "vit" else "hf-vit"
        scores = [(n, s) for n, s in scores if n != other]
    return sorted(scores, key=lambda x: -x[1])
