"""Public pretrained weights into the encoder: safe reading, the layout tables, equivalence with the
source models (Hugging Face forward, the All-in-One release's forward), and refusals of bad input."""

from __future__ import annotations

import builtins
import collections
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from stablesynth.cli import main
from stablesynth.models.encoder import ENCODERS, MultimodalEncoder, create_model
from stablesynth.models.vit import Block, ViTSpec
from stablesynth.models.weights import references as ref
from stablesynth.models.weights.convert import convert, manifest_path
from stablesynth.models.weights.equivalence import TOLERANCE, check_allinone, check_hf, check_timm, import_source
from stablesynth.models.weights.errors import UnsafePickleError, WeightLoadError
from stablesynth.models.weights.layouts import ALLINONE, BLOCK_PARAMS, HF_DEIT, HF_VIT, TIMM, guess
from stablesynth.models.weights.reading import SourceCheckpoint, read_checkpoint
from stablesynth.models.weights.unpickle import load_pickled_checkpoint

# ----------------------------------------------------------------------------- the tables


def test_block_table_is_the_encoders_block():
    names = {f"{p}.{s}" for p in BLOCK_PARAMS for s in ("weight", "bias")}
    assert names == set(Block(ViTSpec(width=12, num_heads=3)).state_dict())
    for layout in (TIMM, HF_VIT, HF_DEIT, ALLINONE):
        targets = {r.target for r in layout.rules if r.target.startswith("blocks.")}
        assert targets == {f"blocks.{{i}}.{n}" for n in names}, layout.name


# ----------------------------------------------------------------------------- safe reading


class _System:
    """Pickles to ``os.system(command)``: what a malicious checkpoint runs on ``torch.load``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> Any:
        return os.system, (self.command,)


class _Exec:
    """Pickles to ``builtins.exec(source)``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self) -> Any:
        return builtins.exec, (self.source,)


@pytest.mark.parametrize("payload", ["system", "exec"])
@pytest.mark.parametrize("writer", ["zip", "legacy", "plain pickle"])
def test_a_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path, payload, writer):
    marker = tmp_path / "ran"
    evil = _System(f"touch {marker}") if payload == "system" else _Exec(f"open({str(marker)!r}, 'w').write('x')")
    obj = {"hyper_parameters": evil, "state_dict": {"w": torch.zeros(2)}}
    path = tmp_path / "evil.ckpt"
    if writer == "plain pickle":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=writer == "zip")
    with pytest.raises(UnsafePickleError, match=r"refused to unpickle: it names (posix\.system|builtins\.exec)"):
        read_checkpoint(path)
    assert not marker.exists()


def test_state_setting_is_refused_on_anything_but_the_plain_containers(tmp_path):
    class SetsState:
        def __reduce__(self) -> Any:
            return set, ([1],), {"hook": 1}

    path = tmp_path / "state.pth"
    torch.save({"w": torch.zeros(1), "x": SetsState()}, path)
    with pytest.raises(UnsafePickleError, match="sets the state of a set"):
        load_pickled_checkpoint(path)


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_modules_state_dict_reads_with_its_metadata(tmp_path, zip_format):
    sd = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3)).state_dict()
    torch.save(sd, tmp_path / "m.pth", _use_new_zipfile_serialization=zip_format)
    obj = load_pickled_checkpoint(tmp_path / "m.pth")
    assert type(obj) is collections.OrderedDict and obj._metadata == sd._metadata
    assert all(torch.equal(obj[k], v) for k, v in sd.items())


@pytest.mark.parametrize("zip_format", [True, False])
def test_both_torch_formats_read_back_exactly(tmp_path, zip_format):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {"view": base[:, 1:4], "t": base.t(), "half": torch.randn(3).half(), "bf16": torch.randn(2).bfloat16(),
          "long": torch.arange(5), "flag": torch.tensor([True, False]), "param": torch.nn.Parameter(torch.ones(2)),
          "empty": torch.zeros(0, 3)}
    path = tmp_path / "sd.pth"
    torch.save({"model": sd, "epoch": 3}, path, _use_new_zipfile_serialization=zip_format)
    ckpt = read_checkpoint(path)
    assert ckpt.container == ("torch zip" if zip_format else "torch legacy")
    assert ckpt.wrapper == "model" and ckpt.extras == {"epoch": "int 3"}
    assert set(ckpt.tensors) == set(sd)
    for k, v in sd.items():
        assert ckpt.tensors[k].dtype == v.dtype and torch.equal(ckpt.tensors[k], v.detach()), k


def test_lightning_hyper_parameters_and_namespaces_are_plain_data(allinone_ckpt):
    ckpt = read_checkpoint(allinone_ckpt())
    assert type(ckpt.hyper_parameters) is dict
    assert ckpt.hyper_parameters["config"]["num_heads"] == 3
    assert ckpt.wrapper == "state_dict"
    assert "optimizer_states" in ckpt.extras and "tensors" in ckpt.extras["optimizer_states"]
    assert ckpt.extras["args"] == "an argparse.Namespace of 2 fields"


def test_data_parallel_prefix_and_shards_are_read(tmp_path, timm_state):
    sd = timm_state()
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pth")
    assert set(read_checkpoint(tmp_path / "ddp.pth").tensors) == set(sd)
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[:5]}, str(tmp_path / "a.safetensors"))
    save_file({k: sd[k] for k in keys[5:]}, str(tmp_path / "b.safetensors"))
    weight_map = {k: "a.safetensors" if i < 5 else "b.safetensors" for i, k in enumerate(keys)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.container == "safetensors shards in a Hugging Face folder" and set(ckpt.tensors) == set(sd)


# ----------------------------------------------------------------------------- equivalence


def _assert_within(measurements):
    assert measurements and all(m.bound == TOLERANCE for m in measurements)
    for m in measurements:
        assert m.max_abs_diff <= TOLERANCE, (m.check, m.compared, m.max_abs_diff)


def test_hf_vit_import_computes_what_hugging_face_computes(tmp_path):
    _assert_within(check_hf("vit", "allinone-test", tmp_path))


def test_hf_deit_import_drops_the_distillation_token_and_computes_the_rest(tmp_path):
    _assert_within(check_hf("deit", "allinone-test", tmp_path))


def test_timm_file_written_from_hf_computes_what_hugging_face_computes(tmp_path):
    _assert_within(check_timm("allinone-test", tmp_path))


def test_positions_resampled_as_hugging_face_interpolates_them(tmp_path):
    # allinone-cpu: 32 px, patch 8 (4×4); the source is 16 px (2×2) and Hugging Face interpolates on the fly.
    measured = check_hf("vit", "allinone-cpu", tmp_path, resampled=True)
    _assert_within(measured)


def test_the_comparison_sees_a_misplaced_weight(tmp_path, hf_folder, tiny_cfg):
    encoder, _ = import_source(hf_folder("vit"), "hf", "allinone-test", tmp_path / "w.safetensors")
    model = ref.hf_model("vit", tiny_cfg, seed=0)
    pixels = torch.randn(2, 3, 16, 16)
    states, _ = ref.hf_hidden_states(model, pixels)
    with torch.no_grad():
        assert ref.max_abs_diff(encoder.vision_hidden_states(pixels)[-1], states[-1]) <= TOLERANCE
        qkv = encoder.blocks[0].attn.qkv.weight
        qkv.copy_(torch.cat([qkv[192:384], qkv[:192], qkv[384:]]))  # query and key swapped
        assert ref.max_abs_diff(encoder.vision_hidden_states(pixels)[-1], states[-1]) > 1e-3


def test_allinone_import_computes_the_release_forward(tmp_path):
    measured = check_allinone("allinone-test", tmp_path)
    bounded = [m for m in measured if m.bound is not None]
    _assert_within(bounded)
    roll = [m for m in measured if m.bound is None]
    # The one documented difference is real: the release's roll moves the tokens of a 3-frame clip.
    assert len(roll) == 1 and roll[0].max_abs_diff > 1e-2


# ----------------------------------------------------------------------------- All-in-One mapping


def test_every_allinone_tensor_lands_where_it_should(allinone_ckpt, tiny_cfg):
    state = ref.allinone_state(tiny_cfg, seed=3)
    conv = convert(read_checkpoint(allinone_ckpt(state)), ALLINONE, tiny_cfg, "allinone-test")
    t = conv.tensors
    own = MultimodalEncoder(tiny_cfg).state_dict()
    assert set(t) == set(own) and all(t[k].shape == own[k].shape for k in own)
    for k in t:
        src = "transformer." + k
        if src in state and k not in ("cls_token", "temporal_embed"):
            assert torch.equal(t[k], state[src]), k
    for k in ("text_embeddings.word_embeddings.weight", "text_embeddings.LayerNorm.weight",
              "text_embeddings.LayerNorm.bias", "token_type_embeddings.weight", "pooler.dense.weight",
              "pooler.dense.bias"):
        assert torch.equal(t[k], state[k]), k
    types = state["token_type_embeddings.weight"]
    assert torch.equal(t["cls_token"], state["transformer.cls_token"] + types[1])
    seg0 = state["text_embeddings.token_type_embeddings.weight"][0]
    assert torch.equal(t["text_embeddings.position_embeddings.weight"],
                      state["text_embeddings.position_embeddings.weight"][:8] + seg0)
    temporal = state["transformer.temporal_embed"]  # 3 frames → max_frames 4, the release's zero fill
    assert torch.equal(t["temporal_embed"][:, :3], temporal) and not t["temporal_embed"][:, 3].any()
    assert set(conv.dropped) | {s for v in conv.origins.values() for s in v} == set(state)
    assert all(k.startswith(("mlm_score.", "itm_score.", "text_embeddings.position_ids")) for k in conv.dropped)
    assert "masked-language-model" in conv.dropped["mlm_score.decoder.weight"]
    assert conv.overrides == {} and conv.left == {}


def test_allinone_at_paper_size_maps_every_tensor():
    cfg = ENCODERS.get("allinone-ti")
    state = ref.allinone_state(cfg, seed=0, frames=3, temporal=False)
    ckpt = SourceCheckpoint(Path("allinone-ti.ckpt"), "memory", state,
                            hyper_parameters=ref.allinone_hyper_parameters(cfg))
    conv = convert(ckpt, ALLINONE, cfg, "allinone-ti")
    assert conv.tensors["pos_embed"].shape == (1, 197, 192)
    assert conv.tensors["text_embeddings.position_embeddings.weight"].shape == (40, 192)
    assert "blocks.11.mlp.fc2.bias" in conv.tensors
    # Without a temporal embedding in the checkpoint the encoder adds none, as the release does.
    assert conv.tensors["temporal_embed"].shape == (1, 16, 192) and not conv.tensors["temporal_embed"].any()
    assert "zeros" in conv.notes["temporal_embed"]


def test_guess_names_the_layout(hf_folder, timm_state, allinone_ckpt):
    assert guess(list(timm_state()), {})[0] == ("timm", 1.0)
    hf = read_checkpoint(hf_folder("deit"))
    assert guess(list(hf.tensors), hf.config)[0] == ("hf-deit", 1.0)
    a = read_checkpoint(allinone_ckpt())
    assert guess(list(a.tensors), {})[0] == ("allinone", 1.0)


# ----------------------------------------------------------------------------- the command and the config


def _run(argv, capsys):
    capsys.readouterr()  # what came before (a model's save_pretrained progress) is not the command's
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_import_then_build_the_model_from_the_config(tmp_path, hf_folder, capsys):
    out = tmp_path / "vit.safetensors"
    code, text, err = _run(["weights", "import", "--from", "hf", str(hf_folder("vit")), "--preset", "allinone-test",
                            "--out", str(out)], capsys)
    assert code == 0, err
    assert f'"vision_weights": "{out}"' in text and '"layer_norm_eps": 1e-12' in text
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["layout"] == "hf-vit" and manifest["encoder_overrides"]["layer_norm_eps"] == 1e-12
    assert manifest["tensors"]["blocks.0.attn.qkv.weight"]["from"] == [
        f"encoder.layer.0.attention.attention.{p}.weight" for p in ("query", "key", "value")]
    assert load_file(str(out)).keys() == {k for k in manifest["tensors"]}
    enc = create_model("allinone-test", vision_weights=str(out), layer_norm_eps=1e-12)
    assert torch.equal(enc.patch_embed.proj.weight, load_file(str(out))["patch_embed.proj.weight"])
    # Without the epsilon the file was made for, the model is refused, not silently different.
    with pytest.raises(WeightLoadError, match=r"set encoder_overrides\.layer_norm_eps: 1e-12"):
        create_model("allinone-test", vision_weights=str(out))
    with pytest.raises(WeightLoadError, match="converted for preset 'allinone-test'"):
        create_model("allinone-cpu", vision_weights=str(out), layer_norm_eps=1e-12)
    code, _, err = _run(["weights", "import", "--from", "hf", str(hf_folder("vit")), "--preset", "allinone-test",
                         "--out", str(out)], capsys)
    assert code == 2 and "exists (pass --force" in err


def test_inspect_says_what_a_lightning_checkpoint_is(allinone_ckpt, capsys):
    code, text, err = _run(["weights", "inspect", str(allinone_ckpt()), "--preset", "allinone-test"], capsys)
    assert code == 0, err
    assert "torch zip, the state dict under 'state_dict'" in text
    assert "beside the weights: optimizer_states" in text and "allinone knows 100% of the keys" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and "->" in line}
    assert lines["transformer.blocks.0.attn.qkv.weight"].endswith("-> blocks.0.attn.qkv.weight")
    assert "dropped: the masked-language-model head" in lines["mlm_score.decoder.weight"]
    assert "temporal_embed: 3 frames, padded with zeros to max_frames=4" in text


# ----------------------------------------------------------------------------- bad input


def _bad_sources(tmp: Path, hf_folder, timm_state, allinone_ckpt, tiny_cfg) -> dict[str, tuple[list[str], str]]:
    """name → (the command's --from and SRC, what the one-line error must say)."""
    from transformers import BertConfig, BertModel

    cases: dict[str, tuple[list[str], str]] = {}
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    bert.save_pretrained(str(tmp / "bert"))
    cases["bert folder"] = (["hf", str(tmp / "bert")], "model_type 'bert' is not a ViT or DeiT")
    cases["bert as timm"] = (["timm", str(tmp / "bert" / "model.safetensors")],
                             "not a timm/DeiT vision state dict (none of its")
    resnet = {"conv1.weight": torch.randn(64, 3, 7, 7), "bn1.weight": torch.ones(64),
              "bn1.running_mean": torch.zeros(64), "layer1.0.conv1.weight": torch.randn(64, 64, 3, 3),
              "fc.weight": torch.randn(1000, 512)}
    torch.save(resnet, tmp / "resnet.pth")
    cases["resnet"] = (["timm", str(tmp / "resnet.pth")], "not a timm/DeiT vision state dict")
    good = tmp / "good.pth"
    torch.save({"model": timm_state()}, good)
    (tmp / "cut.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["truncated zip"] = (["timm", str(tmp / "cut.pth")], "truncated or not a PyTorch zip checkpoint")
    st = tmp / "good.safetensors"
    save_file(timm_state(), str(st))
    (tmp / "cut.safetensors").write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    cases["truncated safetensors"] = (["timm", str(tmp / "cut.safetensors")], "not a complete safetensors file")
    wide = ref.hf_model("vit", ENCODERS.get("allinone-test").replace(width=96))
    wide.save_pretrained(str(tmp / "wide"))
    cases["width"] = (["hf", str(tmp / "wide")], "hidden_size=96; preset 'allinone-test' needs 192")
    coarse = {**timm_state(), "patch_embed.proj.weight": torch.randn(192, 3, 16, 16)}
    torch.save(coarse, tmp / "p16.pth")
    cases["patch size"] = (["timm", str(tmp / "p16.pth")],
                           "key 'patch_embed.proj.weight' has shape [192, 3, 16, 16], preset 'allinone-test' "
                           "expects [192, 3, 8, 8]")
    torch.save({"model": timm_state(), "state_dict": timm_state()}, tmp / "both.pth")
    cases["two wrappers"] = (["timm", str(tmp / "both.pth")], "both 'state_dict' and 'model' hold a state dict")
    hf = load_file(str(hf_folder("vit") / "model.safetensors"))
    save_file({**hf, "vit.embeddings.cls_token": hf["embeddings.cls_token"].clone()}, str(tmp / "dup.safetensors"))
    cases["duplicate"] = (["hf-vit", str(tmp / "dup.safetensors")],
                          "keys 'embeddings.cls_token' and 'vit.embeddings.cls_token' are the same key")
    nan = timm_state()
    nan["blocks.0.mlp.fc1.weight"][3, 4] = float("nan")
    torch.save(nan, tmp / "nan.pth")
    cases["nan"] = (["timm", str(tmp / "nan.pth")], "key 'blocks.0.mlp.fc1.weight' has 1 NaN/inf values")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _System(f"touch {tmp / 'ran'}")}, tmp / "evil.ckpt")
    cases["code"] = (["allinone", str(tmp / "evil.ckpt")], "refused to unpickle: it names posix.system")
    cases["other layout"] = (["allinone", str(hf_folder("vit"))], "not an All-in-One state dict")
    cases["deit as vit"] = (["hf-vit", str(hf_folder("deit"))], "model_type='deit'")
    return cases


def test_bad_sources_end_in_one_line_and_no_file(tmp_path, hf_folder, timm_state, allinone_ckpt, tiny_cfg, capsys):
    cases = _bad_sources(tmp_path, hf_folder, timm_state, allinone_ckpt, tiny_cfg)
    for name, (source, expected) in cases.items():
        out = tmp_path / "out" / f"{name.replace(' ', '-')}.safetensors"
        code, _, err = _run(["weights", "import", "--from", *source, "--preset", "allinone-test", "--out", str(out)],
                            capsys)
        assert code == 2, (name, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert expected in err, (name, err)
        assert not out.exists() and not manifest_path(out).exists(), name
    assert not (tmp_path / "ran").exists()


def test_an_allinone_checkpoint_too_short_for_the_text_is_named(allinone_ckpt, tmp_path, capsys):
    out = tmp_path / "a.safetensors"
    code, _, err = _run(["weights", "import", "--from", "allinone", str(allinone_ckpt()), "--preset", "allinone-test",
                         "--set", "max_text_len=64", "--out", str(out)], capsys)
    assert code == 2 and "has 40 rows, the preset's max_text_len is 64: set max_text_len: 40 or less" in err
    assert not out.exists()


def test_an_allinone_import_replaces_the_minilm_table(allinone_ckpt, tmp_path, capsys):
    out = tmp_path / "cpu.safetensors"
    # The release's word table is as wide as the model (192); no optimizer state, to keep the file small.
    source = allinone_ckpt(cfg=ENCODERS.get("allinone-cpu").replace(word_dim=192), optimizer=False)
    code, text, err = _run(["weights", "import", "--from", "allinone", str(source), "--preset", "allinone-cpu",
                            "--set", "word_dim=192", "--out", str(out)], capsys)
    assert code == 0, err
    overrides = json.loads(text.split("encoder_overrides: ", 1)[1])
    assert overrides == {"word_dim": 192, "vision_weights": str(out), "pretrained_text": False}
    enc = create_model("allinone-cpu", **overrides)
    assert torch.equal(enc.text_embeddings.word_embeddings.weight,
                       load_file(str(out))["text_embeddings.word_embeddings.weight"])
