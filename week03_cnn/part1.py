"""Week 3, Part 1: 2-D convolution and max-pooling from scratch in NumPy, forward and backward.

Run: python week03_cnn/part1.py [--smoke] [--help]

Shapes (PyTorch's NCHW layout throughout):
    x  (N, C, H, W)     a batch of N images with C channels
    w  (F, C, KH, KW)   F filters, each looking at all C channels through a KH x KW window
    b  (F,)             one bias per filter
    y  (N, F, OH, OW)   one feature map per filter, OH = floor((H + 2p - KH) / s) + 1

The forward pass (what deep-learning libraries call convolution is cross-correlation: the
kernel is not flipped):

    y[n, f, i, j] = b[f] + sum_{c, u, v} xp[n, c, i*s + u, j*s + v] * w[f, c, u, v]

where xp is x zero-padded by p pixels on every side and s is the stride. Every output cell
is the dot product of one filter with one window of the input: "local receptive field"
(a window, not the whole image) and "parameter sharing" (the same w at every position).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, ClassVar

import matplotlib.pyplot as plt
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from common.config import BaseConfig, Range
from common.data import load
from common.device import pick_device, seed_everything
from common.errors import DataUnavailable
from common.plots import save
from common.runner import launch
from common.runs import Run


@dataclass
class Config(BaseConfig):
    """Week 3, Part 1: convolution and max-pooling in NumPy, a worked example, edge filters."""

    image_index: Annotated[int, Range(0)] = 0  # which test image the edge filters are applied to
    timing_batch: Annotated[int, Range(1, 256)] = 8  # batch of the loops-vs-im2col timing (3x32x32)
    SMOKE: ClassVar[dict] = {"timing_batch": 2}
    UNUSED: ClassVar[tuple] = ('device',)  # NumPy on the CPU: no --device


# ----------------------------------------------------------------------------------------
# Output size
# ----------------------------------------------------------------------------------------
def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """OH = floor((H + 2p - k) / s) + 1.

    The padded input has H + 2p pixels; the window's first position covers pixels 0..k-1 and
    there are floor((H + 2p - k) / s) further steps of s pixels before it would run off the end.
    """
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise ValueError(f"a {kernel}-wide window does not fit in {size} pixels "
                         f"with padding {padding}")
    return out


def pad_images(x: np.ndarray, padding: int, value: float = 0.0) -> np.ndarray:
    """Pad the last two axes (H, W) by ``padding`` on every side."""
    if padding == 0:
        return x
    pad = (padding, padding)
    return np.pad(x, ((0, 0), (0, 0), pad, pad), constant_values=value)


# ----------------------------------------------------------------------------------------
# Convolution with plain loops: read these next to the formulas
# ----------------------------------------------------------------------------------------
def conv2d_forward_loops(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int = 1,
                         padding: int = 0) -> np.ndarray:
    """y[n, f, i, j] = b[f] + sum_{c,u,v} xp[n, c, i*s + u, j*s + v] * w[f, c, u, v]."""
    n_images, _, height, width = x.shape
    n_filters, _, kh, kw = w.shape
    oh = conv_output_size(height, kh, stride, padding)
    ow = conv_output_size(width, kw, stride, padding)
    xp = pad_images(x, padding)
    y = np.zeros((n_images, n_filters, oh, ow), dtype=np.result_type(x, w))
    for n in range(n_images):
        for f in range(n_filters):
            for i in range(oh):
                for j in range(ow):
                    i0, j0 = i * stride, j * stride
                    window = xp[n, :, i0:i0 + kh, j0:j0 + kw]  # (C, KH, KW)
                    y[n, f, i, j] = np.sum(window * w[f]) + b[f]
    return y


def conv2d_backward_loops(dy: np.ndarray, x: np.ndarray, w: np.ndarray, stride: int = 1,
                          padding: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of a loss L given dy = dL/dy (same shape as y). Each y[n, f, i, j] touched
    one window of xp and all of w[f], so by the chain rule:

        db[f]             = sum_{n,i,j} dy[n, f, i, j]
        dw[f, c, u, v]    = sum_{n,i,j} dy[n, f, i, j] * xp[n, c, i*s + u, j*s + v]
        dxp[n, c, i*s + u, j*s + v] += dy[n, f, i, j] * w[f, c, u, v]     (for every n, f, i, j)

    and dx is dxp with the padding cut off (padded zeros are constants, not inputs).
    Windows overlap when s < k, so dxp accumulates (+=): a pixel in several windows gets
    gradient from each of them.
    """
    n_images, n_filters, oh, ow = dy.shape
    kh, kw = w.shape[2:]
    xp = pad_images(x, padding)
    dxp, dw = np.zeros_like(xp, dtype=np.result_type(x, w)), np.zeros_like(w)
    db = np.zeros(n_filters, dtype=dy.dtype)
    for n in range(n_images):
        for f in range(n_filters):
            for i in range(oh):
                for j in range(ow):
                    rows = slice(i * stride, i * stride + kh)
                    cols = slice(j * stride, j * stride + kw)
                    db[f] += dy[n, f, i, j]
                    dw[f] += dy[n, f, i, j] * xp[n, :, rows, cols]
                    dxp[n, :, rows, cols] += dy[n, f, i, j] * w[f]
    dx = dxp[:, :, padding:padding + x.shape[2], padding:padding + x.shape[3]]
    return dx, dw, db


# ----------------------------------------------------------------------------------------
# Convolution vectorized: im2col with stride tricks, then one matrix multiply
# ----------------------------------------------------------------------------------------
def windows(x: np.ndarray, kh: int, kw: int, stride: int) -> np.ndarray:
    """Every KH x KW window of x (N, C, H, W) as a view of shape (N, C, OH, OW, KH, KW).

    ``sliding_window_view`` copies nothing: it makes a view whose strides step through the
    same memory, so window (i, j) starts s*i rows and s*j columns into the image.
    """
    return sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]


def im2col(x: np.ndarray, kh: int, kw: int, stride: int, padding: int) -> np.ndarray:
    """Rows = output positions (n, i, j), columns = window entries (c, u, v):
    shape (N*OH*OW, C*KH*KW). Convolution becomes ``cols @ w.reshape(F, -1).T``."""
    win = windows(pad_images(x, padding), kh, kw, stride)  # (N, C, OH, OW, KH, KW)
    n, c, oh, ow = win.shape[:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)


def col2im(cols: np.ndarray, x_shape: tuple[int, ...], kh: int, kw: int, stride: int,
           padding: int) -> np.ndarray:
    """The adjoint of im2col: add each column entry back onto the pixel it was copied from.

    Loop over the KH*KW kernel offsets (u, v) only: for a fixed offset the pixels touched by
    all windows form one strided slice of the image, so each step is a vectorized +=.
    """
    n, c, height, width = x_shape
    oh = conv_output_size(height, kh, stride, padding)
    ow = conv_output_size(width, kw, stride, padding)
    patches = cols.reshape(n, oh, ow, c, kh, kw)
    dxp = np.zeros((n, c, height + 2 * padding, width + 2 * padding), dtype=cols.dtype)
    for u in range(kh):
        for v in range(kw):
            patch = patches[:, :, :, :, u, v].transpose(0, 3, 1, 2)  # (N, C, OH, OW)
            dxp[:, :, u:u + stride * oh:stride, v:v + stride * ow:stride] += patch
    return dxp[:, :, padding:padding + height, padding:padding + width]


def conv2d_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int = 1, padding: int = 0,
                   ) -> np.ndarray:
    """The same y as ``conv2d_forward_loops``, as one matrix product: Y = cols @ W^T + b."""
    n, _, height, width = x.shape
    n_filters, _, kh, kw = w.shape
    oh = conv_output_size(height, kh, stride, padding)
    ow = conv_output_size(width, kw, stride, padding)
    cols = im2col(x, kh, kw, stride, padding)  # (N*OH*OW, C*KH*KW)
    y = cols @ w.reshape(n_filters, -1).T + b  # (N*OH*OW, F)
    return y.reshape(n, oh, ow, n_filters).transpose(0, 3, 1, 2)


def conv2d_backward(dy: np.ndarray, x: np.ndarray, w: np.ndarray, stride: int = 1, padding: int = 0,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of Y = cols @ W^T + b is the backward of a linear layer, plus col2im:

        dW = dY^T @ cols,  db = column sums of dY,  dcols = dY @ W,  dx = col2im(dcols)
    """
    n_filters, _, kh, kw = w.shape
    dy_rows = dy.transpose(0, 2, 3, 1).reshape(-1, n_filters)  # (N*OH*OW, F), rows match im2col's
    cols = im2col(x, kh, kw, stride, padding)
    dw = (dy_rows.T @ cols).reshape(w.shape)
    db = dy_rows.sum(axis=0)
    dx = col2im(dy_rows @ w.reshape(n_filters, -1), x.shape, kh, kw, stride, padding)
    return dx, dw, db


# ----------------------------------------------------------------------------------------
# Max-pooling
# ----------------------------------------------------------------------------------------
def maxpool2d_forward(x: np.ndarray, kernel: int = 2, stride: int | None = None, padding: int = 0,
                      ) -> tuple[np.ndarray, np.ndarray]:
    """y[n, c, i, j] = max_{u,v} xp[n, c, i*s + u, j*s + v], each channel on its own.

    Returns y and, for the backward pass, the flat index (into the k*k window) of each max.
    Padding is with -inf, as in PyTorch, so a padded cell never wins.
    """
    stride = stride or kernel
    xp = pad_images(x, padding, value=-np.inf)
    win = windows(xp, kernel, kernel, stride)  # (N, C, OH, OW, k, k)
    flat = win.reshape(*win.shape[:4], kernel * kernel)
    argmax = flat.argmax(axis=-1)
    return np.take_along_axis(flat, argmax[..., None], axis=-1)[..., 0], argmax


def maxpool2d_backward(dy: np.ndarray, argmax: np.ndarray, x_shape: tuple[int, ...],
                       kernel: int = 2, stride: int | None = None, padding: int = 0) -> np.ndarray:
    """The max is a switch: dL/dx is dy at the pixel that won each window and 0 elsewhere.

    Overlapping windows (s < k) can pick the same winner, so gradients are added with
    ``np.add.at``, which (unlike ``a[idx] += v``) accumulates repeated indices.
    """
    stride = stride or kernel
    n, c, height, width = x_shape
    _, _, oh, ow = dy.shape
    # Row and column (in the padded image) of each window's winner.
    rows = np.arange(oh).reshape(1, 1, oh, 1) * stride + argmax // kernel
    cols = np.arange(ow).reshape(1, 1, 1, ow) * stride + argmax % kernel
    dxp = np.zeros((n, c, height + 2 * padding, width + 2 * padding), dtype=dy.dtype)
    batch = np.arange(n).reshape(n, 1, 1, 1)
    channel = np.arange(c).reshape(1, c, 1, 1)
    np.add.at(dxp, (batch, channel, rows, cols), dy)
    return dxp[:, :, padding:padding + height, padding:padding + width]


# ----------------------------------------------------------------------------------------
# The "on paper" exercise: one small convolution, cell by cell
# ----------------------------------------------------------------------------------------
def worked_example() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 5x5 image and a 3x3 kernel (stride 1, no padding -> a 3x3 output), printed window by
    window with the dot product written out, so you can check each number by hand."""
    image = np.array([[1, 2, 0, 1, 3],
                      [0, 1, 3, 2, 1],
                      [2, 0, 1, 0, 2],
                      [1, 3, 2, 1, 0],
                      [0, 1, 0, 2, 1]], dtype=np.float64)
    kernel = np.array([[1, 0, -1],
                       [2, 0, -2],
                       [1, 0, -1]], dtype=np.float64)  # Sobel x: bright on the left -> positive
    print("\n=== A convolution on paper: 5x5 input, 3x3 kernel (Sobel x), stride 1, padding 0 ===")
    print(f"output size = floor((5 + 2*0 - 3) / 1) + 1 = {conv_output_size(5, 3)}")
    print("input:\n" + _grid(image) + "\nkernel:\n" + _grid(kernel))
    out = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            window = image[i:i + 3, j:j + 3]
            terms = " + ".join(f"{a:g}*{k:g}" for a, k in zip(window.ravel(), kernel.ravel())
                               if k != 0)
            out[i, j] = np.sum(window * kernel)
            print(f"\ny[{i},{j}]: window rows {i}..{i + 2}, cols {j}..{j + 2}\n"
                  f"{_grid(window, indent=4)}")
            print(f"    = {terms}  (zero-weight terms skipped) = {out[i, j]:g}")
    print("\noutput:\n" + _grid(out))
    check = conv2d_forward_loops(image[None, None], kernel[None, None], np.zeros(1))[0, 0]
    assert np.array_equal(out, check), "the worked example disagrees with conv2d_forward_loops"
    return image, kernel, out


def _grid(a: np.ndarray, indent: int = 2) -> str:
    return "\n".join(" " * indent + " ".join(f"{v:4g}" for v in row) for row in a)


# ----------------------------------------------------------------------------------------
# What a 3x3 filter does to a real image
# ----------------------------------------------------------------------------------------
EDGE_FILTERS = {
    "Sobel x (vertical edges)": np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=np.float64),
    "Sobel y (horizontal edges)": np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=np.float64),
    "Laplacian (2nd derivative)": np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64),
}


def sample_image(cfg: Config) -> tuple[np.ndarray, str]:
    """One grey image in [0, 1]: an MNIST test digit when the data root has MNIST (the
    synthetic twin under --smoke), else one of scikit-learn's bundled 8x8 digits, enlarged."""
    try:
        data = load("mnist", cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)
        index = cfg.image_index % len(data.x_test)
        image = data.x_test[index, 0].numpy().astype(np.float64) / 255
        return image, f"{data.name} test image {index}"
    except DataUnavailable as e:
        print(f"(no MNIST: {str(e).split('(')[0].strip()}; "
              "using scikit-learn's bundled digits instead)")
    digits = load("digits")
    index = cfg.image_index % len(digits.x_test)
    small = digits.x_test[index].numpy().reshape(8, 8).astype(np.float64) / 16
    return np.kron(small, np.ones((4, 4))), f"sklearn digits test image {index} (8x8, shown 4x)"


def plot_edge_filters(image: np.ndarray, title: str, path) -> dict[str, np.ndarray]:
    """Convolve ``image`` with each edge filter (padding 1 keeps the size) and plot the maps:
    red = positive response, blue = negative, white = flat regions (no edge)."""
    maps = {}
    for name, kernel in EDGE_FILTERS.items():
        maps[name] = conv2d_forward(image[None, None], kernel[None, None], np.zeros(1),
                                    padding=1)[0, 0]
    gx, gy = maps["Sobel x (vertical edges)"], maps["Sobel y (horizontal edges)"]
    maps["|gradient| = sqrt(gx^2 + gy^2)"] = np.sqrt(gx**2 + gy**2)
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(3.0 * (len(maps) + 1), 3.3))
    axes[0].imshow(image, cmap="gray")
    axes[0].set_title("input", fontsize=9)
    for ax, (name, response) in zip(axes[1:], maps.items()):
        if response.min() < 0:  # signed response: symmetric colour scale around 0
            limit = np.abs(response).max() + 1e-12
            ax.imshow(response, cmap="RdBu_r", vmin=-limit, vmax=limit)
        else:
            ax.imshow(response, cmap="magma")
        ax.set_title(name, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    save(fig, path)
    return maps


# ----------------------------------------------------------------------------------------
# Loops vs vectorized
# ----------------------------------------------------------------------------------------
def time_call(fn, *args, repeats: int = 3) -> float:
    """Best of ``repeats`` wall times in seconds (the best is the least disturbed by other jobs)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device("cpu")  # NumPy only
    image, source = sample_image(cfg)
    run = Run.start(cfg, __file__, device)

    worked_example()

    print(f"\n=== Edge filters on {source} ===")
    maps = plot_edge_filters(image, source, run.path("edge_filters.png"))
    for name, response in maps.items():
        print(f"{name:40s} min {response.min():7.3f}  max {response.max():7.3f}")

    # Loops vs im2col on a CIFAR-sized batch: same numbers, very different speed.
    rng = np.random.default_rng(cfg.seed)
    x = rng.standard_normal((cfg.timing_batch, 3, 32, 32))
    w, b = rng.standard_normal((16, 3, 3, 3)), rng.standard_normal(16)
    dy = rng.standard_normal((cfg.timing_batch, 16, 32, 32))
    print(f"\n=== Loops vs vectorized: x {x.shape}, w {w.shape}, stride 1, padding 1 ===")
    cases = {
        "forward": (conv2d_forward_loops, conv2d_forward, (x, w, b, 1, 1)),
        "backward": (conv2d_backward_loops, conv2d_backward, (dy, x, w, 1, 1)),
    }
    summary = {}
    for what, (loops, vectorized, args) in cases.items():
        start = time.perf_counter()
        slow = loops(*args)  # the loops are slow enough to time once
        t_loops = time.perf_counter() - start
        fast, t_vec = vectorized(*args), time_call(vectorized, *args)
        if what == "forward":  # forward returns one array, backward three (dx, dw, db)
            slow, fast = (slow,), (fast,)
        max_diff = max(float(np.abs(a - b).max()) for a, b in zip(slow, fast))
        print(f"{what:8s}  loops {t_loops * 1e3:8.1f} ms  vectorized {t_vec * 1e3:7.2f} ms  "
              f"speed-up {t_loops / t_vec:6.0f}x  max |difference| {max_diff:.1e}")
        run.log(step=what, loops_ms=t_loops * 1e3, vectorized_ms=t_vec * 1e3,
                speedup=t_loops / t_vec, max_abs_diff=max_diff)
        summary[f"{what}_speedup"] = round(t_loops / t_vec, 1)
        summary[f"{what}_max_abs_diff"] = max_diff

    # Max-pooling: forward picks the max of each window, backward sends the gradient there.
    pooled, argmax = maxpool2d_forward(x, kernel=2)
    dx_pool = maxpool2d_backward(np.ones_like(pooled), argmax, x.shape, kernel=2)
    reached = int((dx_pool != 0).sum())
    print(f"\nmax-pool 2x2: {x.shape} -> {pooled.shape}; gradient reaches {reached} of "
          f"{x.size} inputs (one per window: {pooled.size})")
    return run.finish(**summary, pool_grad_nonzero=reached, pool_windows=int(pooled.size))


if __name__ == "__main__":
    launch(main, Config)
