"""training_step: plain and SAM updates, clipping, BatchNorm freezing, AMP skip, resume, DDP,
and learned sigma on real ACDC patches."""

from __future__ import annotations

import copy
import math
import os
from datetime import timedelta
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from uumamba.config import LossConfig, OptimConfig
from uumamba.engine.step import StepResult, frozen_batchnorm_stats, training_step
from uumamba.losses import build_loss
from uumamba.optim import SAM, PolyLRScheduler, build_optimizer

N_CLASSES = 3


def _net(seed: int = 0, norm: str = "batch") -> nn.Module:
    torch.manual_seed(seed)
    norm_layer = nn.BatchNorm2d(6) if norm == "batch" else nn.InstanceNorm2d(6, affine=True)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), norm_layer, nn.ReLU(), nn.Conv2d(6, N_CLASSES, 1)
    )


def _batch(step: int, size: int = 2):
    g = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(size, 1, 12, 12, generator=g)
    targets = (images > 0.3).long() + (images > 1.2).long()
    return images, targets


def _params(*modules):
    return [p.detach().clone() for m in modules for p in m.parameters()]


def _identical(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_plain_step_equals_manual_update():
    model = _net()
    loss_fn = build_loss(LossConfig(), N_CLASSES, None, 1)
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.05), model, loss_fn)
    model_m, loss_m = copy.deepcopy(model), copy.deepcopy(loss_fn)
    opt_m = build_optimizer(OptimConfig(name="sgd", lr=0.05), model_m, loss_m)
    x, y = _batch(0)
    result = training_step(model, loss_fn, opt, x, y, grad_clip=0.5)

    opt_m.zero_grad()
    loss = loss_m(model_m(x), y)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([*model_m.parameters(), *loss_m.parameters()], 0.5)
    opt_m.step()
    assert isinstance(result, StepResult) and result.finite and not result.skipped
    assert result.loss == pytest.approx(float(loss.detach()))
    assert result.grad_norm == pytest.approx(float(norm)) and result.grad_norm > 0.5
    assert _identical(_params(model, loss_fn), _params(model_m, loss_m))


def test_sam_step_equals_manual_two_pass_update_with_clipping():
    model = _net(norm="instance")
    loss_fn = build_loss(LossConfig(), N_CLASSES, None, 1)
    cfg = OptimConfig(name="sam", lr=0.05, rho=0.1)
    opt = build_optimizer(cfg, model, loss_fn)
    model_m, loss_m = copy.deepcopy(model), copy.deepcopy(loss_fn)
    opt_m = build_optimizer(cfg, model_m, loss_m)
    for step in range(2):
        x, y = _batch(step)
        result = training_step(model, loss_fn, opt, x, y, grad_clip=0.3)

        opt_m.zero_grad()
        first = loss_m(model_m(x), y)
        first.backward()
        opt_m.first_step(zero_grad=True)
        loss_m(model_m(x), y).backward()
        norm = torch.nn.utils.clip_grad_norm_([*model_m.parameters(), *loss_m.parameters()], 0.3)
        opt_m.second_step(zero_grad=True)
        assert result.loss == pytest.approx(float(first.detach()))
        assert result.grad_norm == pytest.approx(float(norm))
    assert _identical(_params(model, loss_fn), _params(model_m, loss_m))


def test_clipping_applies_to_second_pass_gradient():
    model = _net(norm="instance")
    loss_fn = build_loss(LossConfig(name="fixed"), N_CLASSES, None, 1)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=1.0)
    x, y = _batch(3)
    before = _params(model)
    # gradient at w + e, computed by hand
    probe = copy.deepcopy(model)
    loss_fn(probe(x), y).backward()
    grads = [p.grad for p in probe.parameters()]
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(probe.parameters(), grads, strict=True):
            p.add_(0.5 * g / norm)
    probe.zero_grad()
    loss_fn(probe(x), y).backward()
    g2 = [p.grad for p in probe.parameters()]
    norm2 = torch.sqrt(sum((g**2).sum() for g in g2))

    clip = 1e-3
    result = training_step(model, loss_fn, opt, x, y, grad_clip=clip)
    assert result.grad_norm == pytest.approx(float(norm2), rel=1e-5)
    for p, w0, g in zip(model.parameters(), before, g2, strict=True):
        torch.testing.assert_close(p.detach(), w0 - clip * g / norm2, rtol=0, atol=1e-7)


def test_batchnorm_running_stats_not_updated_by_second_pass():
    model = _net(norm="batch")
    reference = copy.deepcopy(model)
    loss_fn = build_loss(LossConfig(), N_CLASSES, None, 1)
    opt = build_optimizer(OptimConfig(name="sam", lr=0.05, rho=0.5), model, loss_fn)
    x, y = _batch(0, size=4)
    reference(x)  # one train-mode forward at the unperturbed weights
    training_step(model, loss_fn, opt, x, y)
    bn, bn_ref = model[1], reference[1]
    assert int(bn.num_batches_tracked) == 1
    assert torch.equal(bn.running_mean, bn_ref.running_mean)
    assert torch.equal(bn.running_var, bn_ref.running_var)
    # Without the freeze, a forward at other weights does move them.
    with frozen_batchnorm_stats(model):
        model(x * 3.0)
    assert torch.equal(bn.running_mean, bn_ref.running_mean)
    model(x * 3.0)
    assert not torch.equal(bn.running_mean, bn_ref.running_mean)


@pytest.mark.parametrize("name", ["sam", "sgd", "looksam", "rst", "ema_kl"])
def test_nonfinite_loss_skips_step(name):
    model = _net()
    loss_fn = build_loss(LossConfig(), N_CLASSES, None, 1)
    opt = build_optimizer(OptimConfig(name=name), model, loss_fn)
    x, y = _batch(0)
    x[0, 0, 3, 3] = float("nan")
    before = _params(model, loss_fn)
    result = training_step(model, loss_fn, opt, x, y)
    assert result.skipped and not result.finite and math.isnan(result.loss)
    assert _identical(before, _params(model, loss_fn))
    state = opt.base_optimizer.state if hasattr(opt, "base_optimizer") else opt.state
    assert len(state) == 0
    assert all(p.grad is None for p in model.parameters())


class _GradOverflow(torch.autograd.Function):
    """Identity forward; backward returns inf gradients (an fp16 overflow stand-in)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class _OverflowOnCall(nn.Module):
    """Wraps a model; the backward of forward call number ``bad_call`` (1-based) overflows."""

    def __init__(self, model: nn.Module, bad_call: int) -> None:
        super().__init__()
        self.model = model
        self.bad_call = bad_call
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = self.model(x)
        return _GradOverflow.apply(out) if self.calls == self.bad_call else out


@pytest.mark.parametrize("bad_call", [1, 2])
def test_gradscaler_overflow_in_either_pass_skips_and_backs_off(bad_call):
    model = _OverflowOnCall(_net(), bad_call)
    loss_fn = build_loss(LossConfig(), N_CLASSES, None, 1)
    opt = build_optimizer(OptimConfig(name="sam"), model, loss_fn)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = _batch(0)
    before = _params(model, loss_fn)
    buffers = [b.clone() for b in model.buffers()]
    result = training_step(model, loss_fn, opt, x, y, scaler=scaler)
    assert result.skipped and not result.finite and math.isfinite(result.loss)
    assert _identical(before, _params(model, loss_fn))
    assert len(opt.base_optimizer.state) == 0
    assert scaler.get_scale() == 2.0**9
    # BatchNorm stats: updated by the real first pass only
    assert int(model.model[1].num_batches_tracked) == 1
    assert not torch.equal(buffers[0], model.model[1].running_mean)
    # the next step goes through and keeps the (backed-off) scale
    result = training_step(model, loss_fn, opt, x, y, scaler=scaler)
    assert result.finite and not result.skipped and scaler.get_scale() == 2.0**9
    assert not _identical(before, _params(model, loss_fn))


def test_gradscaler_step_matches_unscaled_step():
    model, loss_fn = _net(), build_loss(LossConfig(), N_CLASSES, None, 1)
    opt = build_optimizer(OptimConfig(name="sam", rho=0.2), model, loss_fn)
    model_r, loss_r = copy.deepcopy(model), copy.deepcopy(loss_fn)
    opt_r = build_optimizer(OptimConfig(name="sam", rho=0.2), model_r, loss_r)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for step in range(2):
        x, y = _batch(step)
        a = training_step(model, loss_fn, opt, x, y, scaler=scaler)
        b = training_step(model_r, loss_r, opt_r, x, y)
        assert a.finite and b.finite and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    for p, q in zip(_params(model, loss_fn), _params(model_r, loss_r), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert scaler.get_scale() == 2.0**12


def test_bf16_autocast_step_runs_and_loss_is_float32():
    model, loss_fn = _net(norm="instance"), build_loss(LossConfig(), N_CLASSES, None, 1)
    opt = build_optimizer(OptimConfig(name="asam"), model, loss_fn)
    x, y = _batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss_fn(model(x), y).dtype == torch.float32
    before = _params(model)
    result = training_step(model, loss_fn, opt, x, y, autocast_dtype=torch.bfloat16)
    assert result.finite and not result.skipped
    assert not _identical(before, _params(model))


def _setup(optim_name: str, base: str, total: int, seed: int):
    model = _net(seed=seed)
    loss_fn = build_loss(LossConfig(), N_CLASSES, None, 1)
    variant = dict(looksam_k=2, sam_probability=0.5, kl_start=1)  # each kind of step in 6
    opt = build_optimizer(OptimConfig(name=optim_name, base=base, lr=0.02, **variant), model,
                          loss_fn)
    sched = PolyLRScheduler(opt, total_iters=total, warmup_iters=1)
    return model, loss_fn, opt, sched


def _train(model, loss_fn, opt, sched, steps):
    for step in steps:
        x, y = _batch(step)
        assert not training_step(model, loss_fn, opt, x, y).skipped
        sched.step()


@pytest.mark.parametrize(("optim_name", "base"), [
    ("sam", "sgd"), ("asam", "adamw"), ("looksam", "adamw"), ("rst", "sgd"), ("ema_kl", "adamw"),
])
def test_resume_from_state_dicts_is_bit_identical(tmp_path: Path, optim_name, base):
    n = 3
    run_a = _setup(optim_name, base, 2 * n, seed=0)
    _train(*run_a, range(2 * n))

    model, loss_fn, opt, sched = _setup(optim_name, base, 2 * n, seed=0)
    _train(model, loss_fn, opt, sched, range(n))
    ckpt = tmp_path / "ckpt.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "loss": loss_fn.state_dict(),
        },
        ckpt,
    )
    saved = torch.load(ckpt, weights_only=False)
    resumed = _setup(optim_name, base, 2 * n, seed=7)  # fresh objects, other init
    resumed[0].load_state_dict(saved["model"])
    resumed[1].load_state_dict(saved["loss"])
    resumed[2].load_state_dict(saved["optimizer"])
    resumed[3].load_state_dict(saved["scheduler"])
    _train(*resumed, range(n, 2 * n))

    state_a = {**run_a[0].state_dict(), **run_a[1].state_dict()}
    state_b = {**resumed[0].state_dict(), **resumed[1].state_dict()}
    assert state_a.keys() == state_b.keys() and "loss.log_sigma_sq" in state_a
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key

    # Control: without the optimizer state (momentum / Adam moments) the runs diverge.
    control = _setup(optim_name, base, 2 * n, seed=7)
    control[0].load_state_dict(saved["model"])
    control[1].load_state_dict(saved["loss"])
    control[3].load_state_dict(saved["scheduler"])
    _train(*control, range(n, 2 * n))
    assert not torch.equal(control[0][0].weight, run_a[0][0].weight)


# --- real data: sigma moves ---------------------------------------------------------------


def _acdc_patches(acdc_dir: Path, n_patients: int = 2, size: int = 128):
    images, labels = [], []
    for patient in sorted(acdc_dir.glob("patient*"))[:n_patients]:
        img = nib.load(next(patient.glob("*_frame01.nii.gz"))).get_fdata(dtype=np.float32)
        gt = np.asarray(nib.load(next(patient.glob("*_frame01_gt.nii.gz"))).dataobj).astype(
            np.int64
        )
        counts = (gt > 0).sum(axis=(0, 1))
        for z in np.argsort(counts)[::-1][:2]:  # the two slices with most foreground
            cx, cy = (int(round(c)) for c in np.argwhere(gt[:, :, z] > 0).mean(axis=0))
            pad = size // 2
            sl_img = np.pad(img[:, :, z], pad, mode="constant")
            sl_gt = np.pad(gt[:, :, z], pad, mode="constant")
            crop = (slice(cx, cx + size), slice(cy, cy + size))  # centred after padding
            patch = sl_img[crop]
            images.append((patch - patch.mean()) / (patch.std() + 1e-6))
            labels.append(sl_gt[crop])
    x = torch.from_numpy(np.stack(images)[:, None]).float()
    y = torch.from_numpy(np.stack(labels)[:, None])
    return x, y


def test_sigma_moves_on_real_acdc_patches(acdc_dir):
    x, y = _acdc_patches(acdc_dir)
    assert x.shape == (4, 1, 128, 128) and set(torch.unique(y).tolist()) == {0, 1, 2, 3}
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    )
    loss_fn = build_loss(LossConfig(), 4, None, 1)
    opt = build_optimizer(OptimConfig(name="sam", lr=0.01), model, loss_fn)
    start = loss_fn.sigmas()
    results = [training_step(model, loss_fn, opt, x, y) for _ in range(5)]
    end = loss_fn.sigmas()
    assert all(r.finite and not r.skipped for r in results)
    assert results[-1].loss < results[0].loss
    assert start == {"dice": 1.0, "ce": 1.0, "focal": 1.0}
    for key in start:
        assert abs(end[key] - 1.0) > 1e-4, (key, end)
    # Cross-entropy (largest term early on) pulls its sigma up, as the optimum formula says.
    assert end["ce"] > 1.0


# --- distributed: two CPU ranks (gloo) stay identical --------------------------------------


def _ddp_worker(rank: int, world: int, out_dir: str, optim_name: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # rendezvous through a file, not a port picked ahead (another process may take it before
    # rank 0 binds it); gloo's own pairs then bind ephemeral ports on loopback
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank,
                            world_size=world, timeout=timedelta(seconds=300))
    try:
        model = nn.parallel.DistributedDataParallel(_net(seed=0))
        loss_fn = build_loss(LossConfig(), N_CLASSES, None, 1)
        torch.manual_seed(100 + rank)  # RST's own draws differ per rank: rank 0's must rule
        cfg = OptimConfig(name=optim_name, lr=0.05, rho=0.2, looksam_k=2, kl_start=1)
        opt = build_optimizer(cfg, model, loss_fn)
        for step in range(4):
            x, y = _batch(10 * step + rank)  # different data on each rank
            result = training_step(model, loss_fn, opt, x, y)
            assert result.finite
        torch.save(
            {"params": _params(model, loss_fn), "sigmas": loss_fn.sigmas()},
            f"{out_dir}/rank{rank}.pt",
        )
        dist.barrier()  # neither rank tears its gloo pair down while the other still uses it
    finally:
        dist.destroy_process_group()
    # The results are saved. Skip the interpreter's teardown: about 1 child in 30 aborted in it
    # ("terminate called without an active exception", SIGABRT, no Python frame; torch 2.13,
    # 2026-12-06), after its work had returned, and mp.spawn failed the test for it.
    os._exit(0)


@pytest.mark.parametrize("optim_name", ["sam", "looksam", "rst", "ema_kl"])
def test_ddp_ranks_stay_identical(tmp_path: Path, optim_name: str):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed not available in this build")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path), optim_name), nprocs=2,
             join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert _identical(r0["params"], r1["params"])
    assert r0["sigmas"] == r1["sigmas"] and r0["sigmas"]["ce"] != 1.0
    assert not _identical(
        r0["params"], _params(_net(seed=0), build_loss(LossConfig(), N_CLASSES, None, 1))
    )
