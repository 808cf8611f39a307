"""Week 9, Part 2: a DCGAN on MNIST (CIFAR-10 by flag): D and G steps, alternating.

Two networks play the minimax game of Part 1 on images:

    D step  maximize  log D(x) + log(1 - D(G(z)))     (real images -> 1, fakes -> 0)
    G step  maximize  log D(G(z))                     (the non-saturating loss, with D frozen)

Each training step (the loop of ``train_gan``) draws noise z, makes fakes G(z), updates D once
(the fakes detached, so nothing reaches G), then G once (D frozen). DCGAN's rules (Radford et
al. 2015): strided (transposed) convolutions, no pooling; BatchNorm except on D's input and G's
output; ReLU and a tanh output in G, LeakyReLU(0.2) in D; weights ~ N(0, 0.02); Adam with lr
2e-4 and beta1 = 0.5 (0.9 keeps too much momentum for a target that moves with every G step).

Run: python week09_gan/part2.py [--smoke] [--help]
     python week09_gan/part2.py --data-dir DATA --epochs 5 --label-smoothing 0.1
     python week09_gan/part2.py --data-dir DATA --dataset cifar10 --epochs 20
     python week09_gan/part2.py --resume runs/week09/part2/<time>/checkpoint.pt   (after Ctrl-C)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from common.config import Range, ResumableConfig
from common.data import ImageData, load
from common.device import pick_device, seed_everything
from common.errors import ConfigError
from common.loader import TensorLoader
from common.progress import progress
from common.runner import launch
from common.runs import Run
from common.train import check_finite
from week09_gan.plots import GRID_SIDE, save_grid, to_uint8, training_figures
from week09_gan.quality import Scorer, gan_split, get_scorer, score


@dataclass
class Config(ResumableConfig):
    """Week 9, Part 2: a DCGAN, its two alternating steps, samples each epoch, and a score."""

    dataset: Literal["mnist", "cifar10"] = "mnist"  # which image data set to imitate
    epochs: Annotated[int, Range(1)] = 5  # passes over the training images
    batch_size: Annotated[int, Range(2)] = 128  # images per step (BatchNorm needs at least 2)
    latent_dim: Annotated[int, Range(1, 4096)] = 64  # size of the noise vector z
    g_width: Annotated[int, Range(1, 1024)] = 32  # G's last hidden channels; doubling towards z
    d_width: Annotated[int, Range(1, 1024)] = 32  # D's first channels; doubling towards the output
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 2e-4  # Adam lr of both G and D (DCGAN's)
    beta1: Annotated[float, Range(0, 1, hi_open=True)] = 0.5  # Adam's first-moment decay (not 0.9)
    label_smoothing: Annotated[float, Range(0, 0.5)] = 0.0  # one-sided: D's real target is 1 - this
    log_every: Annotated[int, Range(1)] = 50  # steps per metrics row (each row averages them)
    score_samples: Annotated[int, Range(10)] = 10_000  # images generated at the end for the score
    SMOKE: ClassVar[dict] = {"epochs": 4, "batch_size": 32, "latent_dim": 16, "g_width": 16,
                             "d_width": 8, "lr": 2e-3, "log_every": 4, "score_samples": 200}


# ---- The two networks ----
def upsamplings(size: int) -> int:
    """Stride-2 layers between a k x k start and the image: 28 = 7 * 2^2, 32 = 4 * 2^3."""
    return 2 if size == 28 else 3


class Generator(nn.Module):
    """z (B, latent) -> (B, latent, 1, 1) -> a start x start map (a transposed conv with a
    start x start kernel is a fully connected layer shaped as an image) -> transposed convs
    (kernel 4, stride 2, padding 1), each doubling the side and halving the channels -> tanh."""

    def __init__(self, latent_dim: int = 64, channels: int = 1, size: int = 28, width: int = 32):
        super().__init__()
        ups = upsamplings(size)
        widths = [width * 2**i for i in reversed(range(ups))]  # e.g. 64, 32: halving as maps grow
        start = size >> ups
        layers: list[nn.Module] = [  # (B, latent, 1, 1) -> (B, widths[0], start, start)
            nn.ConvTranspose2d(latent_dim, widths[0], start, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        for c_in, c_out in zip(widths, widths[1:]):  # (B, c_in, s, s) -> (B, c_out, 2s, 2s)
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),  # BN cancels a bias
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        # (B, widths[-1], size/2, size/2) -> (B, channels, size, size) in [-1, 1]; no BN here
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.latent_dim = latent_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(len(z), -1, 1, 1))


class Discriminator(nn.Module):
    """The generator in reverse: strided convs (kernel 4, stride 2, padding 1) halve the side
    and double the channels, LeakyReLU(0.2) keeps a gradient for negative inputs, and a last
    conv over the whole start x start map gives one logit per image (D(x) = sigmoid(logit))."""

    def __init__(self, channels: int = 1, size: int = 28, width: int = 32):
        super().__init__()
        ups = upsamplings(size)
        widths = [width * 2**i for i in range(ups)]
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 4, 2, 1),  # no BN on the input
                                   nn.LeakyReLU(0.2, inplace=True)]  # (B, widths[0], size/2, ...)
        for c_in, c_out in zip(widths, widths[1:]):  # (B, c_in, s, s) -> (B, c_out, s/2, s/2)
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(widths[-1], 1, size >> ups, 1, 0))  # (B, 1, 1, 1)
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()  # logits (B,)


class DCGAN(nn.Module):
    """Both players in one module, so one checkpoint holds them."""

    def __init__(self, latent_dim: int, channels: int, size: int, g_width: int, d_width: int):
        super().__init__()
        self.generator = Generator(latent_dim, channels, size, g_width)
        self.discriminator = Discriminator(channels, size, d_width)
        self.apply(dcgan_init)


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialization: conv weights ~ N(0, 0.02), BN scales ~ N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


# ---- The two steps of the game ----
def discriminator_step(gan: DCGAN, optimizer: torch.optim.Optimizer, real: torch.Tensor,
                       fake: torch.Tensor, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """One step of D: maximize log D(x) + log(1 - D(G(z))), i.e. minimize the BCE of real images
    against target 1 - s and of fakes against 0. One-sided label smoothing s keeps D from infinite
    confidence on real images, so G keeps a useful gradient (Salimans et al. 2016). Real and fake
    go through D in separate batches, so BatchNorm statistics never mix them."""
    real_logits = gan.discriminator(real)  # (B,)
    fake_logits = gan.discriminator(fake.detach())  # (B,); detach: no gradient reaches G
    real_target = torch.full_like(real_logits, 1 - label_smoothing)
    loss = (F.binary_cross_entropy_with_logits(real_logits, real_target)
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"d_loss": loss.detach(), "d_real": torch.sigmoid(real_logits.detach()).mean(),
            "d_fake": torch.sigmoid(fake_logits.detach()).mean()}


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating loss -log D(G(z)) = softplus(-logit), averaged (BCE against target 1).
    Its gradient is -(1 - D) per logit: largest when D confidently rejects the fakes. The
    minimax log(1 - D(G(z))) has gradient -D there: almost nothing to learn from (Part 1)."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def generator_step(gan: DCGAN, optimizer: torch.optim.Optimizer,
                   fake: torch.Tensor) -> dict[str, torch.Tensor]:
    """One step of G with D frozen: D's parameters stop asking for gradients, so the gradient
    flows *through* D to the fakes and on into G, but D's weights get none and D's optimizer is
    not stepped. (D's BatchNorm running averages do move; D is only used in training mode.)"""
    d = gan.discriminator
    d.requires_grad_(False)
    try:
        logits = d(fake)  # (B,)
        loss = generator_loss(logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    finally:
        d.requires_grad_(True)
    return {"g_loss": loss.detach(), "d_fake_g_step": torch.sigmoid(logits.detach()).mean()}


def to_tanh_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> floats in [-1, 1], the range of G's tanh output."""
    return x.float() / 127.5 - 1


@torch.no_grad()
def generate(generator: Generator, z: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Samples for noise ``z``, in eval mode (BatchNorm with its running averages): an image
    then depends on its own z only, not on the rest of the batch. On the CPU."""
    was_training = generator.training
    generator.eval()
    images = torch.cat([generator(z[i:i + batch_size]).float().cpu()
                        for i in range(0, len(z), batch_size)])
    generator.train(was_training)
    return images


# ---- Training: the loop, written out ----
def train_gan(cfg: Config, data: ImageData, x_train: torch.Tensor, real_val: torch.Tensor,
              scorer: Scorer, device: torch.device, run: Run) -> tuple[dict, DCGAN]:
    """Train a DCGAN on ``x_train`` (uint8), logging to ``run``, and score it at the end. With
    ``cfg.resume`` it goes on from that checkpoint and ends with the weights an uninterrupted
    run would have had (batches depend on (seed, epoch) only; the state drawing z is restored)."""
    seed_everything(cfg.seed)  # the same initial weights whatever ran before (e.g. the scorer)
    gan = DCGAN(cfg.latent_dim, x_train.shape[1], x_train.shape[-1], cfg.g_width,
                cfg.d_width).to(device)
    # Two optimizers: each player steps only its own weights.
    opt_g = torch.optim.Adam(gan.generator.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    opt_d = torch.optim.Adam(gan.discriminator.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    batches = TensorLoader(x_train, torch.zeros(len(x_train), dtype=torch.long), cfg.batch_size,
                           shuffle=True, drop_last=True, device=device, seed=cfg.seed,
                           transform=to_tanh_range)
    # Fixed noise, from its own generators: every epoch's grid shows the same z.
    fixed_z = torch.randn(GRID_SIDE**2, cfg.latent_dim,
                          generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    score_z = torch.randn(cfg.score_samples, cfg.latent_dim,
                          generator=torch.Generator().manual_seed(cfg.seed + 1))
    state = run.restore(gan, opt_g)  # both players, G's optimizer, the random state
    if "opt_d" in state:  # D's optimizer rides in the checkpoint as the loop's own state
        opt_d.load_state_dict(state["opt_d"])
    start, step = state["epoch"], state.get("step", 0)
    train_time, progression = state.get("train_time_s", 0.0), list(state.get("progression", []))
    if "fd_start" not in state:  # the untrained generator's score: what training must improve on
        untrained = generate(gan.generator, score_z[:len(real_val) // 2].to(device))
        state["fd_start"] = score(scorer, untrained, real_val, data.num_classes)["fd"]
    print(f"generator {sum(p.numel() for p in gan.generator.parameters()):,} parameters, "
          f"discriminator {sum(p.numel() for p in gan.discriminator.parameters()):,}; "
          f"{len(batches)} steps per epoch")

    for epoch in range(start + 1, cfg.epochs + 1):
        batches.set_epoch(epoch)  # the batches an uninterrupted run would see in this epoch
        gan.train()
        sums, count, t0 = {}, 0, time.perf_counter()
        for real, _ in progress(batches, f"epoch {epoch}"):  # real: (B, C, H, W) in [-1, 1]
            z = torch.randn(len(real), cfg.latent_dim, device=device)  # (B, latent)
            fake = gan.generator(z)  # (B, C, H, W): one forward of G serves both steps
            stats = discriminator_step(gan, opt_d, real, fake, cfg.label_smoothing)  # 1. D
            stats |= generator_step(gan, opt_g, fake)  # 2. G fools the D that just moved
            step, count = step + 1, count + 1
            sums = {key: sums.get(key, 0) + value for key, value in stats.items()}
            if step % cfg.log_every == 0 or step == epoch * len(batches):  # and the epoch's end
                row = {key: (value / count).item() for key, value in sums.items()}  # the means
                check_finite(row["d_loss"] + row["g_loss"], epoch)  # NaN/inf: stop here
                run.log(show=True, epoch=epoch, step=step, **row)
                sums, count = {}, 0
        train_time += time.perf_counter() - t0
        samples = generate(gan.generator, fixed_z)
        save_grid(samples, run.path(f"samples_epoch{epoch:02d}.png"), f"fixed noise, epoch {epoch}")
        progression.append(to_uint8(samples[:GRID_SIDE]))
        # Between epochs only: after Ctrl-C the unfinished epoch is redone from this state.
        run.save_checkpoint(gan, opt_g, epoch=epoch, opt_d=opt_d.state_dict(), step=step,
                            train_time_s=train_time, progression=progression,
                            fd_start=state["fd_start"])

    rows = [r for r in run.rows if all(r.get(k) == v for k, v in run.extra_columns.items())]
    training_figures(run, rows, progression, data.name)
    generated = generate(gan.generator, score_z.to(device))
    save_grid(generated[:GRID_SIDE**2], run.path("final_samples.png"), "the final generator")
    result = score(scorer, generated, real_val, data.num_classes)
    print(f"Frechet distance (classifier features, {result['fd_samples']} images each): "
          f"generated vs real {result['fd']:.3f}, real vs real {result['fd_real']:.3f}, "
          f"untrained generator {state['fd_start']:.3f}")
    print("class shares of generated images: " + "  ".join(
        f"{c}: {s:.1%}" for c, s in zip(data.classes, result["class_shares"])))
    last = [r for r in rows if r["epoch"] == cfg.epochs]
    means = {f"last_epoch_{k}": sum(r[k] for r in last) / len(last)
             for k in ("d_loss", "g_loss", "d_real", "d_fake")}
    return {**result, "fd_start": state["fd_start"], **means, "epochs_done": cfg.epochs,
            "steps": step, "train_time_s": round(train_time, 2)}, gan


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = load(cfg.dataset, cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)
    x_train, _, x_val, _ = gan_split(data)  # the held-out images are the real side of the score
    if len(x_train) < cfg.batch_size:  # whole batches only: an epoch would have no step at all
        raise ConfigError(f"--batch-size {cfg.batch_size} is more than the {len(x_train)} "
                          "training images")
    scorer = get_scorer(cfg.dataset, data, cfg.smoke, device)
    run = Run.start(cfg, __file__, device)  # after every check: a bad setting leaves no run folder
    print(f"training on {len(x_train)} images of {data.name}; {len(x_val)} held out for the score")
    summary, _ = train_gan(cfg, data, x_train, to_tanh_range(x_val), scorer, device, run)
    return run.finish(**summary, classifier_val_acc=scorer.val_acc, classes=data.classes)


if __name__ == "__main__":
    launch(main, Config)
