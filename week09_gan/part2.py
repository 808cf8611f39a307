"""Week 9, Part 2: a DCGAN on MNIST (CIFAR-10 by flag): discriminator and generator steps, alternating.

Run: python week09_gan/part2.py [--smoke] [--help]
     python week09_gan/part2.py --data-dir DATA --epochs 5 --label-smoothing 0.1
     python week09_gan/part2.py --data-dir DATA --dataset cifar10 --epochs 20
     python week09_gan/part2.py --resume runs/week09/part2/<time>/checkpoint.pt   (after Ctrl-C)

Two networks play the minimax game of Part 1 on images:

    D step  maximize  log D(x) + log(1 - D(G(z)))     (real images -> 1, fakes -> 0)
    G step  maximize  log D(G(z))                     (the non-saturating loss, with D frozen)

Each training step draws a batch of noise z, makes fakes G(z), updates D once (the fakes
detached, so nothing reaches G), then G once (D's weights frozen, so nothing changes D). The
loop is written out below, not hidden in ``common.fit``: two models, two optimizers, two losses.

DCGAN's rules (Radford, Metz & Chintala 2015): no pooling, strided convolutions in D and
strided transposed convolutions in G; BatchNorm in both except D's input layer and G's output
layer; ReLU in G with tanh on the output (images scaled to [-1, 1]); LeakyReLU(0.2) in D;
weights drawn from N(0, 0.02); Adam with lr 2e-4 and beta1 = 0.5 (the default 0.9 keeps too
much momentum for a target that moves: D's judgement changes with every G step).

Each epoch saves the samples of a fixed batch of noise (``samples_epochNN.png``); at the end
``progression.png`` stacks them, ``losses.png`` and ``d_outputs.png`` plot the metrics, and the
samples are scored (``week09_gan/quality.py``): the Frechet distance on our own classifier's
features against held-out real images, the real-vs-real baseline, and each class's share.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from common.checkpoint import load_checkpoint
from common.config import Range, ResumableConfig
from common.data import ImageData, load
from common.device import pick_device, seed_everything
from common.errors import LabError, NonFiniteLoss
from common.loader import TensorLoader
from common.plots import plot_curves, save
from common.runner import launch
from common.runs import Run
from week09_gan.quality import Scorer, gan_split, get_scorer, score

IMAGE_SIZE = {"mnist": 28, "cifar10": 32}
GRID_SIDE = 8  # the fixed-noise grid is 8 x 8 samples
PROGRESSION_ROWS = 10  # the progression figure shows at most this many epochs


@dataclass
class Config(ResumableConfig):
    """Week 9, Part 2: a DCGAN, its two alternating steps, samples each epoch, a classifier-based score."""

    dataset: Literal["mnist", "cifar10"] = "mnist"  # which image data set to imitate
    epochs: Annotated[int, Range(1)] = 5  # passes over the training images
    batch_size: Annotated[int, Range(2)] = 128  # images per step (BatchNorm needs at least 2)
    latent_dim: Annotated[int, Range(1, 4096)] = 64  # size of the noise vector z
    g_width: Annotated[int, Range(1, 1024)] = 32  # channels of G's last hidden layer; they double towards z
    d_width: Annotated[int, Range(1, 1024)] = 32  # channels of D's first layer; they double towards the output
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 2e-4  # Adam learning rate of both G and D (DCGAN's)
    beta1: Annotated[float, Range(0, 1, hi_open=True)] = 0.5  # Adam's first-moment decay (DCGAN: 0.5, not 0.9)
    label_smoothing: Annotated[float, Range(0, 0.5)] = 0.0  # one-sided: D's target for real images is 1 - this
    log_every: Annotated[int, Range(1)] = 50  # steps per metrics row (each row averages them)
    score_samples: Annotated[int, Range(10)] = 10_000  # images generated at the end for the score
    SMOKE: ClassVar[dict] = {"epochs": 4, "batch_size": 32, "latent_dim": 16, "g_width": 16, "d_width": 8,
                             "lr": 2e-3, "log_every": 4, "score_samples": 200}


# ---- The two networks ----
def upsamplings(size: int) -> int:
    """Stride-2 layers between a k x k start and the image: 28 = 7 * 2^2, 32 = 4 * 2^3."""
    return 2 if size == 28 else 3


class Generator(nn.Module):
    """z (N, latent, 1, 1) -> a start x start map (a transposed conv with a start x start kernel
    is a fully connected layer shaped as an image) -> transposed convs (kernel 4, stride 2,
    padding 1), each doubling the side and halving the channels -> tanh image in [-1, 1]."""

    def __init__(self, latent_dim: int = 64, channels: int = 1, size: int = 28, width: int = 32):
        super().__init__()
        ups = upsamplings(size)
        widths = [width * 2**i for i in reversed(range(ups))]  # e.g. 64, 32: channels halve as the map grows
        start = size >> ups
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, widths[0], start, 1, 0, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        for c_in, c_out in zip(widths, widths[1:]):  # BN follows: a conv bias would be cancelled
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Tanh()]  # no BN on the output
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
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 4, 2, 1),  # no BN on the input layer
                                   nn.LeakyReLU(0.2, inplace=True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(widths[-1], 1, size >> ups, 1, 0))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()  # logits (N,)


class DCGAN(nn.Module):
    """Both players in one module, so one checkpoint holds them (``model.generator``, ``model.discriminator``)."""

    def __init__(self, latent_dim: int, channels: int, size: int, g_width: int, d_width: int):
        super().__init__()
        self.generator = Generator(latent_dim, channels, size, g_width)
        self.discriminator = Discriminator(channels, size, d_width)
        self.apply(dcgan_init)


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialization: conv weights ~ N(0, 0.02), BatchNorm scales ~ N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Optimizers:
    """G's and D's optimizers as one object with ``state_dict`` / ``load_state_dict``, which is
    all ``common.checkpoint`` asks of an optimizer: one checkpoint restores both."""

    def __init__(self, generator: torch.optim.Optimizer, discriminator: torch.optim.Optimizer):
        self.generator, self.discriminator = generator, discriminator

    def state_dict(self) -> dict:
        return {"generator": self.generator.state_dict(), "discriminator": self.discriminator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])


# ---- The two steps of the game ----
def discriminator_step(gan: DCGAN, optimizer: torch.optim.Optimizer, real: torch.Tensor, fake: torch.Tensor,
                       label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """One step of D: maximize log D(x) + log(1 - D(G(z))), i.e. minimize the binary
    cross-entropy of real images against target 1 and of fakes against target 0.

    One-sided label smoothing: the real target is 1 - s (fakes stay at 0), so D is never pushed
    to infinite confidence on real images and G keeps a useful gradient (Salimans et al. 2016).
    ``fake.detach()``: this loss must not send gradients into G. Real and fake go through D in
    separate batches, so BatchNorm statistics never mix them."""
    d = gan.discriminator
    real_logits = d(real)
    fake_logits = d(fake.detach())
    loss = (F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, 1 - label_smoothing))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"d_loss": loss.detach(), "d_real": torch.sigmoid(real_logits.detach()).mean(),
            "d_fake": torch.sigmoid(fake_logits.detach()).mean()}


def generator_step(gan: DCGAN, optimizer: torch.optim.Optimizer, fake: torch.Tensor) -> dict[str, torch.Tensor]:
    """One step of G with D frozen: minimize -log D(G(z)) (the non-saturating loss: the
    minimax log(1 - D(G(z))) has almost no gradient while D easily rejects the fakes, Part 1).

    D's parameters stop asking for gradients during this step: the gradient still flows
    *through* D to the fakes and on into G, but D's weights get none and D's optimizer is not
    stepped. (D's BatchNorm running averages do move; D is only ever used in training mode.)"""
    d = gan.discriminator
    d.requires_grad_(False)
    try:
        logits = d(fake)
        loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    finally:
        d.requires_grad_(True)
    return {"g_loss": loss.detach(), "d_fake_g_step": torch.sigmoid(logits.detach()).mean()}


# ---- Images: [-1, 1] floats, grids ----
def to_tanh_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> floats in [-1, 1], the range of G's tanh output."""
    return x.float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def generate(generator: Generator, z: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Samples for noise ``z``, in eval mode (BatchNorm with its running averages): an image
    then depends on its own z only, not on the rest of the batch. On the CPU."""
    was_training = generator.training
    generator.eval()
    images = torch.cat([generator(z[i:i + batch_size]).float().cpu() for i in range(0, len(z), batch_size)])
    generator.train(was_training)
    return images


def save_grid(images: torch.Tensor, path, title: str = "", nrow: int = GRID_SIDE, row_labels=None):
    """Images in [-1, 1] (or uint8) tiled into one picture, with optional labels per row."""
    images = to_tanh_range(images) if images.dtype == torch.uint8 else images
    grid = make_grid((images.clamp(-1, 1) + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)
    fig, ax = plt.subplots(figsize=(0.5 * nrow + 0.8, 0.5 * math.ceil(len(images) / nrow) + 0.5))
    ax.imshow(grid.permute(1, 2, 0).numpy(), cmap=None if images.shape[1] == 3 else "gray")
    ax.set_xticks([])
    side = images.shape[-1] + 2
    if row_labels:
        ax.set_yticks([side * (i + 0.5) for i in range(len(row_labels))], row_labels, fontsize=7)
    else:
        ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    return save(fig, path)


# ---- Training ----
def own_rows(run: Run) -> list[dict]:
    """This model's metrics rows (a sweep logs several models into one run, each with its columns)."""
    return [r for r in run.rows if all(r.get(k) == v for k, v in run.extra_columns.items())]


def log_means(run: Run, sums: dict[str, torch.Tensor], count: int, epoch: int, step: int) -> None:
    """One metrics row: the mean of each statistic over the last ``count`` steps."""
    row = {key: (value / count).item() for key, value in sums.items()}
    if not all(math.isfinite(v) for v in row.values()):
        raise NonFiniteLoss(f"a loss became non-finite by step {step} (epoch {epoch}); stopped, keeping the last "
                            "checkpoint. Try a smaller --lr")
    run.log(epoch=epoch, step=step, **row)


def train_gan(cfg: Config, data: ImageData, x_train: torch.Tensor, real_val: torch.Tensor, scorer: Scorer,
              device: torch.device, run: Run) -> tuple[dict, DCGAN]:
    """Train a DCGAN on ``x_train`` (uint8), logging to ``run``; score it at the end; return
    the scores and the trained pair.
    With ``cfg.resume`` it goes on from that checkpoint and ends with the weights an
    uninterrupted run would have had (batches depend on (seed, epoch) only, and the random
    state that draws z is restored)."""
    channels, size = data.x_train.shape[1], data.x_train.shape[-1]
    seed_everything(cfg.seed)  # the same initial weights whatever ran before (e.g. training the classifier)
    gan = DCGAN(cfg.latent_dim, channels, size, cfg.g_width, cfg.d_width).to(device)
    # Two optimizers: each player steps only its own weights.
    opt_g = torch.optim.Adam(gan.generator.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    opt_d = torch.optim.Adam(gan.discriminator.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    optimizers = Optimizers(opt_g, opt_d)
    batches = TensorLoader(x_train, torch.zeros(len(x_train), dtype=torch.long), cfg.batch_size, shuffle=True,
                           drop_last=True, device=device, seed=cfg.seed, transform=to_tanh_range)
    # One fixed batch of noise, from its own generator: the grids of every epoch show the same z.
    fixed_z = torch.randn(GRID_SIDE**2, cfg.latent_dim, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    score_z = torch.randn(cfg.score_samples, cfg.latent_dim, generator=torch.Generator().manual_seed(cfg.seed + 1))

    epoch, step, train_time, progression = 0, 0, 0.0, []
    if cfg.resume:
        payload = load_checkpoint(cfg.resume, gan, optimizers, script=run.name)
        epoch, extra = payload["epoch"], payload["extra"]
        step, train_time, progression = extra["step"], extra["train_time_s"], list(extra["progression"])
        fd_start = extra["fd_start"]
        print(f"resumed from {cfg.resume} after epoch {epoch} (step {step})")
    else:  # the score of the untrained generator: what training has to improve on
        fd_start = score(scorer, generate(gan.generator, score_z[:len(real_val) // 2].to(device)), real_val,
                         data.num_classes)["fd"]
    print(f"generator {sum(p.numel() for p in gan.generator.parameters()):,} parameters, discriminator "
          f"{sum(p.numel() for p in gan.discriminator.parameters()):,}; {len(batches)} steps per epoch")

    while epoch < cfg.epochs:
        epoch += 1
        batches.set_epoch(epoch)  # the batches an uninterrupted run would see in this epoch
        gan.train()
        sums: dict[str, torch.Tensor] = {}
        count, t0 = 0, time.perf_counter()
        for real, _ in tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=None):
            z = torch.randn(len(real), cfg.latent_dim, device=device)
            fake = gan.generator(z)  # one forward of G serves both steps
            stats = discriminator_step(gan, opt_d, real, fake, cfg.label_smoothing)  # 1. D learns to tell
            stats |= generator_step(gan, opt_g, fake)  # 2. G learns to fool the D that just moved
            step, count = step + 1, count + 1
            for key, value in stats.items():
                sums[key] = sums.get(key, 0) + value
            if step % cfg.log_every == 0:
                log_means(run, sums, count, epoch, step)
                sums, count = {}, 0
        if count:  # the epoch's last steps, when they do not fill a whole row
            log_means(run, sums, count, epoch, step)
        train_time += time.perf_counter() - t0
        samples = generate(gan.generator, fixed_z)
        save_grid(samples, run.path(f"samples_epoch{epoch:02d}.png"), f"fixed noise, epoch {epoch}")
        progression.append(to_uint8(samples[:GRID_SIDE]))
        last = own_rows(run)[-1]
        print(f"epoch {epoch}: " + "  ".join(f"{k}={v:.3f}" for k, v in last.items() if isinstance(v, float))
              + f"  ({train_time:.0f} s of training)")
        # Between epochs only: after Ctrl-C the unfinished epoch is redone from this state.
        run.save_checkpoint(gan, optimizers, epoch=epoch, step=step, train_time_s=train_time,
                             progression=progression, fd_start=fd_start)

    shown = [round(i * (len(progression) - 1) / max(PROGRESSION_ROWS - 1, 1)) for i in range(PROGRESSION_ROWS)]
    shown = sorted(set(shown))
    save_grid(torch.cat([progression[i] for i in shown]), run.path("progression.png"),
              "the same 8 noise vectors after each epoch", row_labels=[f"epoch {i + 1}" for i in shown])
    rows = own_rows(run)
    curve = lambda key: [(r["step"], r[key]) for r in rows]  # noqa: E731
    plot_curves({"D loss": curve("d_loss"), "G loss": curve("g_loss")},
                run.path("losses.png"), xlabel="step", ylabel="loss", title=f"DCGAN on {data.name}")
    plot_curves({"D(x), real": curve("d_real"), "D(G(z)), fake (D step)": curve("d_fake")},
                run.path("d_outputs.png"), xlabel="step", ylabel="mean D output", title="what D says")

    generated = generate(gan.generator, score_z.to(device))
    save_grid(generated[:GRID_SIDE**2], run.path("final_samples.png"), "samples of the final generator")
    result = score(scorer, generated, real_val, data.num_classes)
    print(f"Frechet distance (classifier features, {result['fd_samples']} images each): generated vs real "
          f"{result['fd']:.3f}, real vs real {result['fd_real']:.3f}, untrained generator {fd_start:.3f}")
    print("class shares of generated images: " + "  ".join(f"{c}: {s:.1%}" for c, s in
                                                           zip(data.classes, result["class_shares"])))
    last_epoch = [r for r in rows if r["epoch"] == epoch]
    means = {k: sum(r[k] for r in last_epoch) / len(last_epoch) for k in ("d_loss", "g_loss", "d_real", "d_fake")}
    summary = {**result, "fd_start": fd_start, **{f"last_epoch_{k}": v for k, v in means.items()},
               "epochs_done": epoch, "steps": step, "train_time_s": round(train_time, 2)}
    return summary, gan


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = load(cfg.dataset, cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)
    x_train, _, x_val, _ = gan_split(data)  # the held-out images are the real side of the score
    if len(x_train) < cfg.batch_size:  # whole batches only: an epoch would have no step at all
        raise LabError(f"--batch-size {cfg.batch_size} is more than the {len(x_train)} training images")
    scorer = get_scorer(cfg.dataset, data, cfg.smoke, device)
    run = Run.start(cfg, __file__, device)  # after every check: a bad setting leaves no run folder
    print(f"training on {len(x_train)} images of {data.name}; {len(x_val)} held out for the score")
    summary, _ = train_gan(cfg, data, x_train, to_tanh_range(x_val), scorer, device, run)
    return run.finish(**summary, classifier_val_acc=scorer.val_acc, classes=data.classes)


if __name__ == "__main__":
    launch(main, Config)
