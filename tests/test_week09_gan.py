"""Week 9: the GAN theory on a grid (D*, V(D*, G) = -log 4 + 2 JSD, gradients vs PyTorch), the
Frechet distance on known Gaussians, the DCGAN's rules, its two alternating steps, exact resume
after Ctrl-C, and the outcome of every script's smoke run."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.checkpoint import read_checkpoint, save_checkpoint
from common.parity import assert_close, torch_reference
from tests.conftest import ROOT, offline_env, run_lab
from week09_gan import part1, part2, quality, sweep


# ------------------------------------------------------------------------------------------
# What each script's --smoke run must show (tests/test_smoke.py runs them)
# ------------------------------------------------------------------------------------------
def check_part1(summary: dict, rows: list[dict]) -> None:
    assert summary["identity_gap"] < 1e-12 and summary["perturbations_lower"], summary
    assert summary["trained_d_max_gap"] < 1e-6, summary  # gradient ascent on V finds D*
    assert abs(summary["jsd_far"] - math.log(2)) < 1e-6 and abs(summary["jsd_slope_far"]) < 1e-6
    assert {r["variant"] for r in rows} == {"plain", "minibatch std"}
    fixed = [r for r in rows if r["variant"] == "minibatch std"]
    assert all(float(r["jsd"]) < float(r["jsd_start"]) for r in fixed), rows  # G moved to the data
    # The minibatch std must make the difference. Measured (800 smoke steps, seeds 0-5): plain
    # covers 1-3 of the 5 modes, minibatch std 5 on every seed; with the std feature removed
    # (both variants plain) the two counts are equal.
    assert summary["modes_mbstd"] >= summary["modes_plain"] + 2, summary
    assert summary["modes_mbstd"] >= 4, summary


def check_part2(summary: dict, rows: list[dict]) -> None:
    assert summary["steps"] == 4 * (427 // 32) and summary["epochs_done"] == 4
    # Training moved G towards the data. Measured (seed 0): fd / fd_start 0.16; with --lr 1e-9
    # (nothing learns) 0.83, with G's optimizer step removed 0.83. (The saturating minimax G loss
    # reaches 0.37 here: test_the_generator_loss_is_the_non_saturating_one catches that one.)
    assert summary["fd"] < 0.5 * summary["fd_start"], summary
    assert summary["fd_real"] < summary["fd"], summary  # ...not all the way: the baseline is lower
    assert abs(sum(summary["class_shares"]) - 1) < 1e-3 and len(summary["class_shares"]) == 10
    assert all(0 < float(r["d_real"]) < 1 for r in rows)
    # The scorer's accuracy on 85 held-out twin images: measured 0.78; chance 0.1, the largest
    # class 0.14, a classifier trained with lr 1e-9: 0.07.
    assert summary["classifier_val_acc"] > 0.5


def check_sweep(summary: dict, rows: list[dict]) -> None:
    assert summary["runs"] == 2
    assert summary["best"] in ("lr=0.002 beta1=0.5 smoothing=0", "lr=0.002 beta1=0.5 smoothing=0.1")
    # Each setting improved on the untrained G. Measured (seed 0): fd / fd_start 0.44 and 0.51;
    # with --lrs 1e-9 (nothing learns) 0.98 for both.
    for key in ("fd_lr=0.002_beta1=0.5_smoothing=0", "fd_lr=0.002_beta1=0.5_smoothing=0.1"):
        assert summary[key] < 0.75 * summary["fd_start"], summary


SMOKE_OUTCOMES = {"part1.py": check_part1, "part2.py": check_part2, "sweep.py": check_sweep}


# ------------------------------------------------------------------------------------------
# Part 1: the optimal discriminator and the JS divergence, on a grid
# ------------------------------------------------------------------------------------------
def grid_densities(n: int = 2001):
    x, dx = part1.make_grid(-10, 10, n)
    p_data = part1.normalize(part1.mixture_pdf(x, (-2.0, 1.0, 3.0), 0.6), dx)
    p_g = part1.normalize(part1.gaussian_pdf(x, -0.5, 1.8), dx)
    p_data[:50] = 0.0  # exact zeros: points where p_data has no mass (D* = 0 there)
    p_g[-50:] = 0.0  # and where p_g has none (D* = 1)
    p_data[100:120] = 0.0
    p_g[100:120] = 0.0  # and where neither has: D* is 1/2 by convention
    return x, dx, part1.normalize(p_data, dx), part1.normalize(p_g, dx)


def test_optimal_discriminator_formula_and_the_jsd_identity():
    x, dx, p_data, p_g = grid_densities()
    d_star = part1.optimal_discriminator(p_data, p_g)
    assert np.all(d_star[:50] == 0) and np.all(d_star[-50:] == 1) and np.all(d_star[100:120] == 0.5)
    v_star = part1.value_function(d_star, p_data, p_g, dx)
    jsd = part1.js_divergence(p_data, p_g, dx)
    assert 0 < jsd < math.log(2)
    assert v_star == pytest.approx(-math.log(4) + 2 * jsd, abs=1e-12)
    # identical densities: D* = 1/2 everywhere, JSD = 0, V = -log 4
    assert part1.js_divergence(p_data, p_data, dx) == pytest.approx(0, abs=1e-15)
    half = part1.optimal_discriminator(p_data, p_data)
    assert part1.value_function(half, p_data, p_data, dx) == pytest.approx(-math.log(4), abs=1e-12)


def test_optimal_discriminator_maximizes_v_against_perturbations():
    _, dx, p_data, p_g = grid_densities()
    d_star = part1.optimal_discriminator(p_data, p_g)
    v_star = part1.value_function(d_star, p_data, p_g, dx)
    rng = np.random.default_rng(0)
    inside = (d_star > 0) & (d_star < 1)
    for scale in (1e-4, 1e-2, 0.2):
        d = d_star.copy()
        d[inside] = np.clip(d[inside] + rng.normal(0, scale, inside.sum()), 1e-12, 1 - 1e-12)
        assert part1.value_function(d, p_data, p_g, dx) < v_star


def test_gradient_ascent_on_v_converges_to_the_formula():
    _, dx, p_data, p_g = grid_densities()
    trained = part1.train_discriminator(p_data, p_g, dx, steps=3000)
    d_star = part1.optimal_discriminator(p_data, p_g)
    informative = (d_star > 1e-3) & (d_star < 1 - 1e-3)  # where the logit is finite and reachable
    assert informative.sum() > 1000
    np.testing.assert_allclose(trained[informative], d_star[informative], atol=1e-8)
    # the gradient of V vanishes at D* (logit(D*)) where both densities have mass
    logits = np.log(d_star[informative] / (1 - d_star[informative]))
    grad = part1.value_gradient(logits, p_data[informative], p_g[informative], dx)
    assert np.abs(grad).max() < 1e-15


def test_value_function_and_its_gradient_match_torch():
    _, dx, p_data, p_g = grid_densities(301)
    logits = np.random.default_rng(1).normal(0, 3, p_data.shape)
    logits[::7] = 0.0  # D = 1/2 exactly
    pd, pg = torch.from_numpy(p_data), torch.from_numpy(p_g)

    def value(a):  # log D = logsigmoid(a), log(1 - D) = logsigmoid(-a)
        return (pd * F.logsigmoid(a) + pg * F.logsigmoid(-a)).sum() * dx

    expected, (grad,) = torch_reference(value, logits)
    assert_close(part1.value_function(part1.sigmoid(logits), p_data, p_g, dx), expected, "V(D, G)")
    assert_close(part1.value_gradient(logits, p_data, p_g, dx), grad, "dV/dlogits")


def test_kl_and_jsd_match_torch():
    _, dx, p_data, p_g = grid_densities(501)
    m = (p_data + p_g) / 2
    pd, pg, pm = (torch.from_numpy(v) for v in (p_data, p_g, m))
    # torch.special.xlogy(0, 0) = 0: a point without mass contributes nothing, as in part1.xlogy
    kl = lambda p, q: ((torch.special.xlogy(p, p) - torch.special.xlogy(p, q)).sum() * dx).item()  # noqa: E731
    kl_pm, kl_gm = kl(pd, pm), kl(pg, pm)
    torch_kl = F.kl_div(pm[pm > 0].log(), pd[pm > 0], reduction="sum").item() * dx
    assert kl_pm == pytest.approx(torch_kl, rel=1e-12)
    assert_close(part1.kl_divergence(p_data, m, dx), kl_pm, "KL(p_data || m)")
    assert_close(part1.js_divergence(p_data, p_g, dx), 0.5 * kl_pm + 0.5 * kl_gm, "JSD")


def test_generator_loss_gradients_match_torch_and_the_minimax_one_saturates():
    d_fake = np.array([0.5, 0.1, 1e-3, 1e-6])
    logits = np.log(d_fake / (1 - d_fake))
    _, (minimax,) = torch_reference(lambda a: torch.log1p(-torch.sigmoid(a)), logits)
    _, (non_saturating,) = torch_reference(lambda a: -F.logsigmoid(a), logits)
    mine_minimax, mine_ns = part1.generator_loss_gradients(d_fake)
    # the logits went through log(d / (1 - d)) and back through sigmoid: rounding of ~1e-16 relative
    assert_close(mine_minimax, minimax, "minimax gradient", rtol=1e-9)
    assert_close(mine_ns, non_saturating, "non-saturating gradient", rtol=1e-9)
    assert abs(mine_minimax[-1]) < 1e-5 and abs(mine_ns[-1]) > 0.99


def test_sigmoid_is_stable_for_large_logits():
    out = part1.sigmoid(np.array([-1000.0, -40.0, 0.0, 40.0, 1000.0]))
    assert np.all(np.isfinite(out)) and out[0] == 0.0 and out[2] == 0.5 and out[-1] == 1.0
    logits = torch.tensor([-1000.0, -40.0, 0.0, 40.0, 1000.0], dtype=torch.float64)
    assert_close(out, torch.sigmoid(logits).numpy())


def test_modes_covered_and_sample_density():
    samples = np.concatenate([np.full(900, part1.MODES[0]), np.full(100, part1.MODES[2])])
    n, shares = part1.modes_covered(samples)
    assert n == 2 and shares.tolist() == [0.9, 0.0, 0.1, 0.0, 0.0]
    x, dx = part1.make_grid(-10, 10, 201)
    density = part1.sample_density(samples, x, dx)
    assert density.sum() * dx == pytest.approx(1.0)
    assert density[np.argmin(np.abs(x - part1.MODES[0]))] == pytest.approx(0.9 / dx)


def test_a_diverging_tiny_gan_stops_with_an_error_not_nan_scores():
    # Outside review: --lr 1e6 ended with "mean JSD nan", 0 modes and exit status 0.
    from common.errors import NonFiniteLoss

    cfg = part1.Config(lr=1e6, steps=30, batch_size=16)
    with pytest.raises(NonFiniteLoss, match="smaller --lr"):
        part1.train_tiny_gan(False, 0, cfg, [0, 30])


def test_minibatch_std_lets_d_see_the_spread_of_the_batch():
    torch.manual_seed(0)
    d = part1.TinyDiscriminator(minibatch_std=True)
    seen = []  # what D's MLP gets: each sample beside the std of its whole batch
    d.net.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    x = torch.randn(8, 1)
    alone = d(x[:1].repeat(8, 1))  # the same first sample in a batch of copies (std 0)
    mixed = d(x)
    copies, varied = seen
    assert copies.shape == varied.shape == (8, 2)
    assert torch.equal(copies[:, 0], x[:1].repeat(8, 1)[:, 0]) and torch.all(copies[:, 1] == 0)
    torch.testing.assert_close(varied[:, 1], x.std().expand(8))  # the same std beside each one
    assert varied[0, 1] > 0.5
    assert not torch.allclose(alone[0], mixed[0]), \
        "the same sample in another batch must be judged differently"
    plain = part1.TinyDiscriminator(minibatch_std=False)
    torch.testing.assert_close(plain(x)[:1], plain(x[:1]))


# ------------------------------------------------------------------------------------------
# The Frechet distance on known Gaussians
# ------------------------------------------------------------------------------------------
def test_frechet_distance_of_commuting_gaussians_has_a_closed_form():
    """Covariances Q D1 Q^T and Q D2 Q^T commute:
    d^2 = |mu1 - mu2|^2 + sum_i (sqrt(d1_i) - sqrt(d2_i))^2."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    d1, d2 = rng.uniform(0.1, 4, 6), rng.uniform(0.1, 4, 6)
    d1[0] = d2[0] = 0.0  # a direction with no spread in either: exact zeros on the diagonal
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    got = quality.gaussian_frechet_distance(mu1, q @ np.diag(d1) @ q.T, mu2, q @ np.diag(d2) @ q.T)
    # sqrt of an eigenvalue that is 0 up to rounding (~1e-16) is ~1e-8: the zero direction costs it
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-7)
    one_d = quality.gaussian_frechet_distance([1.0], [[4.0]], [3.0], [[1.0]])
    assert one_d == pytest.approx(4 + 1)


def test_frechet_distance_matches_a_direct_matrix_square_root():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    cov1, cov2 = a @ a.T, b @ b.T + 0.1 * np.eye(5)  # general covariances: S1 S2 is not symmetric
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * sqrtm(cov1 @ cov2).real)
    distance = quality.gaussian_frechet_distance
    assert distance(mu1, cov1, mu2, cov2) == pytest.approx(direct, rel=1e-8)
    # symmetric in its two arguments
    assert distance(mu2, cov2, mu1, cov1) == pytest.approx(direct, rel=1e-8)


def test_frechet_distance_of_sample_sets():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(4000, 3))
    assert quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert quality.frechet_distance(a, a[::-1]) == pytest.approx(0.0, abs=1e-9)  # order: no matter
    shifted = a + np.array([2.0, 0.0, 0.0])
    # means 2 apart, the same spread
    assert quality.frechet_distance(a, shifted) == pytest.approx(4.0, rel=1e-9)
    scaled = 2 * rng.normal(size=(4000, 3))
    assert quality.frechet_distance(a, scaled) == pytest.approx(3.0, rel=0.1)  # 3 (2-1)^2, sampled
    collapsed = np.repeat(a[:1], 4000, axis=0) + 1e-3 * rng.normal(size=(4000, 3))
    assert quality.frechet_distance(a, collapsed) > 2.5  # one point: the spread term catches it


# ------------------------------------------------------------------------------------------
# The DCGAN
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_dcgan_shapes_output_range_and_architecture_rules(channels, size):
    torch.manual_seed(0)
    gan = part2.DCGAN(16, channels, size, g_width=8, d_width=8)
    images = gan.generator(torch.randn(5, 16))
    assert images.shape == (5, channels, size, size)
    assert images.abs().max() < 0.9  # N(0, 0.02): small at first
    with torch.no_grad():
        gan.generator.net[-2].weight.mul_(1000)  # huge pre-activations: tanh keeps [-1, 1]
    images = gan.generator(torch.randn(5, 16))
    assert images.min() >= -1 and images.max() <= 1 and images.abs().max() > 0.99
    assert gan.discriminator(images).shape == (5,)
    g_layers, d_layers = list(gan.generator.net), list(gan.discriminator.net)
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.Linear)) for m in gan.modules())
    # no BN on G's output layer, nor on D's input layer
    assert isinstance(g_layers[-1], nn.Tanh) and isinstance(g_layers[-2], nn.ConvTranspose2d)
    assert isinstance(d_layers[1], nn.LeakyReLU) and d_layers[1].negative_slope == 0.2
    assert all(isinstance(m, nn.ReLU) for m in g_layers if isinstance(m, (nn.ReLU, nn.LeakyReLU)))
    strided = [m for m in gan.discriminator.modules()
               if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == part2.upsamplings(size)


def test_dcgan_initialization_is_normal_0_02():
    torch.manual_seed(0)
    gan = part2.DCGAN(64, 1, 28, g_width=32, d_width=32)
    convs = [m for m in gan.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert abs(weights.mean().item()) < 1e-3
    assert weights.std().item() == pytest.approx(0.02, rel=0.02)
    gammas = torch.cat([m.weight for m in gan.modules() if isinstance(m, nn.BatchNorm2d)])
    assert gammas.mean().item() == pytest.approx(1.0, abs=0.01)
    assert gammas.std().item() == pytest.approx(0.02, rel=0.2)
    biases = [m.bias for m in gan.modules() if getattr(m, "bias", None) is not None]
    assert all(torch.all(b == 0) for b in biases)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def changed(module: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(v, before[k]) for k, v in module.named_parameters())


def test_d_step_changes_only_d_and_g_step_changes_only_g():
    torch.manual_seed(0)
    gan = part2.DCGAN(8, 1, 28, g_width=4, d_width=4)
    opt_g = torch.optim.Adam(gan.generator.parameters(), lr=1e-2, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(gan.discriminator.parameters(), lr=1e-2, betas=(0.5, 0.999))
    real = torch.rand(6, 1, 28, 28) * 2 - 1
    fake = gan.generator(torch.randn(6, 8))
    g0, d0 = snapshot(gan.generator), snapshot(gan.discriminator)
    stats = part2.discriminator_step(gan, opt_d, real, fake, label_smoothing=0.1)
    assert changed(gan.discriminator, d0) and not changed(gan.generator, g0)
    assert all(p.grad is None for p in gan.generator.parameters()), "the D step reached G"
    assert 0 < stats["d_real"] < 1 and 0 < stats["d_fake"] < 1
    d1 = snapshot(gan.discriminator)
    part2.generator_step(gan, opt_g, fake)
    assert changed(gan.generator, g0) and not changed(gan.discriminator, d1)
    assert all(p.requires_grad for p in gan.discriminator.parameters()), \
        "D must be trainable again after the G step"
    d_grads = [p.grad for p in gan.discriminator.parameters()]
    part2.generator_step(gan, opt_g, gan.generator(torch.randn(6, 8)))
    assert all(a is b for a, b in zip(d_grads, (p.grad for p in gan.discriminator.parameters()))), \
        "the G step must leave D's gradients alone"


def test_one_sided_label_smoothing_targets_real_images_only():
    class FixedD(nn.Module):
        """Logits fixed per batch (real images are ones, fakes zeros) plus one trainable shift."""

        def __init__(self):
            super().__init__()
            self.shift = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            logits = torch.tensor([2.0, -1.0]) if x.sum() > 0 else torch.tensor([0.5, -3.0])
            return logits + self.shift

    gan = part2.DCGAN(8, 1, 28, g_width=4, d_width=4)
    gan.discriminator = FixedD()
    optimizer = torch.optim.SGD(gan.discriminator.parameters(), lr=0.0)
    real, fake = torch.ones(2, 1, 28, 28), torch.zeros(2, 1, 28, 28)
    stats = part2.discriminator_step(gan, optimizer, real, fake, 0.2)
    real_logits, fake_logits = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    expected = (F.binary_cross_entropy_with_logits(real_logits, torch.full((2,), 0.8))
                + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros(2)))  # fakes: 0
    assert stats["d_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    # d/dshift: sum over reals of (sigmoid - 0.8) / 2 + sum over fakes of sigmoid / 2
    grad = (torch.sigmoid(real_logits) - 0.8).mean() + torch.sigmoid(fake_logits).mean()
    assert gan.discriminator.shift.grad.item() == pytest.approx(grad.item(), rel=1e-5)


def test_generated_samples_in_eval_mode_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    g = part2.Generator(8, 1, 28, 4)
    g.train()(torch.randn(16, 8))  # move the BN running statistics
    z = torch.randn(6, 8)
    together = part2.generate(g, z)
    one_by_one = torch.cat([part2.generate(g, z[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(together, one_by_one)
    assert g.training, "generate() puts the generator back in training mode"


def test_the_generator_loss_is_the_non_saturating_one():
    """Outside review: training G on the saturating minimax loss log(1 - D(G(z))) passed every
    test. G's loss at fixed logits a (D = sigmoid(a)) is -log D = softplus(-a), and its gradient
    -(1 - D) / n stays near -1/n where D confidently rejects the fakes (a = -12), where the
    minimax loss's gradient -D / n is about 6e-6 / n."""
    logits = torch.tensor([-12.0, -4.0, 0.0, 0.0, 3.0], dtype=torch.float64, requires_grad=True)
    loss = part2.generator_loss(logits)
    a = logits.detach()
    assert_close(loss.item(), F.softplus(-a).mean().item(), "G loss = softplus(-logit)")
    assert_close(loss.item(), -torch.log(torch.sigmoid(a)).mean().item(), "G loss = -log D(G(z))")
    loss.backward()
    assert_close(logits.grad.numpy(), (-(1 - torch.sigmoid(a)) / 5).numpy(), "dG loss / dlogit")
    assert logits.grad[0] < -0.99 / 5  # no vanishing gradient where D rejects the fakes


def test_the_g_step_sends_the_non_saturating_gradient_to_the_fakes():
    """The G step itself, through a D that confidently rejects the fakes (logits near -10): the
    gradient reaching the fake images is that of softplus(-logit), not of the minimax loss."""
    class LinearD(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.tensor(2.0)), nn.Parameter(torch.tensor(-10.0))

        def forward(self, x):
            return self.w * x.flatten(1).mean(1) + self.b  # (B,) logits

    gan = part2.DCGAN(8, 1, 28, g_width=4, d_width=4)
    gan.discriminator = LinearD()
    pixels = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    fake = (pixels - 0.5).requires_grad_()
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(()))], lr=0.0)  # G's weights: no matter
    stats = part2.generator_step(gan, optimizer, fake)
    logits = 2.0 * fake.detach().flatten(1).mean(1) - 10.0
    assert_close(stats["g_loss"].item(), F.softplus(-logits).mean().item(), "G loss", rtol=1e-6)
    # dL/dfake = dL/dlogit * dlogit/dfake = -(1 - D) / B * w / 784 for every pixel of an image
    expected = (-(1 - torch.sigmoid(logits)) / 4 * 2.0 / 784).view(4, 1, 1, 1).expand_as(fake)
    assert_close(fake.grad.numpy(), expected.numpy(), "gradient reaching the fakes", rtol=1e-5)
    assert fake.grad.abs().sum() > 0.99 * 2.0  # = w mean(1 - D): D's rejection does not silence it
    assert gan.discriminator.w.grad is None, "the G step must not give D gradients"


# ------------------------------------------------------------------------------------------
# The lab: settings, Ctrl-C and exact resume, foreign checkpoints
# ------------------------------------------------------------------------------------------
def lab(tmp_path: Path, *argv: str, main=part2.main, cls=part2.Config) -> dict:
    return run_lab(main, cls, ["--out", str(tmp_path / "runs"), "--device", "cpu", *argv])


TINY = ("--smoke", "--g-width", "4", "--d-width", "4", "--score-samples", "100", "--log-every", "5")


@pytest.mark.parametrize("argv, message", [
    (["--lr", "0"], "--lr: must be in (0, 1000000]"),
    (["--beta1", "1"], "--beta1: must be in [0, 1)"),
    (["--label-smoothing", "0.7"], "--label-smoothing: must be in [0, 0.5]"),
    (["--batch-size", "1"], "--batch-size: must be >= 2"),
    (["--dataset", "svhn"], "invalid choice"),
])
def test_impossible_settings_fail_in_parsing_with_one_line(tmp_path, argv, message, capsys):
    assert lab(tmp_path, *argv) == {"exit": 2}
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", [part2, sweep], ids=["part2", "sweep"])
def test_a_batch_larger_than_the_training_set_is_a_setting_error_before_the_run_folder(
        tmp_path, offline, capsys, script):
    # 427 = the twin's 512 training images less the 1/6 held out for the score
    assert lab(tmp_path, "--smoke", "--batch-size", "428", main=script.main,
               cls=script.Config) == {"exit": 2}
    err = capsys.readouterr().err
    assert "--batch-size 428 is more than the 427 training images" in err, err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_missing_data_stops_before_the_run_folder(tmp_path, offline, capsys):
    assert lab(tmp_path, "--data-dir", str(tmp_path / "nowhere")) == {"exit": 1}
    err = capsys.readouterr().err
    assert "mnist" in err and "does not exist" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_then_resume_ends_with_the_uninterrupted_weights(tmp_path, offline, monkeypatch,
                                                                capsys, ctrl_c):
    args = [*TINY, "--epochs", "3"]  # 13 steps per epoch, each a D step and a G step
    # A quicker scorer: --smoke trains it first, in every run
    scorer = quality.week3.Config(dataset="mnist", epochs=1, batch_size=32, width=4, blocks=2,
                                  augment=False, val_fraction=0.0)
    monkeypatch.setattr(quality, "classifier_config", lambda dataset, smoke: scorer)
    scorer_steps = scorer.epochs * (427 // scorer.batch_size)
    straight = lab(tmp_path / "straight", *args)
    ctrl_c(scorer_steps + 39)  # right after D's 20th step, in epoch 2, before G's
    assert lab(tmp_path / "cut", *args) == {"exit": 130}
    (checkpoint,) = (tmp_path / "cut" / "runs").glob("week09/part2/*/checkpoint.pt")
    assert "the checkpoint of epoch 1" in capsys.readouterr().err
    steps = ctrl_c(0)
    resumed = lab(tmp_path / "cut", "--resume", str(checkpoint))
    assert steps.steps - scorer_steps == 2 * 26, "the resumed run trains epochs 2 and 3 only " \
        "(13 D and 13 G steps each)"
    assert resumed["run_dir"] == str(checkpoint.parent)
    assert resumed["steps"] == straight["steps"] == 39
    a, b = read_checkpoint(Path(straight["run_dir"]) / "checkpoint.pt"), read_checkpoint(checkpoint)
    for name, value in a["model"].items():  # both players, BatchNorm statistics included
        assert torch.equal(value, b["model"][name]), name
    pairs = ((a["optimizer"], b["optimizer"]), (a["extra"]["opt_d"], b["extra"]["opt_d"]))
    for mine, theirs in pairs:
        assert len(mine["state"]) > 0  # G's optimizer, then D's (saved as the loop's own state)
        for key, state in mine["state"].items():
            assert torch.equal(state["exp_avg_sq"], theirs["state"][key]["exp_avg_sq"])
    d_parameters = list(part2.Discriminator(1, 28, 4).parameters())
    assert len(a["extra"]["opt_d"]["state"]) == len(d_parameters)
    assert resumed["fd"] == straight["fd"] and resumed["fd_start"] == straight["fd_start"]
    rows = (checkpoint.parent / "metrics.csv").read_text().splitlines()
    assert rows == (Path(straight["run_dir"]) / "metrics.csv").read_text().splitlines()
    assert len(list(checkpoint.parent.glob("samples_epoch*.png"))) == 3
    assert (checkpoint.parent / "progression.png").exists()
    capsys.readouterr()
    assert lab(tmp_path / "cut", "--resume", str(checkpoint))["fd"] == straight["fd"]
    assert "nothing to do" in capsys.readouterr().out


def test_a_piped_run_prints_a_progress_line_at_the_interval(tmp_path):
    """Outside review: piped into a log file, Week 9 printed nothing for minutes (tqdm is silent
    without a terminal). common.progress prints "epoch N: i/n batches" every every_s seconds
    instead: set to 0 here (in the child, as a monkeypatch would), so every batch gets a line."""
    script = str(ROOT / "week09_gan" / "part2.py")
    code = ("import runpy, sys; from common.progress import progress; "
            "progress.__defaults__ = ('', 0.0); "  # (desc, every_s): a line after every batch
            f"sys.argv[0] = {script!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
    argv = [*TINY, "--epochs", "1", "--out", str(tmp_path / "runs"), "--device", "cpu"]
    result = subprocess.run([sys.executable, "-c", code, *argv], cwd=tmp_path,  # piped: no terminal
                            env=offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if " batches, " in line]
    expected = [f"epoch 1: {i}/13" for i in range(1, 14)]
    assert [line.split(" batches")[0] for line in lines] == expected, result.stderr
    assert "epoch=1  step=13" in result.stdout  # the metrics rows go to stdout, one line each


def test_resume_refuses_another_scripts_or_another_models_checkpoint_and_damaged_files(
        tmp_path, offline, capsys):
    foreign = save_checkpoint(tmp_path / "foreign" / "checkpoint.pt", nn.Linear(2, 2),
                              script="week03/part2")
    assert lab(tmp_path, "--smoke", "--resume", str(foreign)) == {"exit": 2}
    err = capsys.readouterr().err
    assert "written by week03/part2, not week09/part2" in err and err.count("\n") == 1, err
    other = save_checkpoint(tmp_path / "other" / "checkpoint.pt", nn.Linear(2, 2),
                            script="week09/part2", config={"smoke": True}, progression=[], step=0,
                            train_time_s=0.0, fd_start=1.0)
    assert lab(tmp_path, "--resume", str(other)) == {"exit": 1}
    err = capsys.readouterr().err
    assert "holds a Linear, not a DCGAN" in err and err.count("\n") == 1, err
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"\x00" * 100)
    assert lab(tmp_path, "--smoke", "--resume", str(damaged)) == {"exit": 2}
    assert "corrupt or not a PyTorch file" in capsys.readouterr().err


def test_the_scoring_classifier_is_cached_and_a_damaged_cache_is_retrained(tmp_path, monkeypatch):
    from common.data import load
    from common.device import pick_device

    data = load("mnist", synthetic=True, n_synthetic=256)
    monkeypatch.setattr(quality, "classifier_config", lambda dataset, smoke: quality.week3.Config(
        dataset=dataset, epochs=1, batch_size=32, width=4, blocks=2, lr=5e-3, augment=False,
        val_fraction=0.0))
    cache = tmp_path / "cache"
    first = quality.get_scorer("mnist", data, smoke=False, device=pick_device("cpu"), cache=cache)
    path = cache / "classifier_mnist.pt"
    assert path.exists()
    second = quality.get_scorer("mnist", data, smoke=False, device=pick_device("cpu"), cache=cache)
    assert second.val_acc == first.val_acc
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[name])
    path.write_bytes(b"garbage")
    third = quality.get_scorer("mnist", data, smoke=False, device=pick_device("cpu"), cache=cache)
    assert third.val_acc == first.val_acc
    assert read_checkpoint(path)["extra"]["val_acc"] == first.val_acc
