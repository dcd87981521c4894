"""DDP helpers, and stage 1 + feature extraction under torchrun equal to one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stablesynth.checkpoint import load_checkpoint
from stablesynth.training.distributed import SINGLE, init_distributed, shard_indices
from stablesynth.training.features import load_features


def test_shards_are_distributed_sampler_slices_of_the_global_batches():
    n, world, b = 14, 2, 3
    ranks = [shard_indices(n, r, world, seed=5, epoch=2) for r in range(world)]
    assert all(len(r) == 7 for r in ranks)
    single = shard_indices(n, 0, 1, seed=5, epoch=2)
    assert sorted(single) == list(range(n))
    for step in range(2):
        union = sorted(i for r in ranks for i in r[step * b:(step + 1) * b])
        assert union == sorted(single[step * world * b:(step + 1) * world * b])
    # Padding keeps every rank at the same length (no rank waits forever in an all-reduce).
    odd = [shard_indices(5, r, 2, shuffle=False) for r in range(2)]
    assert odd == [[0, 2, 4], [1, 3, 0]]
    assert [shard_indices(5, r, 2, shuffle=False, drop_last=True) for r in range(2)] == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="rank"):
        shard_indices(4, 2, 2)


def test_single_process_context(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed()
    assert ctx is SINGLE and ctx.is_main and not ctx.enabled
    assert ctx.all_reduce({"a": 2, "b": 3.5}) == {"a": 2.0, "b": 3.5}
    ctx.barrier()
    model = torch.nn.Linear(2, 2)
    assert ctx.wrap(model) is model
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "x")
    with pytest.raises(RuntimeError, match="WORLD_SIZE"):
        init_distributed()


SCRIPT = textwrap.dedent('''
    import sys
    from pathlib import Path

    import torch

    from stablesynth.models.encoder import create_model
    from stablesynth.training.distributed import cleanup, init_distributed, shard_indices
    from stablesynth.training.features import extract_features
    from stablesynth.models.global_model import GlobalModel
    from stablesynth.training.stage1 import Stage1Config, train_stage1

    out, global_batch = Path(sys.argv[1]), int(sys.argv[2])
    # gloo on CPUs even where CUDA is present: NCCL needs a GPU per rank, and this compares CPU runs.
    ctx = init_distributed(device="cpu")
    g = torch.Generator().manual_seed(0)
    N = 16
    data = {
        "frames": torch.randn(N, 2, 3, 16, 16, generator=g),
        "input_ids": torch.randint(1000, 2000, (N, 8), generator=g),
        "attention_mask": torch.ones(N, 8, dtype=torch.long),
        "label": torch.randint(0, 4, (N,), generator=g),
        "global_index": torch.tensor([[0, 1]] * N),
        "device": torch.arange(N) % 3, "question_type": torch.zeros(N, dtype=torch.long),
        "upload_index": torch.zeros(N, dtype=torch.long), "sample_id": torch.arange(N),
    }
    torch.manual_seed(0)
    model = GlobalModel(create_model("allinone-test"), 4, dropout=0.0)
    per_rank = global_batch // ctx.world_size

    def loader(epoch):
        mine = shard_indices(N, ctx.rank, ctx.world_size, seed=7, epoch=epoch)
        return [{k: v[mine[s:s + per_rank]] for k, v in data.items()} for s in range(0, len(mine), per_rank)]

    cfg = Stage1Config(epochs=2, lr=1e-3, batch_size=global_batch, warmup_ratio=0.0, head_dropout=0.0)
    info = train_stage1(model, loader, cfg, out / "stage1", seed=0, dist=ctx)
    batches = [{k: v[s:s + 2] for k, v in data.items()} for s in range(0, N, 2)]
    extract_features(model.encoder, lambda: batches, len(batches), out / "features", {"test": 1},
                     shard_batches=2, dist=ctx)
    if ctx.is_main:
        (out / "loss.txt").write_text(repr([h["loss"] for h in info["history"]]))
    cleanup(ctx)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(script: Path, out: Path, nproc: int, global_batch: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, str(script), str(out), str(global_batch)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *cmd[1:]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process_with_double_batch(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    _run(script, tmp_path / "one", nproc=1, global_batch=8)
    _run(script, tmp_path / "two", nproc=2, global_batch=8)
    one, m1 = load_checkpoint(tmp_path / "one" / "stage1", expect_kind="stage1")
    two, m2 = load_checkpoint(tmp_path / "two" / "stage1", expect_kind="stage1")
    assert m1["epoch"] == m2["epoch"] == 2
    # AdamW divides by sqrt(v): parameters with near-zero gradients (e.g. attention key biases)
    # move by float noise, so the bound is a small fraction of lr × steps (1e-3 × 4), not 1e-7.
    for name, t in one.items():
        if name.startswith("model."):
            assert torch.allclose(t, two[name], atol=1e-4, rtol=1e-4), name
    # Epoch losses are summed over ranks, so both runs log the same numbers.
    l1 = eval((tmp_path / "one" / "loss.txt").read_text())
    l2 = eval((tmp_path / "two" / "loss.txt").read_text())
    assert l1 == pytest.approx(l2, rel=1e-4)
    # Feature shards written by two ranks form the same cache as one process's.
    f1, f2 = load_features(tmp_path / "one" / "features"), load_features(tmp_path / "two" / "features")
    assert set(f1) == set(f2)
    for k in f1:
        assert torch.allclose(f1[k].float(), f2[k].float(), atol=1e-5), k
    shards = sorted(p.name for p in (tmp_path / "two" / "features").glob("shard-*"))
    assert len(shards) == 4
