"""Week 6, Part 1: text as token ids, embeddings, and an RNN and an LSTM from scratch in NumPy,
forward and backpropagation through time, and the vanishing gradient measured.

Run: python week06_rnn/part1.py [--smoke] [--help]

Shapes (batch first, as ``nn.RNN(..., batch_first=True)``):
    ids  (N, T)       token ids, right-padded with <pad> = 0
    x    (N, T, D)    their embeddings: row ids[n, t] of the embedding matrix E (V, D)
    h    (N, T, H)    the hidden state after every step; h[:, -1] is the summary of the sequence

A recurrent network applies ONE cell at every step, with the same weights, to the current
input and the previous state. Unrolled over T steps it is a T-layer network whose layers
share their weights; backpropagation through time (BPTT) is ordinary backpropagation
through that unrolled graph, summing each shared weight's gradient over the steps.

Weights follow PyTorch's layout, so tests can load them into ``nn.RNN`` / ``nn.LSTM``:
    W_ih (G*H, D), W_hh (G*H, H), b_ih (G*H,), b_hh (G*H,)   with G = 1 (RNN) or 4 (LSTM)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import matplotlib.pyplot as plt
import numpy as np

from common.config import BaseConfig, Range
from common.device import pick_device, seed_everything
from common.plots import save
from common.runner import launch
from common.runs import Run
from week06_rnn.tokens import PAD, Vocab, tokenize


@dataclass
class Config(BaseConfig):
    """Week 6, Part 1: tokens, embeddings, RNN and LSTM with BPTT in NumPy, vanishing gradients."""

    steps: Annotated[int, Range(2, 2000)] = 100  # sequence length for the vanishing gradient
    hidden: Annotated[int, Range(1, 512)] = 32  # hidden state size of the measured RNN and LSTM
    forget_bias: Annotated[float, Range(-10, 10)] = 1.0  # added to the LSTM forget bias (advice: 1)
    SMOKE: ClassVar[dict] = {"steps": 40, "hidden": 16}
    UNUSED: ClassVar[tuple] = ("device", "data_dir")  # NumPy on the CPU, no data set


# ----------------------------------------------------------------------------------------
# Embeddings: a lookup table, and its gradient
# ----------------------------------------------------------------------------------------
def embedding_forward(E: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """x[n, t] = E[ids[n, t]]: the same as one_hot(ids) @ E, without building the one-hots."""
    return E[ids]


def embedding_backward(dx: np.ndarray, ids: np.ndarray, vocab_size: int,
                       padding_idx: int | None = PAD) -> np.ndarray:
    """dL/dE[v] = sum over every position (n, t) with ids[n, t] == v of dL/dx[n, t].

    A scatter-add: a word used 5 times in the batch collects 5 gradients, and only the rows of
    words in the batch are nonzero (which is why ``nn.Embedding(sparse=True)`` exists).
    ``np.add.at`` accumulates repeated indices; ``dE[ids] += dx`` would keep only one of them.
    The padding row gets no gradient, so <pad>'s vector stays as it was (zero), as
    ``padding_idx`` does in torch.
    """
    dE = np.zeros((vocab_size, dx.shape[-1]), dtype=dx.dtype)
    np.add.at(dE, ids.reshape(-1), dx.reshape(-1, dx.shape[-1]))
    if padding_idx is not None:
        dE[padding_idx] = 0.0
    return dE


# ----------------------------------------------------------------------------------------
# Vanilla RNN (Elman): h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)
# ----------------------------------------------------------------------------------------
def rnn_forward(x: np.ndarray, h0: np.ndarray, W_ih, W_hh, b_ih, b_hh) -> np.ndarray:
    """All hidden states h (N, T, H) of a tanh RNN:
    h_t = tanh(x_t W_ih^T + h_{t-1} W_hh^T + b_ih + b_hh)."""
    N, T, _ = x.shape
    h, prev = np.empty((N, T, W_hh.shape[0])), h0
    for t in range(T):
        prev = np.tanh(x[:, t] @ W_ih.T + prev @ W_hh.T + b_ih + b_hh)
        h[:, t] = prev
    return h


def rnn_backward(dh: np.ndarray, x: np.ndarray, h0: np.ndarray, h: np.ndarray,
                 W_ih, W_hh) -> dict[str, np.ndarray]:
    """Backpropagation through time for ``rnn_forward``.

    ``dh`` (N, T, H) is dL/dh_t from outside (a loss on every output, or only on the last).
    Going backwards, the gradient reaching h_t is its own ``dh[:, t]`` plus what flows back
    from step t+1. Through the tanh (tanh' = 1 - h^2) it becomes the pre-activation gradient

        da_t = (dh_t + carry_t) * (1 - h_t^2)        carry_{t-1} = da_t W_hh

    and every shared weight sums its gradient over the steps:
        dW_ih = sum_t da_t^T x_t,  dW_hh = sum_t da_t^T h_{t-1},  db = sum_t da_t,
        dx_t = da_t W_ih.
    Each step back multiplies by W_hh^T diag(1 - h^2): T steps multiply T such factors, the
    product that makes gradients vanish (factors < 1) or explode (> 1).
    """
    N, T, _ = x.shape
    grads = {"x": np.zeros_like(x), "W_ih": np.zeros_like(W_ih), "W_hh": np.zeros_like(W_hh),
             "b": np.zeros(W_hh.shape[0])}
    carry = np.zeros_like(h0)
    for t in reversed(range(T)):
        prev = h[:, t - 1] if t > 0 else h0
        da = (dh[:, t] + carry) * (1.0 - h[:, t] ** 2)
        grads["x"][:, t] = da @ W_ih
        grads["W_ih"] += da.T @ x[:, t]
        grads["W_hh"] += da.T @ prev
        grads["b"] += da.sum(0)
        carry = da @ W_hh
    grads["h0"] = carry
    return grads  # b_ih and b_hh are added together, so both get grads["b"]


# ----------------------------------------------------------------------------------------
# LSTM: gates decide what to forget, what to write, what to show
# ----------------------------------------------------------------------------------------
def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + e^-z), without overflow for large |z|


def lstm_forward(x: np.ndarray, h0: np.ndarray, c0: np.ndarray, W_ih, W_hh, b_ih, b_hh):
    """An LSTM over all steps (PyTorch's gate order i, f, g, o in the rows of W):

        [i; f; g; o] = x_t W_ih^T + h_{t-1} W_hh^T + b_ih + b_hh
        i, f, o = sigmoid(.)      input, forget, output gates in (0, 1)
        g = tanh(.)               the candidate to write
        c_t = f * c_{t-1} + i * g          the cell: kept PLUS written (an addition, not a product)
        h_t = o * tanh(c_t)                what the cell shows

    Returns h (N, T, H) and a cache for the backward pass (gates and cells of every step)."""
    N, T, _ = x.shape
    H = W_hh.shape[1]
    h, c = np.empty((N, T, H)), np.empty((N, T, H))
    gates = np.empty((N, T, 4, H))
    h_prev, c_prev = h0, c0
    for t in range(T):
        z = (x[:, t] @ W_ih.T + h_prev @ W_hh.T + b_ih + b_hh).reshape(N, 4, H)
        i, f, g, o = sigmoid(z[:, 0]), sigmoid(z[:, 1]), np.tanh(z[:, 2]), sigmoid(z[:, 3])
        c_prev = f * c_prev + i * g
        h_prev = o * np.tanh(c_prev)
        gates[:, t] = np.stack([i, f, g, o], axis=1)
        h[:, t], c[:, t] = h_prev, c_prev
    return h, (x, h0, c0, h, c, gates)


def lstm_backward(dh: np.ndarray, cache, W_ih, W_hh,
                  dc_last: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """BPTT for ``lstm_forward``; ``dh`` (N, T, H) is dL/dh_t from outside, ``dc_last`` dL/dc_T.

    Two paths carry gradient back in time: through h (dh_{t-1} += dz_t W_hh, every step again
    multiplied by weights and gate derivatives) and through the cell:

        dc_t    = dh_t * o * (1 - tanh(c_t)^2) + dc from step t+1
        dc_{t-1} = dc_t * f                          <- only an elementwise forget gate

    When the forget gate is near 1 the cell path passes the gradient back almost unchanged:
    that is how an LSTM remembers over long distances. The gates' pre-activation gradients:
        di = dc g i(1-i),  df = dc c_{t-1} f(1-f),  dg = dc i (1-g^2),  do = dh tanh(c) o(1-o)
    """
    x, h0, c0, h, c, gates = cache
    N, T, _ = x.shape
    grads = {"x": np.zeros_like(x), "W_ih": np.zeros_like(W_ih), "W_hh": np.zeros_like(W_hh),
             "b": np.zeros(W_hh.shape[0])}
    dh_next = np.zeros_like(h0)
    dc_next = np.zeros_like(c0) if dc_last is None else dc_last.copy()
    for t in reversed(range(T)):
        i, f, g, o = (gates[:, t, k] for k in range(4))
        c_prev = c[:, t - 1] if t > 0 else c0
        h_prev = h[:, t - 1] if t > 0 else h0
        dh_t = dh[:, t] + dh_next
        tanh_c = np.tanh(c[:, t])
        dc = dh_t * o * (1.0 - tanh_c**2) + dc_next
        # (N, 4H) in the order i, f, g, o
        dz = np.concatenate([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g**2),
                             dh_t * tanh_c * o * (1 - o)], axis=1)
        grads["x"][:, t] = dz @ W_ih
        grads["W_ih"] += dz.T @ x[:, t]
        grads["W_hh"] += dz.T @ h_prev
        grads["b"] += dz.sum(0)
        dh_next, dc_next = dz @ W_hh, dc * f
    grads["h0"], grads["c0"] = dh_next, dc_next
    return grads


def init_weights(rng: np.random.Generator, input_size: int, hidden: int,
                 gates: int) -> dict[str, np.ndarray]:
    """PyTorch's default init for nn.RNN / nn.LSTM: every weight and bias
    ~ U(-1/sqrt(H), 1/sqrt(H))."""
    k = 1.0 / np.sqrt(hidden)
    shapes = {"W_ih": (gates * hidden, input_size), "W_hh": (gates * hidden, hidden),
              "b_ih": (gates * hidden,), "b_hh": (gates * hidden,)}
    return {name: rng.uniform(-k, k, shape) for name, shape in shapes.items()}


# ----------------------------------------------------------------------------------------
# The vanishing gradient, measured
# ----------------------------------------------------------------------------------------
def gradient_through_time(cell: str, weights: dict, x: np.ndarray) -> np.ndarray:
    """||dL/dx_t|| for every step t, where L = sum(h_T): how strongly the LAST state still
    depends on the input t steps back. With factors below 1 it falls geometrically with T - t."""
    N, T, _ = x.shape
    H = weights["W_hh"].shape[1]
    h0 = np.zeros((N, H))
    dh = np.zeros((N, T, H))
    dh[:, -1] = 1.0  # a loss on the final state only, like a classifier reading h_T
    if cell == "rnn":
        h = rnn_forward(x, h0, **weights)
        grads = rnn_backward(dh, x, h0, h, weights["W_ih"], weights["W_hh"])
    else:
        _, cache = lstm_forward(x, h0, h0.copy(), **weights)
        grads = lstm_backward(dh, cache, weights["W_ih"], weights["W_hh"])
    return np.linalg.norm(grads["x"], axis=(0, 2))


def vanishing_gradient(steps: int, hidden: int, forget_bias: float, seed: int,
                       path) -> dict[str, np.ndarray]:
    """The gradient norm against the distance back in time, for an RNN at PyTorch's default
    init, an RNN with 3x larger recurrent weights (it explodes instead), and an LSTM whose forget
    gate starts mostly open (``forget_bias`` added to its bias)."""
    rng = np.random.default_rng(seed)
    D = 8
    x = rng.standard_normal((4, steps, D))
    rnn_w = init_weights(rng, D, hidden, 1)
    big = {**rnn_w, "W_hh": 3.0 * rnn_w["W_hh"]}
    lstm_w = init_weights(rng, D, hidden, 4)
    lstm_w["b_hh"][hidden:2 * hidden] += forget_bias  # rows H..2H are the forget gate
    curves = {"RNN (default init)": gradient_through_time("rnn", rnn_w, x),
              "RNN (W_hh x 3)": gradient_through_time("rnn", big, x),
              f"LSTM (forget bias +{forget_bias:g})": gradient_through_time("lstm", lstm_w, x)}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    back = np.arange(steps)[::-1]  # steps between input t and the last state
    for name, norms in curves.items():
        ax.semilogy(back, np.maximum(norms, 1e-300), label=name)
    ax.set(xlabel="steps back in time (T - t)", ylabel="||dL/dx_t||  (L = sum of h_T)",
           title="How much the last state feels input t")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save(fig, path)
    return curves


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    run = Run.start(cfg, __file__, pick_device("cpu"))

    print("=== Tokens and a vocabulary (week06_rnn/tokens.py) ===")
    corpus = ["The film wasn't good.", "A good, good film!", "Not a bad film<br />at all."]
    tokens = [tokenize(text) for text in corpus]
    vocab = Vocab.build(tokens, max_size=8)
    for text, toks in zip(corpus, tokens):
        print(f"{text!r:32} -> {toks} -> {vocab.encode(toks)}")
    print(f"vocabulary (most frequent first, capped at 8): {vocab.itos}; "
          "unknown words -> 1, padding -> 0")

    print("\n=== An embedding is a lookup; its gradient a scatter-add ===")
    rng = np.random.default_rng(cfg.seed)
    E = rng.standard_normal((len(vocab), 3))
    E[PAD] = 0.0
    ids = np.array([vocab.encode(tokens[1])])
    dx = np.ones(ids.shape + (3,))
    dE = embedding_backward(dx, ids, len(vocab))
    counts = {vocab.itos[i]: int(dE[i, 0]) for i in np.unique(ids)}
    print(f"{tokens[1]}: with dL/dx = 1 everywhere, each row of dE counts the word's uses: "
          f"{counts}")

    print("\n=== Vanishing (and exploding) gradients through time ===")
    curves = vanishing_gradient(cfg.steps, cfg.hidden, cfg.forget_bias, cfg.seed,
                                run.path("vanishing_gradient.png"))
    summary = {}
    for name, norms in curves.items():
        ratio = norms[0] / norms[-1]  # input 1 vs the last input
        key = name.split(" (")[0].lower() + ("_big" if "x 3" in name else "")
        print(f"{name:28s} ||dL/dx_1|| / ||dL/dx_T|| = {ratio:.2e}")
        summary[f"{key}_first_over_last"] = float(ratio)
        for t in range(cfg.steps):
            run.log(curve=name, steps_back=cfg.steps - 1 - t, grad_norm=float(norms[t]))
    print("An RNN at its default init forgets: after ~20 steps input t barely moves h_T "
          "(vanishing).\n"
          "Larger recurrent weights make the product of Jacobians grow instead "
          "(exploding: clip it,\n"
          "part2.py). The LSTM's cell path, c_{t-1} = f * c_t, keeps the gradient alive "
          "far longer.")
    return run.finish(**summary, vocab_size=len(vocab), steps=cfg.steps)


if __name__ == "__main__":
    launch(main, Config)
