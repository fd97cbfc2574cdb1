"""Distributed training (lavae_fast.distributed): two CPU processes with gloo under torchrun, against
a single process that computes each rank's half-batch loss separately and averages the gradients."""

import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import lavae_fast
from lavae_fast import distributed
from lavae_fast import train as T
from lavae_fast.aux_vae import AuxVAE
from lavae_fast.checkpoint import load_checkpoint
from lavae_fast.data import DATASETS, load_run_split
from lavae_fast.loading import build_model
from lavae_fast.model import LAVAE
from lavae_fast.noise import data_indices, draw_noise
from lavae_fast.recipe import Recipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(lavae_fast.__file__)))

# 2 processes × 4 images; 5 steps cover the warm-up (aux VAE, n forced to 1), the ramp and the
# phase after it (n = n̂): with this seed one process's share holds no object at step 3 (its sprite
# decoder gets no gradient) and neither share does at step 4 (no gradient at all: Adamax must skip
# those parameters, as the single process does).
WORLD = 2
ARGS = ["--dataset", "multi-dsprites", "--canvas", "32", "--n-train", "64", "--n-test", "8", "--n-test7", "8",
        "--batch-size", "8", "--width", "6", "--sprite-width", "36", "--threads", "1", "--no-progress",
        "--log-every", "2", "--eval-every", "0", "--steps", "5", "--ckpt-every", "2", "--seed", "1"]

# Runs under torchrun: the trainer of lavae_fast.train's options, then each rank saves the parameters it ended with
# (rank 0 alone writes checkpoints, so this is how the test sees rank 1's).
RUNNER = textwrap.dedent("""
    import os, sys, torch
    from lavae_fast.train import build_parser, parse_with_config
    from lavae_fast.train_config import TrainConfig
    from lavae_fast.trainer import Trainer
    config = TrainConfig.from_args(parse_with_config(build_parser(), sys.argv[2:]))
    with Trainer(config) as trainer:
        rc = trainer.setup().fit().exit_code
        torch.save({"model": trainer.model.state_dict(), "aux": trainer.aux.state_dict()},
                   os.path.join(sys.argv[1], "rank%s.pt" % os.environ["RANK"]))
    sys.exit(rc)
""")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


def test_noise_and_data_do_not_depend_on_the_batch_split():
    B, step, seed = 8, 5, 11
    ids = torch.arange(step * B, (step + 1) * B)
    whole = draw_noise(seed, step, ids, num_pixels=30, max_objects=3, latent_size=4, aux_shape=(2, 3, 3))
    idx = data_indices(seed, step, B, 50)
    for world in (2, 4):
        parts = []
        for rank in range(world):
            lo, hi = distributed.DistContext(rank=rank, world_size=world).shard(B)
            parts.append(draw_noise(seed, step, ids[lo:hi], num_pixels=30, max_objects=3, latent_size=4,
                                    aux_shape=(2, 3, 3)))
            assert torch.equal(idx[lo:hi], data_indices(seed, step, B, 50)[lo:hi])
        for name in ("gumbel", "eps", "coin", "aux_eps"):
            assert torch.equal(getattr(whole, name), torch.cat([getattr(p, name) for p in parts])), name
    # and the key really is the sample: another image's noise differs
    other = draw_noise(seed, step, ids + 1, num_pixels=30, max_objects=3, latent_size=4)
    assert not torch.equal(whole.gumbel, other.gumbel)


def test_shards_tile_the_batch_and_an_indivisible_batch_is_refused():
    spans = [distributed.DistContext(rank=r, world_size=3).shard(12) for r in range(3)]
    assert spans == [(0, 4), (4, 8), (8, 12)]
    with pytest.raises(distributed.DistributedSetupError, match="--batch-size 10 must be divisible"):
        distributed.DistContext(rank=0, world_size=4).shard(10)


def test_setup_reads_the_environment_and_refuses_bad_launches(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    ctx = distributed.setup("cpu", 5)
    assert (ctx.rank, ctx.world_size, ctx.enabled, ctx.is_main, ctx.device.type) == (0, 1, False, True, "cpu")
    assert ctx.wrap(nn.Linear(2, 2)).__class__ is nn.Linear  # no DDP without a process group
    with pytest.raises(distributed.DistributedSetupError, match="--sync-bn needs --device cuda"):
        distributed.setup("cpu", 4, sync_bn=True)
    with pytest.raises(distributed.DistributedSetupError, match="nccl needs --device cuda"):
        distributed.setup("cpu", 4, backend="nccl")
    with pytest.raises(distributed.DistributedSetupError, match="--device"):
        distributed.setup("banana", 4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(distributed.DistributedSetupError, match="divisible"):
        distributed.setup("cpu", 5)
    with pytest.raises(distributed.DistributedSetupError, match="MASTER_ADDR"):
        distributed.setup("cpu", 4)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(distributed.DistributedSetupError, match="RANK=2, WORLD_SIZE=2"):
        distributed.setup("cpu", 4)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(distributed.DistributedSetupError, match="RANK='x'"):
        distributed.setup("cpu", 4)


def test_close_waits_for_every_process_before_tearing_down(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda *a, **k: calls.append("destroy"))
    distributed.DistContext(rank=1, world_size=2, backend="gloo").close()
    assert calls == ["barrier", "destroy"]
    calls.clear()
    distributed.DistContext().close()  # a single process has no group to close
    assert calls == []


def test_cli_refuses_sync_bn_on_cpu_and_an_indivisible_batch(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        T.main(ARGS + ["--out", str(tmp_path / "a"), "--sync-bn"])
    assert "SyncBatchNorm does not run on CPU tensors" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        T.main(ARGS + ["--out", str(tmp_path / "b"), "--batch-size", "7"])
    assert "--batch-size 7 must be divisible by the number of processes (WORLD_SIZE=2)" in capsys.readouterr().err


def test_sync_batchnorm_conversion_spares_the_sprite_decoder():
    model = LAVAE(channels=3, canvas=(8, 8), sprite_size=3, width=4, sprite_width=36)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    distributed.convert_sync_batchnorm(model)
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds and all((k is nn.BatchNorm2d) == name.startswith("sprite_decoder") for name, k in kinds.items())
    assert any(k is nn.SyncBatchNorm for k in kinds.values())
    assert list(model.state_dict()) == keys  # checkpoints stay interchangeable
    assert all(p is params[n] for n, p in model.named_parameters())  # the optimiser's references hold
    aux = distributed.convert_sync_batchnorm(AuxVAE(3))
    assert not any(type(m) is nn.BatchNorm2d for m in aux.modules())


# ---------------------------------------------------------------------------------------------
# Two processes, gloo, against the half-batch reference
# ---------------------------------------------------------------------------------------------


def _reference(saved_args: dict, world: int):
    """Single process: every step, each rank's share of the batch gets its own loss and backward,
    the gradients are averaged (None where no share used a parameter), one optimiser step. Batch
    norm's running statistics follow rank 0's share (DDP broadcasts rank 0's buffers before every
    forward, so rank 0's own never see the other shares)."""
    args = argparse.Namespace(**saved_args)
    channels = DATASETS[args.dataset].channels
    torch.manual_seed(args.seed)
    model = build_model(T.model_config(args, channels))
    aux = AuxVAE(channels)
    # The run's speed settings (channels-last, fused norm: the same math, other rounding), so that
    # the comparison below can stay at float32 round-off.
    T.accelerate(model, args)
    T.accelerate(aux, args)
    recipe = Recipe.from_args(model, args, aux=aux)
    opt = recipe.optimizer()
    data = load_run_split(vars(args), "train")
    params = [p for g in opt.param_groups for p in g["params"]]
    buffers = lambda: [b.clone() for b in list(model.buffers()) + list(aux.buffers())]  # noqa: E731

    def set_buffers(values):
        for b, v in zip(list(model.buffers()) + list(aux.buffers()), values):
            b.copy_(v)

    unused, losses = [], []  # losses[step][rank]: the loss each share logs
    model.train(), aux.train()
    for step in range(args.steps):
        recipe.step(opt, step)
        idx = data_indices(args.seed, step, args.batch_size, len(data))
        start, rank0_after = buffers(), None
        grads = []
        losses.append([])
        for rank in range(world):
            lo, hi = distributed.DistContext(rank=rank, world_size=world).shard(args.batch_size)
            set_buffers(start)
            x, counts = data.get_batch(idx[lo:hi].numpy())
            ids = torch.arange(step * args.batch_size + lo, step * args.batch_size + hi)
            opt.zero_grad(set_to_none=True)
            loss, out, log = recipe.forward(x, step, ids, counts)
            losses[-1].append(log["loss"])
            loss.backward()
            grads.append([None if p.grad is None else p.grad.clone() for p in params])
            unused.append(all(p.grad is None for p in model.sprite_decoder.parameters()))
            if rank == 0:
                rank0_after = buffers()
        set_buffers(rank0_after)
        for i, p in enumerate(params):
            gs = [g[i] for g in grads]
            p.grad = None if all(g is None for g in gs) else sum(
                torch.zeros_like(p) if g is None else g for g in gs) / world
        opt.step()
    return model, aux, unused, losses


def test_two_gloo_processes_equal_the_averaged_half_batch_gradients(tmp_path):
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(runner), str(tmp_path)] + ARGS + ["--out", str(run)]
    # Two sessions: stopped after step 3, then resumed (rank 0 reads the checkpoint, rank 1 gets it
    # by broadcast) to the end.
    for extra in (["--stop-at", "3"], ["--resume"]):
        proc = subprocess.run(cmd + extra, cwd=str(tmp_path), env=_env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "resumed from" in proc.stderr and "at step 3" in proc.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    ckpt = load_checkpoint(str(run))
    assert ckpt["step"] == 5 and ckpt["args"]["batch_size"] == 8

    # the same parameters on both ranks, and rank 0's are the checkpoint's
    for name in ("model", "aux"):
        for k, v in ranks[0][name].items():
            assert torch.equal(v, ckpt[name][k]), (name, k)
    # (parameters only: batch norm's running statistics are per process)
    for name, fresh in (("model", build_model(ckpt["model_config"])), ("aux", AuxVAE(3))):
        for k, _ in fresh.named_parameters():
            assert torch.equal(ranks[0][name][k], ranks[1][name][k]), (name, k)

    # = one process averaging the two half-batch gradients
    torch.set_num_threads(1)
    model, aux, unused, losses = _reference(ckpt["args"], WORLD)
    pairs = [tuple(unused[i:i + WORLD]) for i in range(0, len(unused), WORLD)]
    assert (False, True) in pairs and (True, True) in pairs, pairs  # both cases are covered
    worst = 0.0
    for name, module in (("model", model), ("aux", aux)):
        for k, v in module.state_dict().items():
            got = ckpt[name][k]
            if v.is_floating_point():
                worst = max(worst, (got - v).abs().max().item())
                torch.testing.assert_close(got, v, rtol=1e-5, atol=1e-6, msg=f"{name}.{k}")
            else:
                assert torch.equal(got, v), (name, k)
    print(f"max |DDP − reference| over parameters and buffers: {worst:.3g}")
    # the comparison can fail: the reference moved away from the initial parameters
    torch.manual_seed(ckpt["args"]["seed"])
    init = build_model(ckpt["model_config"]).state_dict()
    assert any(not torch.equal(init[k], model.state_dict()[k]) for k in init if init[k].is_floating_point())
    # the log is rank 0's, with metrics averaged over both processes; each line averages the steps
    # since the previous line of its session: [0, 1], [2] (end of session 1), [3] (resumed), [4]
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 3, 4, 5]
    for r, steps in zip(rows, ([0, 1], [2], [3], [4])):
        want = sum(sum(losses[s]) / WORLD for s in steps) / len(steps)
        assert r["loss"] == pytest.approx(want, rel=1e-5), (r["step"], r["loss"], want)
        assert r["loss"] != pytest.approx(losses[steps[0]][0], rel=1e-5)  # not rank 0's share alone
