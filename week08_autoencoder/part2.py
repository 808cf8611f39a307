"""Week 8, Part 2: autoencoders on MNIST, and how they compare with PCA at the same dimension.

An autoencoder squeezes each image through a bottleneck of a few numbers (its latent code z)
and rebuilds it from them; the only teacher is the image itself:

    z = encoder(x),  x_hat = sigmoid(decoder(z))      784 pixels -> bottleneck -> 784 pixels
    mse: mean (x_hat - x)^2     bce: mean -[x log x_hat + (1 - x) log(1 - x_hat)] (from logits)

With linear layers and MSE the best an autoencoder can do is PCA's subspace (Part 1); the
nonlinear layers can bend that "plane" to follow the data, so at the same dimension it should
rebuild better. Measured here on the same test images: MSE per pixel, pixels in [0, 1].

Run: python week08_autoencoder/part2.py [--smoke] [--help]
     python week08_autoencoder/part2.py --arch conv --bottleneck 8 --loss bce
     python week08_autoencoder/part2.py --resume runs/week08/part2/<time>/checkpoint.pt
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.config import BaseConfig, Range, ResumableConfig
from common.data import ImageData, load, subset
from common.device import autocast, pick_device, prepare_model, seed_everything
from common.errors import ConfigError
from common.loader import TensorLoader, split
from common.plots import plot_history
from common.progress import progress
from common.runner import launch
from common.runs import Run
from common.train import check_finite, evaluate, predict
from week08_autoencoder import part1
from week08_autoencoder.plots import latent_maps, reconstruction_figure


@dataclass
class Settings(BaseConfig):
    """The autoencoder's settings, shared by this lab and the self-work scripts."""

    dataset: Literal["mnist", "fashion_mnist"] = "mnist"  # 28x28 grey images (fashion: clothes)
    arch: Literal["fc", "conv"] = "fc"  # fc: fully connected layers; conv: strided convolutions
    loss: Literal["mse", "bce"] = "mse"  # reconstruction loss the network trains with
    bottleneck: Annotated[int, Range(1, 784)] = 32  # size of the latent code z
    hidden: Annotated[tuple[int, ...], Range(1, 8192)] = (512, 256)  # fc: encoder's hidden widths
    channels: Annotated[tuple[int, ...], Range(1, 512)] = (32, 64)  # conv: the two stride-2 convs
    epochs: Annotated[int, Range(1)] = 10  # passes over the training images
    batch_size: Annotated[int, Range(1)] = 128  # images per optimizer step
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 2e-3  # peak lr of AdamW's one-cycle
    val_fraction: Annotated[float, Range(0, 0.5, lo_open=True)] = 0.1  # training images held out
    train_subset: Annotated[int, Range(0)] = 0  # use only N training images, at random (0: all)

    def check(self) -> None:
        if self.arch == "conv" and len(self.channels) != 2:
            raise ConfigError(f"--channels takes two numbers for the two stride-2 convolutions "
                              f"(28 -> 14 -> 7 pixels), got {len(self.channels)}")
        if self.arch == "fc" and not self.hidden:
            raise ConfigError("--hidden needs at least one width, e.g. --hidden 512 256")


@dataclass
class Config(ResumableConfig, Settings):
    """Week 8, Part 2: a fully connected or convolutional autoencoder, its latent space, and PCA."""

    latent_points: Annotated[int, Range(10)] = 1000  # test images in the latent maps (t-SNE: slow)

    SMOKE: ClassVar[dict] = {"epochs": 8, "batch_size": 32, "hidden": (128,), "channels": (8, 16),
                             "bottleneck": 8, "lr": 1e-2, "latent_points": 100}
    RESUME_MAY_CHANGE: ClassVar[tuple] = (*ResumableConfig.RESUME_MAY_CHANGE, "latent_points")


# ---- The models: encoder and decoder mirror each other ----
class Autoencoder(nn.Module):
    """The decoder ends in logits, not a sigmoid, so that BCE can be computed stably from them
    (``reconstruct`` applies the sigmoid)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)  # (B, 1, 28, 28) -> (B, bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))  # (B, bottleneck) -> (B, 1, 28, 28) logits

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self(x))


def fc_autoencoder(bottleneck: int, hidden: tuple[int, ...], pixels: int = 784) -> Autoencoder:
    """784 -> hidden[0] -> ... -> bottleneck -> ... -> hidden[0] -> 784, ReLU between layers.
    The code layer is linear (no ReLU): codes may be negative, and none can die at 0."""
    widths = [pixels, *hidden]
    encoder: list[nn.Module] = [nn.Flatten()]  # (B, 1, 28, 28) -> (B, 784)
    for a, b in zip(widths, widths[1:]):
        encoder += [nn.Linear(a, b), nn.ReLU()]  # (B, a) -> (B, b)
    encoder.append(nn.Linear(widths[-1], bottleneck))  # (B, hidden[-1]) -> (B, bottleneck)
    decoder: list[nn.Module] = [nn.Linear(bottleneck, widths[-1])]  # the mirror image
    for a, b in zip(widths[::-1][:-1], widths[::-1][1:]):
        decoder += [nn.ReLU(), nn.Linear(a, b)]
    side = int(round(pixels**0.5))
    decoder.append(nn.Unflatten(1, (1, side, side)))  # (B, 784) -> (B, 1, 28, 28)
    return Autoencoder(nn.Sequential(*encoder), nn.Sequential(*decoder))


def conv_autoencoder(bottleneck: int, channels: tuple[int, ...]) -> Autoencoder:
    """Encoder: two 3x3 stride-2 convolutions, then a linear layer to the code. Decoder: the
    mirror, with transposed convolutions doing the upsampling."""
    c1, c2 = channels
    encoder = nn.Sequential(
        nn.Conv2d(1, c1, 3, stride=2, padding=1), nn.ReLU(),  # (B, c1, 14, 14)
        nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(),  # (B, c2, 7, 7)
        nn.Flatten(), nn.Linear(c2 * 7 * 7, bottleneck))  # (B, c2*49) -> (B, bottleneck)
    decoder = nn.Sequential(
        nn.Linear(bottleneck, c2 * 7 * 7), nn.ReLU(), nn.Unflatten(1, (c2, 7, 7)),  # (B, c2, 7, 7)
        # output_padding=1: a stride-2 transposed conv could give 13 or 14 pixels; we want 14
        nn.ConvTranspose2d(c2, c1, 3, stride=2, padding=1, output_padding=1),  # (B, c1, 14, 14)
        nn.ReLU(),
        nn.ConvTranspose2d(c1, 1, 3, stride=2, padding=1, output_padding=1))  # (B, 1, 28, 28)
    return Autoencoder(encoder, decoder)


def make_model(cfg: Settings) -> Autoencoder:
    if cfg.arch == "conv":
        return conv_autoencoder(cfg.bottleneck, cfg.channels)
    return fc_autoencoder(cfg.bottleneck, cfg.hidden)


class ReconstructionLoss(nn.Module):
    """Decoder logits vs the target images, which arrive as uint8 (the loader's y is x) and are
    scaled to [0, 1] here: the same pixels on the same scale as the input."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.float() / 255
        if self.kind == "bce":
            return F.binary_cross_entropy_with_logits(logits.float(), target)
        return F.mse_loss(torch.sigmoid(logits.float()), target)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]: the network's input scale (and PCA's, and the MSE's)."""
    return x.float() / 255


# ---- Data: the images are their own targets ----
def load_images(cfg: Settings) -> ImageData:
    data = load(cfg.dataset, cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)
    return subset(data, cfg.train_subset, cfg.seed)  # N drawn at random (0: all)


def make_loaders(cfg: Settings, data: ImageData, device: torch.device):
    """(train, validation, test) batches of (image, the same image); validation is held out of
    the training images and watched every epoch; the test images are used once, at the end."""
    x_train, y_train, x_val, _ = split(data.x_train, data.y_train, cfg.val_fraction, cfg.seed)
    if len(x_val) == 0:
        raise ConfigError(f"--val-fraction {cfg.val_fraction} holds out no training image")
    if len(x_train) < cfg.batch_size:  # drop_last: an epoch would have no batch at all
        raise ConfigError(f"--batch-size {cfg.batch_size} is more than the {len(x_train)} "
                          "training images")
    train = TensorLoader(x_train, x_train, cfg.batch_size, shuffle=True, drop_last=True,
                         transform=to_unit, device=device, seed=cfg.seed)
    val = TensorLoader(x_val, x_val, 1024, transform=to_unit, device=device)
    test = TensorLoader(data.x_test, data.x_test, 1024, transform=to_unit, device=device)
    return train, val, test


def pixels(x: torch.Tensor) -> np.ndarray:
    """uint8 images -> float64 rows in [0, 1] for Part 1's NumPy PCA."""
    return x.reshape(len(x), -1).numpy().astype(np.float64) / 255


# ---- Training: the loop, written out ----
def train_one_epoch(model: Autoencoder, train: TensorLoader, optimizer: torch.optim.Optimizer,
                    scheduler, loss_fn: ReconstructionLoss) -> dict:
    """One pass over the training images; the mean reconstruction loss over it."""
    model.train()
    total = torch.zeros((), device=train.x.device)
    for x, target in progress(train, "train"):  # x: (B, 1, 28, 28) in [0, 1]; target: x as uint8
        with autocast(x.device):  # bf16 on CUDA; a no-op on the CPU
            logits = model(x)  # (B, 1, 28, 28): the rebuild, before its sigmoid
            loss = loss_fn(logits, target)  # the image is its own target: no labels anywhere
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()  # one-cycle is planned in batches: step it after every batch
        total += loss.detach() * len(x)
    return {"train_loss": (total / (len(train) * train.batch_size)).item()}  # drop_last: all full


def train_autoencoder(cfg: Settings, train: TensorLoader, val: TensorLoader, device: torch.device,
                      run: Run, checkpoints: bool = True) -> Autoencoder:
    """A fresh autoencoder (or the checkpoint's, on --resume) trained with AdamW and a one-cycle
    learning rate, one metrics row per epoch in ``run``. The self-work sweeps cannot resume, so
    they pass ``checkpoints=False`` and keep no checkpoint that would suggest otherwise."""
    seed_everything(cfg.seed)  # the same initial weights whatever ran before
    model = prepare_model(make_model(cfg), device, channels_last=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, pct_start=0.2,
                                                    total_steps=cfg.epochs * len(train))
    loss_fn = ReconstructionLoss(cfg.loss)
    start = run.restore(model, optimizer, scheduler)["epoch"]  # 0, or the checkpoint's epoch
    for epoch in range(start + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        train.set_epoch(epoch)  # this epoch's shuffle, the same after a resume
        row = train_one_epoch(model, train, optimizer, scheduler, loss_fn)
        check_finite(row["train_loss"], epoch)  # NaN/inf: stop, keeping the last checkpoint
        row["val_loss"] = evaluate(model, val, loss_fn)["loss"]
        run.log(show=True, epoch=epoch, **row, lr=scheduler.get_last_lr()[0],
                epoch_time_s=round(time.perf_counter() - t0, 3))
        if checkpoints:
            run.save_checkpoint(model, optimizer, scheduler, epoch=epoch)  # Ctrl-C resumes here
    return model


# ---- The test images, once: the autoencoder against PCA ----
def reconstruction_mse(model: Autoencoder, batches: TensorLoader) -> float:
    """Mean squared error per pixel, pixels in [0, 1], whatever loss the model trained with."""
    return evaluate(model, batches, ReconstructionLoss("mse"))["loss"]


def reconstructions(model: Autoencoder, x: torch.Tensor, device: torch.device) -> np.ndarray:
    """The autoencoder's rebuild of uint8 images ``x``, as float rows in [0, 1]."""
    logits, _ = predict(model, TensorLoader(x, x, 1024, transform=to_unit, device=device))
    return torch.sigmoid(logits).reshape(len(x), -1).numpy()


def encode_all(model: Autoencoder, x: torch.Tensor, device: torch.device) -> np.ndarray:
    """Latent codes of uint8 images ``x``, as a float64 array (N, bottleneck)."""
    codes, _ = predict(model.encoder, TensorLoader(x, x, 1024, transform=to_unit, device=device))
    return codes.numpy().astype(np.float64)


def pca_at(x_train: torch.Tensor, x_test: torch.Tensor, k: int) -> tuple[float, np.ndarray, float]:
    """PCA fitted on the training images (Part 1's covariance route: faster than the SVD of a
    54,000 x 784 matrix, the same subspace): the test MSE per pixel from k components, the
    rebuilt images, and the MSE of the mean training image alone (k = 0: what any code beats)."""
    pca = part1.pca_eig(pixels(x_train))
    test = pixels(x_test)
    rebuilt = pca.reconstruct(test, k)
    return float(np.mean((test - rebuilt) ** 2)), rebuilt, float(np.mean((test - pca.mean) ** 2))


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = load_images(cfg)
    train, val, test = make_loaders(cfg, data, device)
    run = Run.start(cfg, __file__, device)  # after every check: a bad setting leaves no run folder
    print(f"{cfg.arch} autoencoder, bottleneck {cfg.bottleneck}, {cfg.loss} loss; train "
          f"{len(train.x)}, validation {len(val.x)}, test {len(test.x)} images ({data.name})")
    model = train_autoencoder(cfg, train, val, device, run)
    parameters = sum(p.numel() for p in model.parameters())
    plot_history(run.rows, run.path("curves.png"), title=f"{cfg.arch} autoencoder, {cfg.loss} loss")

    # The test images, once: the autoencoder vs PCA with as many components as the code has.
    ae_mse = reconstruction_mse(model, test)
    pca_mse, pca_rebuilt, mean_mse = pca_at(train.x.cpu(), data.x_test, cfg.bottleneck)
    print(f"test MSE per pixel (pixels in [0, 1], {len(data.x_test)} test images): autoencoder "
          f"{ae_mse:.5f}, PCA with {cfg.bottleneck} components {pca_mse:.5f} (ratio "
          f"{ae_mse / pca_mse:.2f}); the mean image alone: {mean_mse:.5f}")
    shown, k = data.x_test[:10], cfg.bottleneck
    rebuilt = {"original": pixels(shown), f"AE ({k})": reconstructions(model, shown, device),
               f"PCA ({k})": pca_rebuilt[:10]}
    reconstruction_figure(rebuilt, run.path("reconstructions.png"), f"test images rebuilt from {k} "
                          f"numbers: MSE AE {ae_mse:.4f}, PCA {pca_mse:.4f}")

    # The latent space: a subsample of the test codes, coloured by the labels the model never saw.
    n = min(cfg.latent_points, len(data.x_test))
    codes = encode_all(model, data.x_test[:n], device)
    latent_maps(codes, data.y_test[:n].numpy(), cfg.seed, run.path("latent_space.png"),
                f"{cfg.bottleneck}-d codes of {n} test images ({data.name})")
    last, train_time = run.rows[-1], sum(r["epoch_time_s"] for r in run.rows)
    return run.finish(test_mse=ae_mse, pca_test_mse=pca_mse, ae_over_pca=ae_mse / pca_mse,
                      mean_image_mse=mean_mse, val_loss=last["val_loss"],
                      train_loss=last["train_loss"], epochs_done=last["epoch"],
                      parameters=parameters, bottleneck=cfg.bottleneck, arch=cfg.arch,
                      loss=cfg.loss, train_time_s=round(train_time, 2))


if __name__ == "__main__":
    launch(main, Config)
