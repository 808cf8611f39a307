"""Week 9, Part 1: the GAN game in numbers, then a tiny GAN on a 1-D mixture that collapses.

Run: python week09_gan/part1.py [--smoke] [--help]

The theory (NumPy, on a grid of points, Goodfellow et al. 2014). A discriminator D(x) in (0, 1)
and a generator whose samples have density p_g play

    min_G max_D  V(D, G) = E_{x~p_data}[log D(x)] + E_{x~p_g}[log(1 - D(x))]
                         = integral of  p_data(x) log D(x) + p_g(x) log(1 - D(x))  dx

For a fixed G, each point x is its own little problem: maximize a log D + b log(1 - D) with
a = p_data(x), b = p_g(x). Its derivative a/D - b/(1 - D) is zero at

    D*(x) = p_data(x) / (p_data(x) + p_g(x))                 (the optimal discriminator)

Put D* back in, with m = (p_data + p_g) / 2:

    V(D*, G) = integral p_data log(p_data / 2m) + p_g log(p_g / 2m) dx
             = KL(p_data || m) + KL(p_g || m) - 2 log 2 = -log 4 + 2 JSD(p_data || p_g)

So against a perfect discriminator the generator minimizes the Jensen-Shannon divergence, whose
minimum, -log 4, is reached only at p_g = p_data (where D* = 1/2 everywhere). On a grid of
points with spacing dx, integrals become sums times dx and the identity holds exactly (to
rounding) once both densities are normalized so that sum(p) dx = 1.

Two consequences worked out below: JSD saturates at log 2 when the two densities do not
overlap, so its gradient vanishes (a perfect D tells G nothing about *which way* to move);
and the generator's minimax loss log(1 - D(G(z))) has gradient -D with respect to D's logit,
which vanishes when D confidently rejects the fakes, while the non-saturating loss
-log D(G(z)) has gradient -(1 - D): largest exactly then.

The tiny GAN (PyTorch: two small MLPs on 1-D numbers, too small to need a GPU) learns a
mixture of 5 narrow Gaussians far apart. Trained plainly it covers only some of the modes:
**mode collapse**, G finds outputs D currently accepts and piles its samples there; when D
learns to reject them G moves its pile elsewhere, rather than spreading out. The fix shown is
the minibatch standard deviation (Karras et al. 2018, "minibatch discrimination" in its
simplest form): D also sees the spread of the whole batch it is judging, so a batch of
near-identical fakes gives itself away, and G is pushed to spread out. The densities over
training are plotted for both, and scored with this file's own JS divergence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.config import BaseConfig, Range
from common.device import pick_device, seed_everything
from common.errors import NonFiniteLoss
from common.plots import plot_curves, save
from common.runner import launch
from common.runs import Run


@dataclass
class Config(BaseConfig):
    """Week 9, Part 1: V(D, G), D* and the JSD on a grid; mode collapse in a tiny 1-D GAN."""

    grid_points: Annotated[int, Range(101, 100_000)] = 4001  # points of the grid integrals sum over
    steps: Annotated[int, Range(1)] = 2000  # steps of each tiny GAN (one D step and one G step)
    batch_size: Annotated[int, Range(2)] = 256  # samples per step (minibatch std needs at least 2)
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 1e-3  # Adam learning rate of both tiny nets
    seeds: Annotated[int, Range(1, 100)] = 3  # tiny GANs per variant (collapse is partly luck)
    snapshots: Annotated[int, Range(2, 20)] = 5  # moments of training whose densities are plotted
    # 800 steps: enough for the plain GAN to collapse (1-3 of 5 modes, seeds 0-5) and for the
    # minibatch std to keep all 5 (tests/test_week09_gan.py checks the difference).
    SMOKE: ClassVar[dict] = {"grid_points": 801, "steps": 800, "seeds": 1, "batch_size": 64,
                             "lr": 3e-3}
    UNUSED: ClassVar[tuple] = ("device", "data_dir")  # tiny nets on the CPU, data drawn in memory


# ----------------------------------------------------------------------------------------
# Densities on a grid
# ----------------------------------------------------------------------------------------
def make_grid(lo: float, hi: float, n: int) -> tuple[np.ndarray, float]:
    """n evenly spaced points and their spacing dx; integral f dx ~ sum(f) * dx."""
    x = np.linspace(lo, hi, n)
    return x, float(x[1] - x[0])


def gaussian_pdf(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    return np.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


def mixture_pdf(x: np.ndarray, means, std: float) -> np.ndarray:
    """An equal-weight mixture of Gaussians with one std: p(x) = mean_k N(x; mu_k, std^2)."""
    return np.mean([gaussian_pdf(x, m, std) for m in means], axis=0)


def normalize(p: np.ndarray, dx: float) -> np.ndarray:
    """Rescale so that sum(p) dx = 1: a density on the grid (the identities then hold exactly)."""
    return p / (p.sum() * dx)


def xlogy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a log b with 0 log 0 = 0 (a point with no mass contributes nothing)."""
    a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    out = np.zeros_like(a)
    mass = a != 0
    out[mass] = a[mass] * np.log(b[mass])
    return out


# ----------------------------------------------------------------------------------------
# The value function, the optimal discriminator, the JS divergence
# ----------------------------------------------------------------------------------------
def value_function(d: np.ndarray, p_data: np.ndarray, p_g: np.ndarray, dx: float) -> float:
    """V(D, G) = sum over the grid of [p_data log D + p_g log(1 - D)] dx."""
    return float(np.sum(xlogy(p_data, d) + xlogy(p_g, 1 - d)) * dx)


def optimal_discriminator(p_data: np.ndarray, p_g: np.ndarray) -> np.ndarray:
    """D*(x) = p_data / (p_data + p_g); 1/2 where neither has mass (any value does there)."""
    total = p_data + p_g
    return np.divide(p_data, total, out=np.full_like(total, 0.5, dtype=np.float64), where=total > 0)


def kl_divergence(p: np.ndarray, q: np.ndarray, dx: float) -> float:
    """KL(p || q) = sum p log(p / q) dx (infinite if p has mass where q has none)."""
    return float(np.sum(xlogy(p, p) - xlogy(p, q)) * dx)


def js_divergence(p: np.ndarray, q: np.ndarray, dx: float) -> float:
    """JSD(p || q) = KL(p || m) / 2 + KL(q || m) / 2 with m = (p + q) / 2; between 0 and log 2."""
    m = (p + q) / 2
    return 0.5 * kl_divergence(p, m, dx) + 0.5 * kl_divergence(q, m, dx)


def sigmoid(a: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-a), computed without overflow for large |a|."""
    a = np.asarray(a, dtype=np.float64)
    e = np.exp(-np.abs(a))
    return np.where(a >= 0, 1 / (1 + e), e / (1 + e))


def value_gradient(logits: np.ndarray, p_data: np.ndarray, p_g: np.ndarray,
                   dx: float) -> np.ndarray:
    """dV/da for a discriminator given by its logits a (D = sigmoid(a)), point by point:

        d/da [p_data log sigma(a) + p_g log(1 - sigma(a))] dx = [p_data (1 - D) - p_g D] dx

    Zero exactly where D = p_data / (p_data + p_g): the optimum above, seen from the gradient."""
    d = sigmoid(logits)
    return (p_data * (1 - d) - p_g * d) * dx


def train_discriminator(p_data: np.ndarray, p_g: np.ndarray, dx: float, steps: int = 2000,
                        lr: float = 4.0) -> np.ndarray:
    """A free-form discriminator (one logit per grid point) trained by gradient ascent on V.

    Only V's gradient is used, with a step size per point of lr / ((p_data + p_g) dx) (a point
    with little mass gets a tiny gradient, so it gets a larger step, as Adam's per-parameter
    scaling would give it). That step works out to lr (pi - D) with pi = p_data / (p_data + p_g):
    per point, logistic regression towards pi. The fixed point of the ascent is D*, found, not
    put in. (Points with no mass get no gradient and stay at 1/2.)"""
    mass = (p_data + p_g) * dx
    step_size = np.divide(lr, mass, out=np.zeros_like(mass, dtype=np.float64), where=mass > 0)
    logits = np.zeros_like(p_data, dtype=np.float64)
    for _ in range(steps):
        logits += step_size * value_gradient(logits, p_data, p_g, dx)
    return sigmoid(logits)


def generator_loss_gradients(d_fake: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradients with respect to D's logit a at a fake sample (D = sigmoid(a)):

        minimax          d/da  log(1 - sigma(a)) = -sigma(a)       = -D      (G minimizes it)
        non-saturating   d/da -log sigma(a)      = -(1 - sigma(a)) = -(1 - D)

    When D rejects the fakes (D -> 0) the minimax gradient vanishes and the non-saturating one
    does not: that is why every practical GAN, Part 2's included, trains G on -log D(G(z))."""
    d_fake = np.asarray(d_fake, dtype=np.float64)
    return -d_fake, -(1 - d_fake)


def theory_in_numbers(cfg: Config, run: Run) -> dict:
    """D*, V(D*, G) = -log 4 + 2 JSD, a trained D, and JSD as two Gaussians move apart."""
    x, dx = make_grid(-12, 12, cfg.grid_points)
    p_data = normalize(mixture_pdf(x, (-2.0, 2.0), 0.7), dx)
    p_g = normalize(gaussian_pdf(x, 0.5, 1.5), dx)
    d_star = optimal_discriminator(p_data, p_g)
    v_star, jsd = value_function(d_star, p_data, p_g, dx), js_divergence(p_data, p_g, dx)
    d_trained = train_discriminator(p_data, p_g, dx)
    identity_gap = abs(v_star - (-math.log(4) + 2 * jsd))
    print("=== The optimal discriminator, on a grid of", cfg.grid_points, "points ===")
    print("p_data: two Gaussians at -2 and 2 (std 0.7); p_g: one Gaussian at 0.5 (std 1.5)")
    print(f"V(D*, G) = {v_star:.6f};  -log 4 + 2 JSD = {-math.log(4) + 2 * jsd:.6f}  "
          f"(|gap| {identity_gap:.1e})")
    print(f"JSD(p_data || p_g) = {jsd:.6f}  (0 <= JSD <= log 2 = {math.log(2):.6f})")
    rng = np.random.default_rng(cfg.seed)
    nudged = [np.clip(d_star + rng.normal(0, 0.02, d_star.shape), 1e-9, 1 - 1e-9)
              for _ in range(20)]
    worse = [value_function(d, p_data, p_g, dx) for d in nudged]
    print(f"V at D* + random perturbations: all lower? {all(v < v_star for v in worse)} "
          f"(largest {max(worse):.6f} < {v_star:.6f})")
    # Where D* is within 1e-3 of 0 or 1 its logit is far out and ascent takes long to get there.
    informative = (d_star > 1e-3) & (d_star < 1 - 1e-3)
    max_gap = float(np.abs(d_trained - d_star)[informative].max())
    print(f"D trained by gradient ascent on V vs the formula: max |D - D*| = {max_gap:.1e} "
          f"(where 0.001 < D* < 0.999)")
    same = value_function(np.full_like(x, 0.5), p_data, p_data, dx)
    print(f"when p_g = p_data: D* = 1/2 everywhere and V = {same:.6f} "
          f"= -log 4 = {-math.log(4):.6f}")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    axes[0].plot(x, p_data, label="p_data")
    axes[0].plot(x, p_g, label="p_g")
    axes[0].set(xlim=(-6, 6), title="densities", xlabel="x")
    axes[1].plot(x, d_star, label="D* = p_data / (p_data + p_g)")
    axes[1].plot(x, d_trained, "--", label="D trained by gradient ascent")
    axes[1].axhline(0.5, color="grey", lw=0.5)
    axes[1].set(xlim=(-6, 6), ylim=(0, 1), title=f"V(D*, G) = {v_star:.3f} = -log 4 + 2 JSD",
                xlabel="x")
    for ax in axes:
        ax.legend(fontsize=8)
    save(fig, run.path("optimal_discriminator.png"))

    # JSD as p_g slides away from p_data: flat at log 2 once they stop overlapping.
    shifts = np.linspace(0, 8, 33)
    base = normalize(gaussian_pdf(x, 0, 0.5), dx)
    curve = [js_divergence(base, normalize(gaussian_pdf(x, s, 0.5), dx), dx) for s in shifts]
    slope_far = (curve[-1] - curve[-2]) / (shifts[-1] - shifts[-2])
    print("\n=== JSD between N(0, 0.5^2) and N(s, 0.5^2) ===\n" + "  ".join(
        f"s={s:g}: {j:.4f}" for s, j in list(zip(shifts, curve))[::4]))
    print(f"slope at s = 8: {slope_far:.1e}: no overlap, no gradient telling G which way to move")
    plot_curves({"JSD": list(zip(shifts, curve)), "log 2": [(0, math.log(2)), (8, math.log(2))]},
                run.path("jsd_vs_shift.png"), xlabel="shift s of p_g", ylabel="JSD",
                title="JSD saturates at log 2 when the densities stop overlapping")

    print("\n=== Generator losses: gradient with respect to D's logit at a fake ===")
    print(f"{'D(G(z))':>9s} {'minimax: -D':>12s} {'non-saturating: -(1-D)':>24s}")
    levels = np.array([0.5, 0.1, 0.01, 0.001])
    minimax, non_saturating = generator_loss_gradients(levels)
    for level, a, b in zip(levels, minimax, non_saturating):
        print(f"{level:9.3f} {a:12.4f} {b:24.4f}")
    return {"v_star": v_star, "jsd": jsd, "identity_gap": identity_gap,
            "trained_d_max_gap": max_gap, "perturbations_lower": all(v < v_star for v in worse),
            "jsd_far": curve[-1], "jsd_slope_far": slope_far}


# ----------------------------------------------------------------------------------------
# A tiny GAN on a 1-D mixture of Gaussians (PyTorch)
# ----------------------------------------------------------------------------------------
MODES = (-8.0, -4.0, 0.0, 4.0, 8.0)  # the data: an equal mixture of 5 narrow Gaussians, far apart
MODE_STD = 0.25
# G maps one noise number to one number: to cover 5 separate modes it must make steep jumps.
LATENT = 1


def sample_data(n: int, generator: torch.Generator) -> torch.Tensor:
    """n samples (n, 1) of the mixture: pick a mode, add Gaussian noise."""
    modes = torch.tensor(MODES)[torch.randint(0, len(MODES), (n,), generator=generator)]
    return (modes + MODE_STD * torch.randn(n, generator=generator)).unsqueeze(1)


def mlp(n_in: int, n_out: int, hidden: int = 64) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.LeakyReLU(0.2),
                         nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                         nn.Linear(hidden, n_out))


class TinyDiscriminator(nn.Module):
    """An MLP on one number; with ``minibatch_std`` it also sees the std of the whole batch it
    judges (the same extra input for every sample). A collapsed G makes batches with a tiny
    std, which real batches never have: D can reject them as a group."""

    def __init__(self, minibatch_std: bool):
        super().__init__()
        self.minibatch_std = minibatch_std
        self.net = mlp(2 if minibatch_std else 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.minibatch_std:
            x = torch.cat([x, x.std(0, keepdim=True).expand(len(x), 1)], dim=1)
        return self.net(x).flatten()


def modes_covered(samples: np.ndarray, min_share: float = 0.05) -> tuple[int, np.ndarray]:
    """How many modes get at least ``min_share`` of the samples within 3 std of their centre."""
    near = np.abs(samples[:, None] - np.array(MODES)[None]) < 3 * MODE_STD
    shares = near.mean(0)
    return int((shares >= min_share).sum()), shares


def sample_density(samples: np.ndarray, x: np.ndarray, dx: float) -> np.ndarray:
    """A histogram of the samples on the grid's cells, as a density (sum p dx = 1 on the grid)."""
    edges = np.concatenate([x - dx / 2, [x[-1] + dx / 2]])
    counts, _ = np.histogram(np.clip(samples, x[0], x[-1]), bins=edges)
    return counts / (counts.sum() * dx)


def train_tiny_gan(minibatch_std: bool, seed: int, cfg: Config,
                   snapshot_steps: list[int]) -> list[np.ndarray]:
    """The alternating game of Part 2 on numbers: D step on real and detached fakes, then a G
    step through the frozen D with the non-saturating loss. Returns samples at the snapshots."""
    torch.manual_seed(seed)
    data_rng = torch.Generator().manual_seed(seed + 1000)
    g, d = mlp(LATENT, 1), TinyDiscriminator(minibatch_std)
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    eval_z = torch.randn(4000, LATENT, generator=torch.Generator().manual_seed(seed + 2000))
    snapshots = []
    for step in range(cfg.steps + 1):
        if step in snapshot_steps:
            with torch.no_grad():
                snapshots.append(g(eval_z).flatten().numpy().astype(np.float64))
        if step == cfg.steps:
            break
        real, fake = sample_data(cfg.batch_size, data_rng), g(torch.randn(cfg.batch_size, LATENT))
        real_logits, fake_logits = d(real), d(fake.detach())
        d_loss = (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                  + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        d.requires_grad_(False)
        fake_logits = d(fake)
        g_loss = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
        d.requires_grad_(True)
        # A non-finite loss: e.g. --lr far too large.
        if not (math.isfinite(d_loss.item()) and math.isfinite(g_loss.item())):
            raise NonFiniteLoss(f"the tiny GAN's loss became non-finite at step {step + 1} "
                                f"(seed {seed}); try a smaller --lr than {cfg.lr:g}")
    return snapshots


def mode_collapse(cfg: Config, run: Run) -> dict:
    """Train the tiny GAN with and without the minibatch std, ``cfg.seeds`` times each; plot the
    densities over training of the first seed; score every run by modes covered and JSD."""
    x, dx = make_grid(-11, 11, cfg.grid_points)
    p_data = normalize(mixture_pdf(x, MODES, MODE_STD), dx)
    snapshot_steps = sorted({round(i * cfg.steps / (cfg.snapshots - 1))
                             for i in range(cfg.snapshots)})
    variants = {"plain": False, "minibatch std": True}
    results, first = {}, {}
    print(f"\n=== A tiny GAN on a mixture of {len(MODES)} Gaussians at {MODES}, "
          f"{cfg.steps} steps ===")
    for name, flag in variants.items():
        covered, jsds = [], []
        for seed in range(cfg.seed, cfg.seed + cfg.seeds):
            snapshots = train_tiny_gan(flag, seed, cfg, snapshot_steps)
            if not np.isfinite(snapshots[-1]).all():  # finite losses, but G's samples overflowed
                raise NonFiniteLoss(f"the tiny GAN's samples became non-finite ({name}, "
                                    f"seed {seed}); try a smaller --lr than {cfg.lr:g}")
            n_modes, shares = modes_covered(snapshots[-1])
            jsd = js_divergence(p_data, sample_density(snapshots[-1], x, dx), dx)
            jsd_start = js_divergence(p_data, sample_density(snapshots[0], x, dx), dx)
            covered.append(n_modes)
            jsds.append(jsd)
            run.log(variant=name, seed=seed, modes_covered=n_modes, jsd=jsd, jsd_start=jsd_start,
                     **{f"share_mode{i + 1}": s for i, s in enumerate(shares)})
            print(f"{name:14s} seed {seed}: modes covered {n_modes}/{len(MODES)}  shares "
                  + " ".join(f"{s:.2f}" for s in shares)
                  + f"  JSD to the data {jsd:.3f} (untrained {jsd_start:.3f})")
            if seed == cfg.seed:
                first[name] = snapshots
        results[name] = {"modes": covered, "jsd": jsds}

    fig, axes = plt.subplots(len(variants), len(snapshot_steps), sharex=True, squeeze=False,
                             figsize=(2.6 * len(snapshot_steps), 2.4 * len(variants)))
    for row, name in enumerate(variants):
        for col, step in enumerate(snapshot_steps):
            ax = axes[row, col]
            ax.fill_between(x, p_data, color="grey", alpha=0.3, label="data")
            ax.hist(first[name][col], bins=150, range=(-11, 11), density=True, histtype="step",
                    color="C3", label="G")
            ax.set(xlim=(-10, 10), ylim=(0, 1.6 * p_data.max()), yticks=[])
            ax.set_title(f"{name}, step {step}", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("density of G's samples over training (grey: the data)")
    save(fig, run.path("densities.png"))
    mean = {name: (float(np.mean(r["modes"])), float(np.mean(r["jsd"])))
            for name, r in results.items()}
    for name, (modes, jsd) in mean.items():
        print(f"{name:14s} mean modes covered {modes:.2f}/{len(MODES)}, mean JSD {jsd:.3f}")
    return {"modes_plain": mean["plain"][0], "modes_mbstd": mean["minibatch std"][0],
            "jsd_plain": mean["plain"][1], "jsd_mbstd": mean["minibatch std"][1],
            "modes_plain_runs": results["plain"]["modes"],
            "modes_mbstd_runs": results["minibatch std"]["modes"]}


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device("cpu")  # NumPy, and MLPs on single numbers
    run = Run.start(cfg, __file__, device)
    theory = theory_in_numbers(cfg, run)
    collapse = mode_collapse(cfg, run)
    return run.finish(**theory, **collapse)


if __name__ == "__main__":
    launch(main, Config)
