import numpy as np
import pytest
import torch

from stablesynth.config import ConfigError
from stablesynth.data.benchmark import BATCH_KEYS, FRAME_MEAN, FRAME_STD, PROBE, DeviceBenchmark
from stablesynth.data.benchmark_config import BenchmarkConfig
from stablesynth.data.clip_loader import make_loader
from stablesynth.data.devices import CaptureProfile, capture_clips
from stablesynth.data.easyvqa import COLORS, IGNORE, QUESTION_TYPES, SHAPES, load_easyvqa

SMALL = dict(n_devices=5, n_unseen=2, history_per_device=40, realtime_per_device=16)


@pytest.fixture(scope="module")
def bench() -> DeviceBenchmark:
    return DeviceBenchmark.build(BenchmarkConfig(**SMALL))


def _tables_equal(a, b) -> bool:
    return all(
        torch.equal(getattr(a, k), getattr(b, k))
        for k in ("sample_id", "device", "image", "question", "label", "jitter_seed", "upload_index", "global_index")
    )


def test_same_seed_identical_other_seed_different(bench):
    again = DeviceBenchmark.build(BenchmarkConfig(**SMALL))
    assert again.devices == bench.devices
    for split in ("history", "realtime"):
        assert _tables_equal(again.splits[split], bench.splits[split])
    rows = torch.arange(8)
    assert torch.equal(again.batch("history", rows)["frames"], bench.batch("history", rows)["frames"])
    other = DeviceBenchmark.build(BenchmarkConfig(**SMALL, seed=1))
    assert other.devices[0].history != bench.devices[0].history
    assert not torch.equal(other.splits["history"].question, bench.splits["history"].question)


def test_clip_frames_are_stable_across_reads_and_batches(bench):
    a = bench.batch("realtime", torch.tensor([3, 4, 5]))["frames"]
    b = bench.batch("realtime", torch.tensor([5, 4, 3]))["frames"]
    assert torch.allclose(a, b.flip(0), atol=1e-6)
    assert torch.equal(a, bench.batch("realtime", torch.tensor([3, 4, 5]))["frames"])


def test_history_from_train_realtime_from_test_disjoint(bench):
    d = load_easyvqa()
    h, r = bench.splits["history"], bench.splits["realtime"]
    assert torch.equal(h.label, d.train.answer[h.question]) and torch.equal(h.image, d.train.image[h.question])
    assert torch.equal(r.label, d.test.answer[r.question]) and torch.equal(r.image, d.test.image[r.question])
    assert not set(h.sample_id.tolist()) & set(r.sample_id.tolist())
    # the pixels a history clip shows are its train image's (clean render, no jitter, full size)
    frames = bench.render("history", torch.tensor([0]), clean=True, size=64, jitter=False)
    assert torch.equal(frames[0, 0], d.train.images[h.image[0]].float() / 255)
    assert len(h) == 5 * 40 and len(r) == 5 * 16
    for dev in range(5):
        assert int((h.device == dev).sum()) == 40 and int((r.device == dev).sum()) == 16


def test_seen_unseen_disjoint(bench):
    seen, unseen = set(bench.seen_devices), set(bench.unseen_devices)
    assert not seen & unseen and seen | unseen == set(range(5)) and len(unseen) == 2
    # unseen devices still have a history (the per-device fine-tuning reference trains on it)
    assert set(bench.samples("history", "unseen").device.tolist()) == unseen
    assert set(bench.samples("history", "seen").device.tolist()) == seen


def test_skew_follows_dirichlet_draw():
    cfg = BenchmarkConfig(n_devices=3, n_unseen=0, history_per_device=3000, realtime_per_device=1)
    b = DeviceBenchmark.build(cfg)
    for dev in b.devices:
        labels = b.category("answer", "history", [dev.id])
        freq = torch.bincount(labels, minlength=13).double() / len(labels)
        corr = np.corrcoef(freq.numpy(), np.asarray(dev.skew))[0, 1]
        assert corr > 0.95
    qt = DeviceBenchmark.build(cfg.replace(skew_over="question_type", history_per_device=2000))
    for dev in qt.devices:
        assert len(dev.skew) == 4
        freq = torch.bincount(qt.category("question_type", "history", [dev.id]), minlength=4).double() / 2000
        assert np.corrcoef(freq.numpy(), np.asarray(dev.skew))[0, 1] > 0.95


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"n_unseen": 5}, "n_unseen"),
        ({"n_unseen": -1}, "n_unseen"),
        ({"global_frames": 6}, "global_frames"),
        ({"history_per_device": -3}, "history_per_device"),
        ({"gain_range": [1.5, 0.5]}, "gain_range"),
        ({"gamma_range": [0.0, 1.0]}, "gamma_range"),
        ({"skew_alpha": 0.0}, "skew_alpha"),
        ({"skew_over": "colour"}, "skew_over"),
        ({"image_size": 2}, "image_size"),
        ({"drift": -0.1}, "drift"),
        ({"n_devcies": 3}, "n_devcies"),
    ],
)
def test_bad_config_names_the_key(changes, key):
    with pytest.raises(ConfigError, match=key):
        BenchmarkConfig.from_dict({**SMALL, **changes})


def test_default_config_file_matches_dataclass():
    assert BenchmarkConfig.default() == BenchmarkConfig()


def test_loader_batches_follow_the_contract(bench):
    loader = make_loader(bench, "history", devices="seen", batch_size=8, shuffle=True)
    batch = next(iter(loader))
    assert tuple(batch) == BATCH_KEYS
    cfg = bench.cfg
    assert batch["frames"].shape == (8, cfg.frames_per_clip, 3, cfg.image_size, cfg.image_size)
    assert batch["frames"].dtype == torch.float32
    for k in ("input_ids", "attention_mask"):
        assert batch[k].shape == (8, cfg.max_question_len) and batch[k].dtype == torch.long
    for k in ("label", "device", "question_type", "upload_index", "sample_id"):
        assert batch[k].shape == (8,) and batch[k].dtype == torch.long
    assert batch["global_index"].shape == (8, cfg.global_frames) and batch["global_index"].dtype == torch.long
    assert (batch["input_ids"][:, 0] == 101).all()
    assert set(batch["device"].tolist()) <= set(bench.seen_devices)
    gi = batch["global_index"]
    assert (gi[:, 1:] > gi[:, :-1]).all() and gi.min() >= 0 and gi.max() < cfg.frames_per_clip
    assert batch["upload_index"].min() >= 0 and batch["upload_index"].max() < cfg.frames_per_clip
    # normalised with DeiT's mean/std: [0, 1] maps into [-mean/std, (1-mean)/std]
    lo = min(-m / s for m, s in zip(FRAME_MEAN, FRAME_STD))
    hi = max((1 - m) / s for m, s in zip(FRAME_MEAN, FRAME_STD))
    assert batch["frames"].min() >= lo - 1e-5 and batch["frames"].max() <= hi + 1e-5
    # same seed → same shuffled order
    again = next(iter(make_loader(bench, "history", devices="seen", batch_size=8, shuffle=True)))
    assert torch.equal(again["sample_id"], batch["sample_id"])


def test_loader_covers_split_and_clean_differs(bench):
    loader = make_loader(bench, "realtime", batch_size=32)
    ids = torch.cat([b["sample_id"] for b in loader])
    assert torch.equal(ids, bench.samples("realtime").sample_id)
    clean = next(iter(make_loader(bench, "realtime", batch_size=4, clean=True)))
    shifted = next(iter(make_loader(bench, "realtime", batch_size=4)))
    assert torch.equal(clean["label"], shifted["label"])
    assert (clean["frames"] - shifted["frames"]).abs().mean() > 0.05


def test_helpers_and_errors(bench):
    assert bench.num_classes == 13 and len(bench.answer_names) == 13
    assert bench.num_categories("question_type") == 4 and bench.num_categories("device") == 5
    assert torch.equal(bench.category("device", "realtime"), bench.splits["realtime"].device)
    assert bench.profile_params("history").shape == (5, 8)
    with pytest.raises(ValueError, match="kind"):
        bench.category("colour")
    with pytest.raises(ValueError, match="split"):
        bench.samples("val")
    with pytest.raises(ValueError, match="device"):
        make_loader(bench, "history", devices=[99])
    with pytest.raises(IndexError):
        bench.batch("history", [10_000])


# easy-VQA's palette (gen_data/generate_data.py draws shapes in these RGB colours)
PALETTE = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "yellow": (255, 255, 0),
}


def test_default_casts_flip_colour_answers_for_a_cast_blind_reader():
    """The shift must change the right answer's look: reading the shape's colour off the pixels
    with the clean palette is near perfect on clean frames and fails on some devices."""
    b = DeviceBenchmark.build(BenchmarkConfig(history_per_device=60, realtime_per_device=4))
    t = b.samples("history")
    rows = (t.question_type == 1).nonzero().squeeze(1)
    images = b.data.train.images[t.image[rows]]
    seeds = t.jitter_seed[rows]
    identity = CaptureProfile.identity().to_tensor().expand(len(rows), -1).contiguous()
    clean = capture_clips(images, identity, seeds, 1, 64, None)[:, 0]
    shot = capture_clips(images, b.profile_params("history")[t.device[rows]], seeds, 1, 64, None)[:, 0]
    mask = ((clean - clean[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.3).float()
    palette = torch.tensor(list(PALETTE.values()), dtype=torch.float32) / 255
    names = torch.tensor([b.answer_names.index(k) for k in PALETTE])

    def read(x):
        colour = (x * mask).sum((2, 3)) / mask.sum((2, 3)).clamp_min(1)
        return names[torch.cdist(colour, palette).argmin(1)]

    label, dev = t.label[rows], t.device[rows]
    assert (read(clean) == label).float().mean() > 0.97
    hit = read(shot) == label
    assert hit.float().mean() < 0.95
    per_device = [float(hit[dev == d].float().mean()) for d in range(b.cfg.n_devices) if (dev == d).any()]
    assert min(per_device) < 0.85


def test_realtime_session_drifts_with_capture_order(bench):
    frac = bench.session_fraction("realtime")
    table = bench.splits["realtime"]
    for d in table.device.unique().tolist():
        f = frac[table.device == d]
        assert bool((f[1:] > f[:-1]).all()) and float(f[-1]) == 1.0  # grows to the full drift at the end
    # The last clip of a session is captured with the real-time profile, the first one nearer the history's.
    dev = int(table.device[0])
    rows = torch.nonzero(table.device == dev).flatten()
    last, first = int(rows[-1]), int(rows[0])
    real = bench.render("realtime", torch.tensor([last]), jitter=False)
    images = bench.data.split("test").images[table.image[[last]]]
    expect = capture_clips(images, bench.profile_params("realtime")[[dev]], table.jitter_seed[[last]],
                           bench.cfg.frames_per_clip, bench.cfg.image_size, None)
    assert torch.allclose(real, expect)
    assert float(frac[first]) < 1.0


def test_probe_asks_every_device_one_question_type_and_changes_nothing_else():
    b = DeviceBenchmark.build(BenchmarkConfig(n_devices=4, n_unseen=1, history_per_device=12, realtime_per_device=6,
                                              image_size=16))
    before = {s: b.samples(s).sample_id.clone() for s in ("history", "realtime")}
    fingerprint = b.fingerprint()
    b.add_probe("shape", 9)
    probe = b.samples(PROBE)
    assert torch.equal(torch.bincount(probe.device), torch.full((4,), 9))
    assert set(probe.question_type.tolist()) == {QUESTION_TYPES.index("shape")}
    assert b.fingerprint() == fingerprint and all(torch.equal(b.samples(s).sample_id, v) for s, v in before.items())
    assert int(probe.sample_id.min()) == 4 * 12 + 4 * 6  # ids follow the benchmark's own
    first = b.batch(PROBE, torch.arange(9))
    assert first["frames"].shape == (9, 5, 3, 16, 16) and bool((first["label"] >= 0).all())
    b.add_probe("shape", 9)
    assert torch.equal(b.batch(PROBE, torch.arange(9))["frames"], first["frames"])  # the same draw again
    with pytest.raises(ValueError, match="question type"):
        b.add_probe("size", 3)


def test_attribute_batches_carry_each_scenes_colour_and_shape(bench):
    rows = torch.arange(40)
    plain, with_attrs = bench.batch("history", rows), bench.batch("history", rows, attributes=True)
    assert set(with_attrs) - set(plain) == {"color", "shape"}
    assert all(torch.equal(plain[k], with_attrs[k]) for k in plain)  # nothing else changes
    table = bench.samples("history")
    for split_rows, key, names in ((rows, "color", COLORS), (rows, "shape", SHAPES)):
        for r in split_rows.tolist():
            answer = bench.answer_names[int(table.label[r])]
            if answer in names:  # a what-colour / what-shape question names its scene's value
                assert int(with_attrs[key][r]) == names.index(answer)
    known = with_attrs["shape"] != IGNORE
    assert float(known.float().mean()) > 0.8
    batch = next(iter(make_loader(bench, "history", "seen", batch_size=8, attributes=True)))
    assert {"color", "shape"} <= set(batch)
