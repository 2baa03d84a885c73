"""LookSAM, RST (RandomSAM) and EMA-KL through training_step, against updates computed by hand
on small problems, plus their state dicts, skip rules and the optimizer factory."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from uumamba.config import OptimConfig, load_config
from uumamba.engine.step import training_step
from uumamba.errors import ConfigError
from uumamba.optim import EMAKL, SAM, LookSAM, RandomSAM, build_optimizer

# Quadratic f(w) = 0.5 w^T A w + b^T w on one (2, 2) weight: gradient A w + b (w flattened).
A = torch.tensor([[3.0, 0.5, 0.0, 0.2], [0.5, 1.0, 0.1, 0.0],
                  [0.0, 0.1, 2.0, 0.3], [0.2, 0.0, 0.3, 0.5]], dtype=torch.float64)
B = torch.tensor([0.5, -1.0, 0.25, 2.0], dtype=torch.float64)
W0 = torch.tensor([1.0, -2.0, 0.5, 0.3], dtype=torch.float64)


class _Weights(nn.Module):
    """Returns its (2, 2) weight whatever the input (the 'network' of the quadratic)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone().reshape(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w


class _Quadratic(nn.Module):
    def forward(self, w: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        v = w.reshape(-1)
        return 0.5 * v @ A @ v + B @ v


def _grad(w: torch.Tensor) -> torch.Tensor:
    return A @ w + B


def _sam_grad(w: torch.Tensor, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = _grad(w)
    return g, _grad(w + rho * g / g.norm())


def _step(model: nn.Module, opt: torch.optim.Optimizer):
    x = torch.zeros(1)
    return training_step(model, _Quadratic(), opt, x, x, grad_clip=None)


def _w(model: _Weights) -> torch.Tensor:
    return model.w.detach().reshape(-1).clone()


# --- LookSAM ------------------------------------------------------------------------------


def test_looksam_matches_hand_computed_updates_over_two_cycles():
    rho, lr, alpha, k = 0.1, 0.05, 0.7, 3
    model = _Weights(W0)
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=rho, k=k, alpha=alpha, lr=lr)
    w = W0.clone()
    g_v = None
    for t in range(2 * k + 1):
        assert opt.perturb_this_step() == (t % k == 0)
        _step(model, opt)
        if t % k == 0:  # SAM update; store the component of g_s orthogonal to g
            g, g_s = _sam_grad(w, rho)
            g_v = g_s - (g @ g_s) / (g @ g) * g
            assert abs(float(g_v @ g)) < 1e-12 * float(g.norm() * g_s.norm())
            assert float(g_v.norm()) > 1e-3  # a real direction, so the reuse steps test it
            w = w - lr * g_s
        else:  # plain gradient plus the stored direction at the gradient's norm
            g = _grad(w)
            w = w - lr * (g + alpha * g.norm() / g_v.norm() * g_v)
        torch.testing.assert_close(_w(model), w, rtol=1e-12, atol=1e-14)
    stored = opt.state[model.w]["g_v"].reshape(-1)
    torch.testing.assert_close(stored, g_v, rtol=1e-12, atol=1e-14)
    assert opt.updates == 2 * k + 1


def test_looksam_k1_is_sam_and_alpha0_between_is_plain():
    lr, rho = 0.05, 0.1
    m_look, m_sam = _Weights(W0), _Weights(W0)
    look = LookSAM(m_look.parameters(), torch.optim.SGD, rho=rho, k=1, lr=lr)
    sam = SAM(m_sam.parameters(), torch.optim.SGD, rho=rho, lr=lr)
    for _ in range(3):
        _step(m_look, look)
        _step(m_sam, sam)
    torch.testing.assert_close(_w(m_look), _w(m_sam), rtol=1e-13, atol=1e-15)

    m_look, m_sgd = _Weights(W0), _Weights(W0)
    look = LookSAM(m_look.parameters(), torch.optim.SGD, rho=0.0, k=10, alpha=0.0, lr=lr)
    sgd = torch.optim.SGD(m_sgd.parameters(), lr=lr)
    for _ in range(4):
        _step(m_look, look)
        _step(m_sgd, sgd)
    torch.testing.assert_close(_w(m_look), _w(m_sgd), rtol=1e-13, atol=1e-15)


def test_looksam_skipped_sam_update_does_not_advance_or_store():
    model = _Weights(W0)
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, k=5, lr=0.05)

    class _NaN(_Quadratic):
        def forward(self, w, target):
            return super().forward(w, target) * float("nan")

    x = torch.zeros(1)
    before = _w(model)
    result = training_step(model, _NaN(), opt, x, x)
    assert result.skipped and opt.updates == 0
    assert "g_v" not in opt.state[model.w] and "g" not in opt.state[model.w]
    assert torch.equal(_w(model), before)
    assert opt.perturb_this_step()  # the next iteration is again a SAM iteration


# --- RST ------------------------------------------------------------------------------------


def test_rst_takes_sam_or_plain_updates_as_its_generator_draws():
    rho, lr, p, seed = 0.1, 0.05, 0.5, 123
    model = _Weights(W0)
    opt = RandomSAM(model.parameters(), torch.optim.SGD, rho=rho, probability=p, seed=seed,
                    lr=lr)
    draws = torch.Generator().manual_seed(seed)
    w = W0.clone()
    kinds = []
    for _ in range(12):
        sam = bool(torch.rand((), generator=draws) < p)
        kinds.append(sam)
        _step(model, opt)
        w = w - lr * (_sam_grad(w, rho)[1] if sam else _grad(w))
        torch.testing.assert_close(_w(model), w, rtol=1e-12, atol=1e-14)
    assert any(kinds) and not all(kinds)  # both kinds occurred, so both were checked
    assert (opt.sam_steps, opt.plain_steps) == (sum(kinds), len(kinds) - sum(kinds))


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_rst_extremes_are_the_base_optimizer_and_sam(probability):
    lr, rho = 0.05, 0.1
    m_rst, m_ref = _Weights(W0), _Weights(W0)
    rst = RandomSAM(m_rst.parameters(), torch.optim.SGD, rho=rho, probability=probability,
                    lr=lr)
    ref = (SAM(m_ref.parameters(), torch.optim.SGD, rho=rho, lr=lr) if probability
           else torch.optim.SGD(m_ref.parameters(), lr=lr))
    for _ in range(4):
        _step(m_rst, rst)
        _step(m_ref, ref)
    torch.testing.assert_close(_w(m_rst), _w(m_ref), rtol=1e-13, atol=1e-15)


# --- EMA-KL ---------------------------------------------------------------------------------


class _Linear(nn.Module):
    """Per-voxel logits W x: (B, C_in, N) -> (B, C, N)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ck,bkn->bcn", self.weight, x)


class _SquaredLogits(nn.Module):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * (logits**2).mean()


def test_ema_kl_matches_hand_computed_update_and_average():
    torch.manual_seed(0)
    n_cls, c_in, batch, n_vox = 3, 2, 2, 5
    lr, decay, lam, tau = 0.1, 0.9, 0.8, 2.0
    w0 = torch.randn(n_cls, c_in, dtype=torch.float64)
    x = torch.randn(batch, c_in, n_vox, dtype=torch.float64)
    model = _Linear(w0)
    opt = EMAKL(model.parameters(), torch.optim.SGD, decay=decay, kl_weight=lam,
                temperature=tau, start=1, lr=lr)
    count = batch * n_vox

    def task_grad(w):  # d/dW of 0.5 mean((W x)^2) over B * C * N entries
        s = torch.einsum("ck,bkn->bcn", w, x)
        return torch.einsum("bcn,bkn->ck", s, x) / (count * n_cls)

    # Update 0: the KL term is not active yet (start = 1); the EMA moves towards w1.
    assert not opt.kl_active()
    training_step(model, _SquaredLogits(), opt, x, x, grad_clip=None)
    w1 = w0 - lr * task_grad(w0)
    ema1 = decay * w0 + (1 - decay) * w1
    torch.testing.assert_close(model.weight.detach(), w1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(opt.state[model.weight]["ema"], ema1, rtol=1e-12, atol=1e-14)

    # Update 1: teacher = EMA weights on the same batch; d/ds of lam tau^2 KL(p_t || p_s) with
    # p = softmax(./tau), averaged over B * N voxels, is lam * tau * (p_s - p_t) / (B N).
    assert opt.kl_active()
    training_step(model, _SquaredLogits(), opt, x, x, grad_clip=None)
    s = torch.einsum("ck,bkn->bcn", w1, x)
    t = torch.einsum("ck,bkn->bcn", ema1, x)
    delta = lam * tau * (F.softmax(s / tau, 1) - F.softmax(t / tau, 1)) / count
    kl_grad = torch.einsum("bcn,bkn->ck", delta, x)
    w2 = w1 - lr * (task_grad(w1) + kl_grad)
    torch.testing.assert_close(model.weight.detach(), w2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(opt.state[model.weight]["ema"], decay * ema1 + (1 - decay) * w2,
                               rtol=1e-12, atol=1e-14)
    assert kl_grad.abs().max() > 1e-4  # the KL term did contribute


def test_ema_kl_reported_loss_is_the_task_loss_and_weights_restore_bit_identically():
    torch.manual_seed(1)
    model = _Linear(torch.randn(3, 2))
    opt = EMAKL(model.parameters(), torch.optim.SGD, start=0, lr=0.1)
    opt.state[model.weight]["ema"].add_(1.0)
    x = torch.randn(2, 2, 4)
    before = model.weight.detach().clone()
    with torch.no_grad(), opt.averaged_weights():
        assert torch.equal(model.weight, before + 1.0)
    assert torch.equal(model.weight, before)
    with pytest.raises(RuntimeError), opt.averaged_weights():
        raise RuntimeError("boom")
    assert torch.equal(model.weight, before)
    with torch.no_grad():
        expected = float(_SquaredLogits()(model(x), x))
    result = training_step(model, _SquaredLogits(), opt, x, x, grad_clip=None)
    assert result.loss == pytest.approx(expected, rel=1e-6)


# --- state dicts, factory -----------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda ps: LookSAM(ps, torch.optim.AdamW, rho=0.1, k=3, lr=0.05),
    lambda ps: RandomSAM(ps, torch.optim.SGD, rho=0.1, probability=0.5, seed=3, lr=0.05,
                         momentum=0.9),
    lambda ps: EMAKL(ps, torch.optim.AdamW, decay=0.5, start=1, lr=0.05),
], ids=["looksam", "rst", "ema_kl"])
def test_state_dict_resume_continues_exactly(make):
    def run(model, opt, steps):
        x = torch.randn(2, 2, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        for _ in range(steps):
            training_step(model, _SquaredLogits(), opt, x, x, grad_clip=None)

    w0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    straight = _Linear(w0)
    opt = make(straight.parameters())
    run(straight, opt, 7)

    first = _Linear(w0)
    opt_first = make(first.parameters())
    run(first, opt_first, 4)
    saved = copy.deepcopy(opt_first.state_dict())
    resumed = _Linear(first.weight.detach())
    opt_resumed = make(resumed.parameters())
    opt_resumed.load_state_dict(saved)
    run(resumed, opt_resumed, 3)
    assert torch.equal(resumed.weight, straight.weight)

    with pytest.raises(ValueError, match="not a"):
        opt_resumed.load_state_dict(torch.optim.SGD(resumed.parameters(), lr=1).state_dict())


def test_factory_names_and_settings():
    model = _Linear(torch.randn(3, 2))
    cfg = dict(base="adamw", lr=1e-3)
    look = build_optimizer(OptimConfig(name="looksam", looksam_k=4, looksam_alpha=0.5, **cfg),
                           model)
    assert isinstance(look, LookSAM) and (look.k, look.alpha) == (4, 0.5)
    assert isinstance(look.base_optimizer, torch.optim.AdamW)
    rst = build_optimizer(OptimConfig(name="rst", sam_probability=0.25, **cfg), model)
    assert isinstance(rst, RandomSAM) and rst.probability == 0.25
    ema = build_optimizer(OptimConfig(name="ema_kl", ema_decay=0.95, kl_weight=0.3,
                                      kl_temperature=2.0, kl_start=7, **cfg), model)
    assert isinstance(ema, EMAKL) and not isinstance(ema, SAM)
    assert (ema.decay, ema.kl_weight, ema.temperature, ema.start) == (0.95, 0.3, 2.0, 7)
    # plain optimizers ignore the SGD-only rules of the (unused) base
    plain = build_optimizer(OptimConfig(name="adamw", momentum=0.0, lr=1e-3), model)
    assert isinstance(plain, torch.optim.AdamW)


@pytest.mark.parametrize(("key", "value"), [
    ("optim.looksam_k", "0"), ("optim.sam_probability", "1.5"), ("optim.ema_decay", "1.0"),
    ("optim.kl_temperature", "0"), ("optim.kl_start", "-1"), ("optim.name", "lookSAM"),
])
def test_config_refuses_out_of_range_settings(key, value):
    with pytest.raises(ConfigError, match=key.split(".")[1]):
        load_config(None, [f"{key}={value}"])


def test_constructor_validation():
    ps = [nn.Parameter(torch.zeros(2))]
    for bad in (dict(k=0), dict(k=1.5), dict(alpha=-1.0)):
        with pytest.raises(ValueError):
            LookSAM(ps, torch.optim.SGD, lr=0.1, **bad)
    with pytest.raises(ValueError):
        RandomSAM(ps, torch.optim.SGD, probability=-0.1, lr=0.1)
    for bad in (dict(decay=1.0), dict(kl_weight=-1.0), dict(temperature=0.0), dict(start=-2)):
        with pytest.raises(ValueError):
            EMAKL(ps, torch.optim.SGD, lr=0.1, **bad)
    with pytest.raises(TypeError):
        EMAKL(ps, torch.optim.SGD(ps, lr=0.1), lr=0.1)
    assert math.isfinite(EMAKL(ps, torch.optim.SGD, lr=0.1).decay)


def test_looksam_plain_iteration_overflow_under_gradscaler_skips_and_backs_off():
    model = _Weights(W0.float())
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, k=5, lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    class _Overflow(_Quadratic):
        def forward(self, w, target):
            w = w.double()
            if self.bad:
                w.register_hook(lambda g: g * float("inf"))
            return super().forward(w, target)

    loss_fn, x = _Overflow(), torch.zeros(1)
    loss_fn.bad = False
    assert not training_step(model, loss_fn, opt, x, x, scaler=scaler).skipped  # SAM iteration
    before, updates = _w(model), opt.updates
    loss_fn.bad = True
    assert not opt.perturb_this_step()
    result = training_step(model, loss_fn, opt, x, x, scaler=scaler)  # plain iteration
    assert result.skipped and not result.finite
    assert torch.equal(_w(model), before) and opt.updates == updates
    assert scaler.get_scale() == 2.0**7
    loss_fn.bad = False
    assert not training_step(model, loss_fn, opt, x, x, scaler=scaler).skipped
    assert opt.updates == updates + 1 and scaler.get_scale() == 2.0**7


def test_training_log_names_the_optimizer_and_warns_of_a_kl_term_that_never_starts(caplog):
    from types import SimpleNamespace

    from uumamba.config import Config, ModelConfig
    from uumamba.engine.components import build_components

    plans = SimpleNamespace(spatial_dims=2, num_input_channels=1, num_classes=2,
                            strides=[[1, 1], [2, 2]], kernel_sizes=[[3, 3]] * 2)
    model = ModelConfig(name="unet", spatial_dims=2, features=[4, 8])
    cfg = Config(model=model, optim=OptimConfig(name="ema_kl", base="adamw", kl_start=50))
    with caplog.at_level("INFO", logger="uumamba"):
        build_components(cfg, plans, torch.device("cpu"), 20)
    text = caplog.text
    assert "optimizer: ema_kl over adamw (lr 0.01" in text and "KL term from update 50" in text
    assert "optim.kl_start = 50 but the run plans 20 iterations" in text
    caplog.clear()
    cfg = Config(model=model, optim=OptimConfig(name="looksam", base="sgd", looksam_k=3))
    with caplog.at_level("INFO", logger="uumamba"):
        build_components(cfg, plans, torch.device("cpu"), 20)
    assert "looksam over sgd (lr 0.01, weight decay 3e-05, momentum 0.99 Nesterov; rho 0.05, " \
           "k 3, alpha 0.7)" in caplog.text and "kl_start" not in caplog.text
