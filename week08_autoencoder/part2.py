"""Week 8, Part 2: autoencoders on MNIST, and how they compare with PCA at the same dimension.

An autoencoder squeezes each image through a bottleneck of a few numbers (its latent code z)
and rebuilds it from them; the only teacher is the image itself:

    z = encoder(x)            (784 pixels -> bottleneck numbers)
    x_hat = decoder(z)        (bottleneck numbers -> 784 pixels, through a sigmoid into [0, 1])
    loss = reconstruction error between x_hat and x:
        mse   mean (x_hat - x)^2
        bce   mean -[x log x_hat + (1 - x) log(1 - x_hat)]   (pixels read as probabilities of "ink";
              computed from the decoder's logits, which is stable)

With linear layers and MSE, the best an autoencoder can do is PCA's subspace (Part 1); the
nonlinear encoder/decoder can bend its "plane" to follow the data, so at the same dimension it
should rebuild images better. This script measures that on the same test images, pixels in
[0, 1], as the mean squared error per pixel, whatever loss the network trained with.

Run: python week08_autoencoder/part2.py [--smoke] [--help]
     python week08_autoencoder/part2.py --arch conv --bottleneck 8 --loss bce
     python week08_autoencoder/part2.py --resume runs/week08/part2/<time>/checkpoint.pt   # after Ctrl-C
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.config import BaseConfig, Range, ResumableConfig
from common.data import ImageData, load
from common.device import pick_device, prepare_model, seed_everything
from common.errors import ConfigError, LabError
from common.loader import TensorLoader, split
from common.plots import plot_history, save
from common.runner import launch
from common.runs import Run
from common.train import fit, predict
from week08_autoencoder import part1


@dataclass
class Settings(BaseConfig):
    """The autoencoder's settings, shared by this lab and the self-work scripts."""

    dataset: Literal["mnist", "fashion_mnist"] = "mnist"  # 28x28 grey images (fashion_mnist: clothes)
    arch: Literal["fc", "conv"] = "fc"  # fc: fully connected layers; conv: strided convolutions
    loss: Literal["mse", "bce"] = "mse"  # reconstruction loss the network trains with
    bottleneck: Annotated[int, Range(1, 784)] = 32  # size of the latent code z
    hidden: Annotated[tuple[int, ...], Range(1, 8192)] = (512, 256)  # fc: widths of the encoder's hidden layers
    channels: Annotated[tuple[int, ...], Range(1, 512)] = (32, 64)  # conv: channels of the two stride-2 convs
    epochs: Annotated[int, Range(1)] = 10  # passes over the training images
    batch_size: Annotated[int, Range(1)] = 128  # images per optimizer step
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 2e-3  # peak learning rate of AdamW's one-cycle schedule
    val_fraction: Annotated[float, Range(0, 0.5, lo_open=True)] = 0.1  # share of training images held out
    train_subset: Annotated[int, Range(0)] = 0  # use only N training images, drawn at random (0: all)

    def check(self) -> None:
        if self.arch == "conv" and len(self.channels) != 2:
            raise ConfigError(f"--channels takes two numbers for the two stride-2 convolutions "
                              f"(28 -> 14 -> 7 pixels), got {len(self.channels)}")
        if self.arch == "fc" and not self.hidden:
            raise ConfigError("--hidden needs at least one width, e.g. --hidden 512 256")


@dataclass
class Config(ResumableConfig, Settings):
    """Week 8, Part 2: a fully connected or convolutional autoencoder, its latent space, and PCA."""

    latent_points: Annotated[int, Range(10)] = 1000  # test images shown in the latent-space maps (t-SNE is slow)

    SMOKE: ClassVar[dict] = {"epochs": 8, "batch_size": 32, "hidden": (128,), "channels": (8, 16), "bottleneck": 8,
                             "lr": 1e-2, "latent_points": 100}
    RESUME_MAY_CHANGE: ClassVar[tuple] = (*ResumableConfig.RESUME_MAY_CHANGE, "latent_points")


# ---- The models: encoder and decoder mirror each other ----
class Autoencoder(nn.Module):
    """``encode`` maps images (N, 1, 28, 28) in [0, 1] to codes (N, bottleneck); ``decode``
    maps codes to logits (N, 1, 28, 28); ``forward`` is both. The decoder ends in logits, not
    a sigmoid, so that BCE can be computed stably from them (``reconstruct`` applies the sigmoid)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self(x))


def fc_autoencoder(bottleneck: int, hidden: tuple[int, ...], pixels: int = 784) -> Autoencoder:
    """784 -> hidden[0] -> ... -> bottleneck -> ... -> hidden[0] -> 784, ReLU between layers.
    The code layer is linear (no ReLU): codes may be negative, and none can die at 0."""
    widths = [pixels, *hidden]
    encoder: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(widths, widths[1:]):
        encoder += [nn.Linear(a, b), nn.ReLU()]
    encoder.append(nn.Linear(widths[-1], bottleneck))
    decoder: list[nn.Module] = [nn.Linear(bottleneck, widths[-1])]
    for a, b in zip(widths[::-1][:-1], widths[::-1][1:]):
        decoder += [nn.ReLU(), nn.Linear(a, b)]
    side = int(round(pixels**0.5))
    decoder.append(nn.Unflatten(1, (1, side, side)))
    return Autoencoder(nn.Sequential(*encoder), nn.Sequential(*decoder))


def conv_autoencoder(bottleneck: int, channels: tuple[int, ...]) -> Autoencoder:
    """Encoder: two 3x3 stride-2 convolutions (28 -> 14 -> 7 pixels), then a linear layer to the
    code. Decoder: the mirror, with transposed convolutions (7 -> 14 -> 28) doing the upsampling."""
    c1, c2 = channels
    encoder = nn.Sequential(
        nn.Conv2d(1, c1, 3, stride=2, padding=1), nn.ReLU(),   # 14x14
        nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(),  # 7x7
        nn.Flatten(), nn.Linear(c2 * 7 * 7, bottleneck))
    decoder = nn.Sequential(
        nn.Linear(bottleneck, c2 * 7 * 7), nn.ReLU(), nn.Unflatten(1, (c2, 7, 7)),
        # output_padding=1: a stride-2 transposed conv could give 13 or 14 pixels; we want 14
        nn.ConvTranspose2d(c2, c1, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),  # 14x14
        nn.ConvTranspose2d(c1, 1, 3, stride=2, padding=1, output_padding=1))              # 28x28 logits
    return Autoencoder(encoder, decoder)


def make_model(cfg: Settings) -> Autoencoder:
    return conv_autoencoder(cfg.bottleneck, cfg.channels) if cfg.arch == "conv" else \
        fc_autoencoder(cfg.bottleneck, cfg.hidden)


class ReconstructionLoss(nn.Module):
    """The loss between the decoder's logits and the target image. Targets arrive as the uint8
    images themselves (the loader's ``y`` is ``x``) and are scaled to [0, 1] here, so the input
    and the target are the same pixels on the same scale."""

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
    if cfg.train_subset and cfg.train_subset < len(data.x_train):
        keep = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.train_subset]
        data = dataclasses.replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep])
    return data


def make_loaders(cfg: Settings, data: ImageData, device: torch.device):
    """(train, validation, test) batches of (image, the same image); validation is held out of
    the training images and watched every epoch; the test images are used once, at the end."""
    x_train, y_train, x_val, _ = split(data.x_train, data.y_train, cfg.val_fraction, cfg.seed)
    if len(x_val) == 0:
        raise ConfigError(f"--val-fraction {cfg.val_fraction} of {len(data.x_train)} training images holds out none")
    if len(x_train) < cfg.batch_size:
        raise LabError(f"--batch-size {cfg.batch_size} is more than the {len(x_train)} training images")
    train = TensorLoader(x_train, x_train, cfg.batch_size, shuffle=True, drop_last=True, transform=to_unit,
                         device=device, seed=cfg.seed)
    val = TensorLoader(x_val, x_val, 1024, transform=to_unit, device=device)
    test = TensorLoader(data.x_test, data.x_test, 1024, transform=to_unit, device=device)
    return train, val, test


def pixels(x: torch.Tensor) -> np.ndarray:
    """uint8 images -> float64 rows in [0, 1] for Part 1's NumPy PCA."""
    return x.reshape(len(x), -1).numpy().astype(np.float64) / 255


def train_autoencoder(cfg: Settings, train: TensorLoader, val: TensorLoader, device: torch.device,
                      log: Run | None = None, resume: str = "", callbacks=()) -> tuple[Autoencoder, list[dict]]:
    """A fresh autoencoder trained with AdamW and a one-cycle learning rate (stepped every batch)."""
    seed_everything(cfg.seed)
    model = prepare_model(make_model(cfg), device, channels_last=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.epochs * len(train),
                                                    pct_start=0.2)
    loop = fit(model, optimizer, train, val, cfg.epochs, loss_fn=ReconstructionLoss(cfg.loss), scheduler=scheduler,
               callbacks=callbacks, run=log, resume=resume)
    return model, loop.rows


@torch.inference_mode()
def reconstruction_mse(model: Autoencoder, batches: TensorLoader) -> float:
    """Mean squared error per pixel, pixels in [0, 1], over every image of ``batches``."""
    logits, targets = predict(model, batches)
    return F.mse_loss(torch.sigmoid(logits), targets.float() / 255).item()


@torch.inference_mode()
def reconstructions(model: Autoencoder, x: torch.Tensor, device: torch.device) -> np.ndarray:
    """The autoencoder's rebuild of uint8 images ``x``, as float rows in [0, 1]."""
    model.eval()
    return model.reconstruct(to_unit(x).to(device)).float().cpu().reshape(len(x), -1).numpy()


@torch.inference_mode()
def encode_all(model: Autoencoder, x: torch.Tensor, device: torch.device, batch: int = 1024) -> np.ndarray:
    """Latent codes of uint8 images ``x``, as a float64 array (N, bottleneck)."""
    model.eval()
    codes = [model.encode(to_unit(x[i:i + batch]).to(device)).float().cpu() for i in range(0, len(x), batch)]
    return torch.cat(codes).numpy().astype(np.float64)


def pca_at(x_train: torch.Tensor, x_test: torch.Tensor, k: int) -> tuple[float, np.ndarray, float]:
    """PCA fitted on the training images (Part 1's covariance route; the SVD of a 54,000 x 784
    matrix is slower and gives the same subspace): the test MSE per pixel from k components,
    the reconstructions, and the MSE of the mean training image alone (k = 0: the baseline any
    code must beat)."""
    pca = part1.pca_eig(pixels(x_train))
    test = pixels(x_test)
    rebuilt = pca.reconstruct(test, k)
    return float(np.mean((test - rebuilt) ** 2)), rebuilt, float(np.mean((test - pca.mean) ** 2))


def reconstruction_figure(rows: dict[str, np.ndarray], path, title: str):
    """One row of 28x28 images per entry (original, autoencoder, PCA ...), tiled into a single
    picture (one imshow, not one subplot per image: much faster to draw)."""
    names = list(rows)
    n = len(rows[names[0]])
    tiles = np.ones((len(names) * 30, n * 30))  # 28 pixels + a 2-pixel white border
    for r, name in enumerate(names):
        for c in range(n):
            tiles[r * 30 + 1:r * 30 + 29, c * 30 + 1:c * 30 + 29] = np.clip(rows[name][c].reshape(28, 28), 0, 1)
    fig, ax = plt.subplots(figsize=(1.0 * n + 1.2, 1.0 * len(names) + 0.6))
    ax.imshow(tiles, cmap="gray", vmin=0, vmax=1)
    ax.set_yticks([r * 30 + 15 for r in range(len(names))], names, fontsize=8)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    return save(fig, path)


def latent_maps(codes: np.ndarray, labels: np.ndarray, seed: int, path, title: str) -> dict[str, np.ndarray]:
    """The codes drawn in 2-D: PCA (a linear view: Part 1's) and t-SNE (a nonlinear one that
    keeps neighbours together but not distances: cluster sizes and gaps mean little)."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    maps = {"PCA of the codes": part1.pca_svd(codes).transform(codes, 2) if codes.shape[1] > 1
            else np.column_stack([codes[:, 0], np.zeros(len(codes))])}
    perplexity = min(30.0, (len(codes) - 1) / 3)
    # One OpenMP thread: torch and scikit-learn each bring their own OpenMP runtime, and with both
    # spinning on 2 cores this t-SNE took 60 s instead of 1.6 s (measured, 150 points).
    with threadpool_limits(limits=1, user_api="openmp"):
        # init="pca" needs 2 directions to start from: a 1-number code starts from random points
        tsne = TSNE(2, perplexity=perplexity, init="pca" if codes.shape[1] > 1 else "random", max_iter=500,
                    random_state=seed)
        maps["t-SNE of the codes"] = tsne.fit_transform(codes)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, (name, points) in zip(axes, maps.items()):
        scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=4, vmin=-0.5, vmax=9.5)
        ax.set(title=name, xticks=[], yticks=[])
    fig.colorbar(scatter, ax=axes, ticks=range(10), label="label (never seen in training)")
    fig.suptitle(title)
    save(fig, path)
    return maps


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = load_images(cfg)
    train, val, test = make_loaders(cfg, data, device)
    run = Run.start(cfg, __file__, device)  # after every check: a bad setting leaves no run folder
    model, rows = train_autoencoder(cfg, train, val, device, log=run, resume=cfg.resume)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{cfg.arch} autoencoder, bottleneck {cfg.bottleneck}, {parameters:,} parameters, {cfg.loss} loss, "
          f"train {len(train.x)}, validation {len(val.x)}, test {len(test.x)} images ({data.name})")
    plot_history(rows, run.path("curves.png"), title=f"{cfg.arch} autoencoder, {cfg.loss} loss")

    # The test images, once: the autoencoder vs PCA with as many components as the code has numbers.
    ae_mse = reconstruction_mse(model, test)
    pca_mse, pca_rebuilt, mean_mse = pca_at(train.x.cpu(), data.x_test, cfg.bottleneck)
    print(f"test reconstruction MSE per pixel (pixels in [0, 1], {len(data.x_test)} test images): "
          f"autoencoder {ae_mse:.5f}, PCA with {cfg.bottleneck} components {pca_mse:.5f} "
          f"({'autoencoder' if ae_mse < pca_mse else 'PCA'} better, ratio {ae_mse / pca_mse:.2f}); "
          f"the mean image alone: {mean_mse:.5f}")
    shown = data.x_test[:10]
    reconstruction_figure({"original": pixels(shown), f"AE ({cfg.bottleneck})": reconstructions(model, shown, device),
                           f"PCA ({cfg.bottleneck})": pca_rebuilt[:10]},
                          run.path("reconstructions.png"),
                          f"test images rebuilt from {cfg.bottleneck} numbers: MSE AE {ae_mse:.4f}, PCA {pca_mse:.4f}")

    # The latent space: a subsample of the test codes, coloured by the labels the model never saw.
    n = min(cfg.latent_points, len(data.x_test))
    codes = encode_all(model, data.x_test[:n], device)
    latent_maps(codes, data.y_test[:n].numpy(), cfg.seed, run.path("latent_space.png"),
                f"{cfg.bottleneck}-d codes of {n} test images ({data.name})")
    return run.finish(test_mse=ae_mse, pca_test_mse=pca_mse, ae_over_pca=ae_mse / pca_mse, mean_image_mse=mean_mse,
                       val_loss=rows[-1]["val_loss"], train_loss=rows[-1]["train_loss"], epochs_done=len(rows),
                       parameters=parameters, bottleneck=cfg.bottleneck, arch=cfg.arch, loss=cfg.loss,
                       train_time_s=round(sum(r["epoch_time_s"] for r in rows), 2))


if __name__ == "__main__":
    launch(main, Config)
