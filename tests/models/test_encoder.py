import pytest
import torch
from safetensors.torch import save_file

from stablesynth.config import ConfigError
from stablesynth.models.encoder import (
    ENCODERS,
    EncoderConfig,
    MultimodalEncoder,
    WeightLoadError,
    create_model,
    load_vision_weights,
    load_word_embeddings,
    resize_pos_embed,
)
from stablesynth.registry import UnknownNameError


def _inputs(B=2, F=3, S=16, L=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(B, F, 3, S, S, generator=g)
    ids = torch.randint(1000, 30522, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    return frames, ids, mask


@pytest.fixture
def enc():
    torch.manual_seed(0)
    return create_model("allinone-test").eval()


def test_output_shape_and_timm_names(enc):
    frames, ids, mask = _inputs()
    out = enc(frames, ids, mask)
    assert out.shape == (2, 3, 192)
    names = set(enc.state_dict())
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed",
                "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias",
                "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "norm.weight",
                "text_embeddings.word_embeddings.weight", "token_type_embeddings.weight", "temporal_embed"):
        assert key in names, key
    assert enc.text_embeddings.word_embeddings.weight.shape == (30522, 192)


def test_presets_registered():
    assert {"allinone-ti", "allinone-cpu", "allinone-test"} <= set(ENCODERS.names())
    ti = ENCODERS.get("allinone-ti")
    got = (ti.image_size, ti.patch_size, ti.depth, ti.num_heads, ti.width, ti.max_text_len)
    assert got == (224, 16, 12, 3, 192, 40)
    assert ENCODERS.get("allinone-cpu").pretrained_text
    with pytest.raises(UnknownNameError, match="unknown encoder 'nope'"):
        create_model("nope")
    with pytest.raises(ConfigError, match="patch_size"):
        create_model("allinone-test", patch_size=5)
    with pytest.raises(ConfigError, match="unknown key depthh"):
        create_model("allinone-test", depthh=2)


def test_padding_tokens_do_not_change_the_output(enc):
    frames, ids, mask = _inputs()
    short_ids, short_mask = ids[:, :5], mask[:, :5]
    padded_ids = ids.clone()
    padded_ids[:, 5:] = torch.randint(0, 30522, (2, 3))
    padded_mask = mask.clone()
    padded_mask[:, 5:] = 0
    with torch.no_grad():
        a = enc(frames, padded_ids, padded_mask)
        other = padded_ids.clone()
        other[:, 5:] = 0
        b = enc(frames, other, padded_mask)
        c = enc(frames, short_ids, short_mask)
        unmasked = enc(frames, padded_ids, mask)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, unmasked, atol=1e-4)


def test_frames_are_encoded_independently_but_with_the_question(enc):
    frames, ids, mask = _inputs()
    with torch.no_grad():
        full = enc(frames, ids, mask)
        # A frame's feature depends on its own pixels, its index (temporal embedding) and the question.
        first_two = enc(frames[:, :2], ids, mask)
        other_q = enc(frames, torch.roll(ids, 1, dims=1), mask)
    torch.testing.assert_close(full[:, :2], first_two, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full, other_q, atol=1e-4)
    assert not torch.allclose(full[:, 0], full[:, 1], atol=1e-4)


def test_deterministic():
    frames, ids, mask = _inputs()
    torch.manual_seed(3)
    a = create_model("allinone-test").eval()
    torch.manual_seed(3)
    b = create_model("allinone-test").eval()
    with torch.no_grad():
        assert torch.equal(a(frames, ids, mask), b(frames, ids, mask))
        assert torch.equal(a(frames, ids, mask), a(frames, ids, mask))


def test_gradients_reach_every_trainable_parameter(enc):
    frames, ids, mask = _inputs()
    enc.train()
    enc(frames, ids, mask).sum().backward()
    no_grad = [n for n, p in enc.named_parameters() if p.requires_grad and p.grad is None]
    # Only the word rows are sparse in use; the table still receives a (mostly zero) gradient.
    assert no_grad == []


def test_bad_inputs_are_clear_errors(enc):
    frames, ids, mask = _inputs()
    with pytest.raises(ValueError, match="frames must be"):
        enc(frames[:, :, :, :8], ids, mask)
    with pytest.raises(ValueError, match="max_text_len"):
        enc(frames, torch.zeros(2, 9, dtype=torch.long), torch.ones(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="max_frames"):
        enc(torch.randn(1, 5, 3, 16, 16), ids[:1], mask[:1])
    with pytest.raises(ValueError, match="input_ids must lie"):
        enc(frames, ids + 30522, mask)
    with pytest.raises(ValueError, match="attention_mask shape"):
        enc(frames, ids, mask[:, :4])


def _fake_deit_tiny(depth=12, grid=14, dist=False, seed=0):
    """A DeiT-Tiny-shaped state dict with timm's names (and its classifier head)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    prefix = 2 if dist else 1
    sd = {"patch_embed.proj.weight": r(192, 3, 16, 16), "patch_embed.proj.bias": r(192),
          "cls_token": r(1, 1, 192), "pos_embed": r(1, prefix + grid * grid, 192),
          "norm.weight": 1 + r(192), "norm.bias": r(192), "head.weight": r(1000, 192), "head.bias": r(1000)}
    if dist:
        sd["dist_token"] = r(1, 1, 192)
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(192), p + "norm1.bias": r(192),
                   p + "attn.qkv.weight": r(576, 192), p + "attn.qkv.bias": r(576),
                   p + "attn.proj.weight": r(192, 192), p + "attn.proj.bias": r(192),
                   p + "norm2.weight": 1 + r(192), p + "norm2.bias": r(192),
                   p + "mlp.fc1.weight": r(768, 192), p + "mlp.fc1.bias": r(768),
                   p + "mlp.fc2.weight": r(192, 768), p + "mlp.fc2.bias": r(192)})
    return sd


def test_timm_deit_state_dict_loads_with_pos_embed_interpolation(tmp_path):
    sd = _fake_deit_tiny()
    path = tmp_path / "deit_tiny.safetensors"
    save_file(sd, str(path))
    torch.manual_seed(0)
    # 32 px / patch 16 = 2×2 grid: pos_embed is resampled from DeiT's 14×14; 2 of its 12 blocks are used.
    enc = MultimodalEncoder(EncoderConfig(image_size=32, patch_size=16, depth=2, max_text_len=8)).eval()
    frames, ids, mask = _inputs(S=32)
    with torch.no_grad():
        before = enc(frames, ids, mask)
    report = load_vision_weights(enc, path)
    assert "blocks.11.mlp.fc2.weight" in report["ignored"] and "head.weight" in report["ignored"]
    assert "blocks.1.attn.qkv.weight" in report["loaded"]
    assert torch.equal(enc.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    assert torch.equal(enc.patch_embed.proj.weight, sd["patch_embed.proj.weight"])
    assert torch.equal(enc.pos_embed[:, 0], sd["pos_embed"][:, 0])
    assert enc.pos_embed.shape == (1, 5, 192)
    with torch.no_grad():
        after = enc(frames, ids, mask)
    assert not torch.allclose(before, after, atol=1e-4)


def test_resize_pos_embed_is_identity_on_same_grid_and_smooth_otherwise():
    pe = torch.randn(1, 1 + 16, 8)
    assert torch.equal(resize_pos_embed(pe, 16), pe)
    # A constant grid stays constant when resampled.
    const = torch.cat([torch.zeros(1, 1, 8), torch.ones(1, 196, 8)], dim=1)
    out = resize_pos_embed(const, 64)
    assert out.shape == (1, 65, 8)
    torch.testing.assert_close(out[:, 1:], torch.ones(1, 64, 8))
    with pytest.raises(WeightLoadError, match="square"):
        resize_pos_embed(pe, 15)


def test_full_deit_tiny_into_allinone_ti_and_distilled_variant(tmp_path):
    path = tmp_path / "deit.pth"
    torch.save({"model": _fake_deit_tiny(dist=True)}, path)
    enc = create_model("allinone-ti", vision_weights=str(path))
    assert enc.pos_embed.shape == (1, 197, 192)
    sd = _fake_deit_tiny(dist=True)
    # The distillation token's position is dropped, the CLS position kept.
    assert torch.equal(enc.pos_embed[0, 0], sd["pos_embed"][0, 0])
    assert torch.equal(enc.pos_embed[0, 1:], sd["pos_embed"][0, 2:])


def test_missing_or_mismatched_vision_weights_are_clear(tmp_path):
    enc = create_model("allinone-test")
    with pytest.raises(WeightLoadError, match="weight file not found"):
        load_vision_weights(enc, tmp_path / "absent.safetensors")
    sd = _fake_deit_tiny(depth=1)
    del sd["blocks.0.attn.proj.weight"]
    save_file(sd, str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightLoadError, match=r"missing key 'blocks\.0\.attn\.proj\.weight'"):
        load_vision_weights(create_model("allinone-test", patch_size=16), tmp_path / "missing.safetensors")
    # allinone-test has patch 8, DeiT has patch 16.
    save_file(_fake_deit_tiny(depth=1), str(tmp_path / "deit.safetensors"))
    with pytest.raises(WeightLoadError, match=r"'patch_embed\.proj\.weight' has shape"):
        load_vision_weights(enc, tmp_path / "deit.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightLoadError, match="cannot read weights"):
        load_vision_weights(enc, tmp_path / "garbage.safetensors")
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightLoadError, match="not a timm/DeiT vision state dict"):
        load_vision_weights(enc, tmp_path / "other.safetensors")


def test_minilm_word_embeddings_load_from_the_package():
    from safetensors import safe_open

    from stablesynth.assets import minilm_dir

    enc = create_model("allinone-test", word_dim=384, pretrained_text=True)
    with safe_open(str(minilm_dir() / "model.safetensors"), "pt") as f:
        table = f.get_tensor("embeddings.word_embeddings.weight")
    assert torch.equal(enc.text_embeddings.word_embeddings.weight, table)
    assert isinstance(enc.text_embeddings.word_proj, torch.nn.Linear)
    frames, ids, mask = _inputs()
    assert enc(frames, ids, mask).shape == (2, 3, 192)
    # The default width (192) cannot take MiniLM's 384-wide table.
    with pytest.raises(WeightLoadError, match=r"expects \[30522, 192\] \(set word_dim=384\)"):
        load_word_embeddings(create_model("allinone-test"))
    with pytest.raises(WeightLoadError, match="weight file not found"):
        load_word_embeddings(enc, "/nonexistent/model.safetensors")


def test_cpu_preset_freezes_pretrained_word_table():
    enc = create_model("allinone-cpu")
    assert not enc.text_embeddings.word_embeddings.weight.requires_grad
    assert enc.text_embeddings.word_embeddings.weight.shape == (30522, 384)
    frames = torch.randn(1, 2, 3, 32, 32)
    out = enc(frames, torch.randint(0, 30522, (1, 16)), torch.ones(1, 16, dtype=torch.long))
    assert out.shape == (1, 2, 192)


def test_state_dict_save_reload_identical(tmp_path, enc):
    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path))
    torch.manual_seed(99)
    other = create_model("allinone-test").eval()
    from safetensors.torch import load_file

    other.load_state_dict(load_file(str(path)))
    frames, ids, mask = _inputs()
    with torch.no_grad():
        assert torch.equal(other(frames, ids, mask), enc(frames, ids, mask))
