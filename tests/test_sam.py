"""SAM / ASAM against hand-computed steps, skip semantics, state_dict, optimizer factory, schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from uumamba.config import OptimConfig, load_config
from uumamba.errors import ConfigError
from uumamba.losses import UncertaintyWeightedLoss
from uumamba.optim import SAM, PolyLRScheduler, build_optimizer

# Separable quadratic f(w) = sum(0.5 a_i w_i^2 - b_i w_i), gradient a_i w_i - b_i.
A = [1.0, 4.0, 0.5]
B = [0.5, 1.0, -1.0]
W0 = [1.0, -2.0, 0.5]


def _quadratic(w: torch.Tensor) -> torch.Tensor:
    a = torch.tensor(A, dtype=w.dtype)
    b = torch.tensor(B, dtype=w.dtype)
    return (0.5 * a * w**2 - b * w).sum()


def _grad(w: list[float]) -> list[float]:
    return [a * x - b for a, x, b in zip(A, w, B, strict=True)]


def _sam_e(g: list[float], rho: float) -> list[float]:
    norm = math.sqrt(sum(x * x for x in g))
    return [rho * x / norm for x in g]


def _run_sam_on_quadratic(opt: SAM, w: torch.Tensor) -> list[float]:
    """One SAM step; returns the perturbed weights seen by the second pass."""
    _quadratic(w).backward()
    opt.first_step(zero_grad=True)
    perturbed = w.detach().tolist()
    _quadratic(w).backward()
    opt.second_step(zero_grad=True)
    return perturbed


def test_sam_matches_hand_computed_step_on_quadratic():
    rho, lr = 0.1, 0.1
    w = torch.tensor(W0, dtype=torch.float64, requires_grad=True)
    opt = SAM([w], torch.optim.SGD, rho=rho, lr=lr)
    perturbed = _run_sam_on_quadratic(opt, w)
    e = _sam_e(_grad(W0), rho)
    w_adv = [x + d for x, d in zip(W0, e, strict=True)]
    assert perturbed == pytest.approx(w_adv, rel=1e-12)
    expected = [x - lr * g for x, g in zip(W0, _grad(w_adv), strict=True)]
    assert w.detach().tolist() == pytest.approx(expected, rel=1e-12)


def test_sam_with_nesterov_momentum_matches_hand_computation_over_two_steps():
    rho, lr, mu = 0.05, 0.01, 0.99
    w = torch.tensor(W0, dtype=torch.float64, requires_grad=True)
    opt = SAM([w], torch.optim.SGD, rho=rho, lr=lr, momentum=mu, nesterov=True)
    ref = list(W0)
    buf = None
    for _ in range(2):
        _run_sam_on_quadratic(opt, w)
        e = _sam_e(_grad(ref), rho)
        g = _grad([x + d for x, d in zip(ref, e, strict=True)])
        buf = g if buf is None else [mu * m + x for m, x in zip(buf, g, strict=True)]
        update = [x + mu * m for x, m in zip(g, buf, strict=True)]
        ref = [x - lr * u for x, u in zip(ref, update, strict=True)]
    assert w.detach().tolist() == pytest.approx(ref, rel=1e-12)


def test_asam_scales_weights_not_biases_by_hand():
    rho, lr, eta = 0.5, 0.1, 0.01
    weight = torch.tensor([[0.8, -0.1], [0.0, 2.0]], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([0.3, -0.4], dtype=torch.float64, requires_grad=True)
    coef_w = [[1.0, 2.0], [3.0, 0.5]]
    shift_w = [[0.1, -0.2], [0.3, 0.0]]
    coef_b = [2.0, 1.0]

    def f():
        cw = torch.tensor(coef_w, dtype=torch.float64)
        sw = torch.tensor(shift_w, dtype=torch.float64)
        cb = torch.tensor(coef_b, dtype=torch.float64)
        return (0.5 * cw * weight**2 + sw * weight).sum() + (0.5 * cb * bias**2).sum()

    w0 = weight.detach().tolist()
    b0 = bias.detach().tolist()

    def grads(w, b):
        gw = [[coef_w[i][j] * w[i][j] + shift_w[i][j] for j in range(2)] for i in range(2)]
        gb = [coef_b[k] * b[k] for k in range(2)]
        return gw, gb

    opt = SAM([weight, bias], torch.optim.SGD, rho=rho, adaptive=True, lr=lr)
    assert opt.param_groups[0]["eta"] == eta
    f().backward()
    opt.first_step(zero_grad=True)
    gw, gb = grads(w0, b0)
    t = [[abs(w0[i][j]) + eta for j in range(2)] for i in range(2)]  # T_w = |w| + eta; bias: 1
    norm = math.sqrt(
        sum((t[i][j] * gw[i][j]) ** 2 for i in range(2) for j in range(2)) + sum(g * g for g in gb)
    )
    w_adv = [[w0[i][j] + rho * t[i][j] ** 2 * gw[i][j] / norm for j in range(2)] for i in range(2)]
    b_adv = [b0[k] + rho * gb[k] / norm for k in range(2)]
    assert weight.detach().tolist()[0] == pytest.approx(w_adv[0], rel=1e-12)
    assert weight.detach().tolist()[1] == pytest.approx(w_adv[1], rel=1e-12)
    assert bias.detach().tolist() == pytest.approx(b_adv, rel=1e-12)
    f().backward()
    opt.second_step(zero_grad=True)
    gw2, gb2 = grads(w_adv, b_adv)
    for i in range(2):
        expected = [w0[i][j] - lr * gw2[i][j] for j in range(2)]
        assert weight.detach().tolist()[i] == pytest.approx(expected, rel=1e-12)
    assert bias.detach().tolist() == pytest.approx(
        [b0[k] - lr * gb2[k] for k in range(2)], rel=1e-12
    )


def _tiny_problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.randn(16, 5)
    y = torch.randint(0, 3, (16,))
    return model, x, y


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize(
    ("base", "kwargs"),
    [
        (torch.optim.SGD, dict(lr=0.05, momentum=0.99, nesterov=True, weight_decay=3e-5)),
        (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.01)),
    ],
)
def test_rho_zero_reproduces_base_optimizer_exactly(base, kwargs):
    model, x, y = _tiny_problem()
    model_ref = copy.deepcopy(model)
    sam = SAM(model.parameters(), base, rho=0.0, **kwargs)
    ref = base(model_ref.parameters(), **kwargs)
    for _ in range(4):
        _loss(model, x, y).backward()
        assert sam.first_step(zero_grad=True)
        _loss(model, x, y).backward()
        assert sam.second_step(zero_grad=True)
        ref.zero_grad()
        _loss(model_ref, x, y).backward()
        ref.step()
    for p, q in zip(model.parameters(), model_ref.parameters(), strict=True):
        assert torch.equal(p, q)
    # and a positive rho does change the trajectory
    sam.param_groups[0]["rho"] = 0.05
    _loss(model, x, y).backward()
    sam.first_step(zero_grad=True)
    _loss(model, x, y).backward()
    sam.second_step(zero_grad=True)
    ref.zero_grad()
    _loss(model_ref, x, y).backward()
    ref.step()
    assert not torch.equal(model[0].weight, model_ref[0].weight)


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_identical(model, snapshot):
    for p, s in zip(model.parameters(), snapshot, strict=True):
        assert torch.equal(p, s)


def test_nonfinite_first_pass_skips_whole_step():
    model, x, y = _tiny_problem()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    before = _snapshot(model)
    _loss(model, x, y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    assert opt.first_step(zero_grad=True) is False
    _assert_identical(model, before)  # no perturbation applied
    _loss(model, x, y).backward()  # finite second pass
    assert opt.second_step(zero_grad=True) is False
    _assert_identical(model, before)
    assert len(opt.base_optimizer.state) == 0  # no momentum buffer was created


def test_nonfinite_second_pass_restores_weights_bit_identically():
    model, x, y = _tiny_problem()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    before = _snapshot(model)
    _loss(model, x, y).backward()
    assert opt.first_step(zero_grad=True)
    assert not torch.equal(model[0].weight, before[0])  # perturbed
    _loss(model, x, y).backward()
    model[2].bias.grad[1] = float("inf")
    assert opt.second_step(zero_grad=True) is False
    _assert_identical(model, before)
    assert len(opt.base_optimizer.state) == 0
    # the next step works normally
    _loss(model, x, y).backward()
    assert opt.first_step(zero_grad=True)
    _loss(model, x, y).backward()
    assert opt.second_step(zero_grad=True)
    assert not torch.equal(model[0].weight, before[0])


def test_parameters_without_gradient_are_skipped():
    model, x, y = _tiny_problem()
    unused = torch.nn.Parameter(torch.ones(4))
    opt = SAM(
        [*model.parameters(), unused], torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.1
    )
    _loss(model, x, y).backward()
    opt.first_step(zero_grad=True)
    assert unused not in opt.state
    _loss(model, x, y).backward()
    opt.second_step(zero_grad=True)
    assert torch.equal(unused, torch.ones(4))
    assert unused not in opt.base_optimizer.state


def test_closure_step_equals_explicit_steps():
    model, x, y = _tiny_problem()
    model_b = copy.deepcopy(model)
    opt_a = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    opt_b = SAM(model_b.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    for _ in range(2):
        _loss(model, x, y).backward()
        opt_a.first_step(zero_grad=True)
        _loss(model, x, y).backward()
        opt_a.second_step(zero_grad=True)

        opt_b.zero_grad()
        _loss(model_b, x, y).backward()

        def closure():
            loss = _loss(model_b, x, y)
            loss.backward()
            return loss

        assert torch.isfinite(opt_b.step(closure))
    for p, q in zip(model.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="closure"):
        opt_b.step()


def test_state_dict_carries_base_state_and_keeps_groups_shared():
    model, x, y = _tiny_problem()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.07, lr=0.1, momentum=0.9, nesterov=True)
    _loss(model, x, y).backward()
    opt.first_step(zero_grad=True)
    _loss(model, x, y).backward()
    opt.second_step(zero_grad=True)
    sd = copy.deepcopy(opt.state_dict())
    buffers = sd["base_optimizer"]["state"]
    assert len(buffers) == 4 and all("momentum_buffer" in s for s in buffers.values())
    sd["base_optimizer"]["param_groups"][0]["lr"] = 0.0123

    fresh = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True)
    fresh.load_state_dict(sd)
    assert fresh.param_groups is fresh.base_optimizer.param_groups
    assert fresh.param_groups[0]["rho"] == 0.07 and fresh.param_groups[0]["lr"] == 0.0123
    for p in model.parameters():
        assert torch.equal(
            fresh.base_optimizer.state[p]["momentum_buffer"],
            opt.base_optimizer.state[p]["momentum_buffer"],
        )
    fresh.param_groups[0]["lr"] = 0.5  # a scheduler writing through SAM reaches the base
    assert fresh.base_optimizer.param_groups[0]["lr"] == 0.5
    with pytest.raises(ValueError, match="not a SAM state dict"):
        fresh.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


def test_add_param_group_is_shared_with_base():
    model, _, _ = _tiny_problem()
    extra = torch.nn.Parameter(torch.zeros(2))
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    opt.add_param_group({"params": [extra], "weight_decay": 0.0})
    assert len(opt.base_optimizer.param_groups) == 2
    assert opt.param_groups[1]["rho"] == 0.05 and opt.param_groups[1]["momentum"] == 0.9


def test_argument_validation():
    model, x, y = _tiny_problem()
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="rho"):
        SAM(model.parameters(), torch.optim.SGD, rho=-0.1, lr=0.1)
    assert (
        SAM(model.parameters(), torch.optim.SGD, adaptive=True, lr=0.1).param_groups[0]["rho"]
        == 0.5
    )
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    _loss(model, x, y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.first_step()


def test_build_optimizer_variants_and_sigma_group():
    model, _, _ = _tiny_problem()
    loss = UncertaintyWeightedLoss(3)
    opt = build_optimizer(OptimConfig(name="sam", lr=0.02, weight_decay=3e-5), model, loss)
    assert isinstance(opt, SAM) and isinstance(opt.base_optimizer, torch.optim.SGD)
    model_group, sigma_group = opt.param_groups
    assert sigma_group["params"] == [loss.log_sigma_sq]
    assert sigma_group["weight_decay"] == 0.0 and model_group["weight_decay"] == 3e-5
    assert sigma_group["lr"] == model_group["lr"] == 0.02
    assert model_group["momentum"] == 0.99 and model_group["nesterov"] is True
    assert model_group["rho"] == 0.05 and model_group["adaptive"] is False

    asam = build_optimizer(OptimConfig(name="asam", base="adamw"), model, loss)
    assert isinstance(asam.base_optimizer, torch.optim.AdamW)
    assert asam.param_groups[0]["rho"] == 0.5 and asam.param_groups[0]["adaptive"] is True
    assert (
        build_optimizer(OptimConfig(name="sam", rho=0.2), model, loss).param_groups[0]["rho"] == 0.2
    )

    sgd = build_optimizer(OptimConfig(name="sgd"), model, loss)
    assert type(sgd) is torch.optim.SGD and len(sgd.param_groups) == 2
    adamw = build_optimizer(
        OptimConfig(name="adamw"), model, UncertaintyWeightedLoss(3, name="fixed")
    )
    assert type(adamw) is torch.optim.AdamW and len(adamw.param_groups) == 1
    with pytest.raises(ConfigError, match="optim.rho"):  # the schema refuses it first
        load_config(None, ["optim.rho=-1.0"])
    unchecked = OptimConfig.model_construct(**{**OptimConfig().model_dump(), "rho": -1.0})
    with pytest.raises(ConfigError, match="optim.rho"):  # and so does the builder
        build_optimizer(unchecked, model, loss)
    with pytest.raises(ConfigError, match="momentum"):
        build_optimizer(OptimConfig(name="sgd", momentum=0.0, nesterov=True), model, loss)


def test_poly_schedule_values_warmup_and_resume():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.01)
    sched = PolyLRScheduler(opt, total_iters=10, exponent=0.9)
    lrs = [sched.get_last_lr()[0]]
    for _ in range(11):
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs[:10] == pytest.approx([0.01 * (1 - t / 10) ** 0.9 for t in range(10)])
    assert lrs[10] == 0.0 and lrs[11] == 0.0

    opt = torch.optim.SGD([p], lr=0.01)
    sched = PolyLRScheduler(opt, total_iters=10, exponent=0.9, warmup_iters=4)
    lrs = [sched.get_last_lr()[0]]
    for _ in range(5):
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    expected = [0.01 * (t + 1) / 4 for t in range(4)] + [0.01, 0.01 * (1 - 1 / 6) ** 0.9]
    assert lrs == pytest.approx(expected)

    state = sched.state_dict()
    opt2 = torch.optim.SGD([p], lr=0.01)
    resumed = PolyLRScheduler(opt2, total_iters=10, exponent=0.9, warmup_iters=4)
    resumed.load_state_dict(state)
    assert resumed.get_last_lr() == sched.get_last_lr()
    sched.step()
    resumed.step()
    assert resumed.get_last_lr() == sched.get_last_lr()
    with pytest.raises(ValueError, match="warmup_iters"):
        PolyLRScheduler(opt, total_iters=10, warmup_iters=10)
