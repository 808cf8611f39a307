"""Week 7, Part 1: attention from scratch in NumPy, forward and backward.

Run: python week07_transformer/part1.py [--smoke] [--help]

Shapes (batch first, as ``nn.MultiheadAttention(batch_first=True)``):
    q  (..., Lq, d_k)    one query per output position
    k  (..., Lk, d_k)    one key per input position
    v  (..., Lk, d_v)    one value per input position
    out (..., Lq, d_v)   each output is an average of the values, weighted by query-key match

Scaled dot-product attention ("Attention Is All You Need", eq. 1):

    S = Q K^T / sqrt(d_k)          scores: how well query i matches key j
    P = softmax(S) over j          weights: each row sums to 1
    O = P V                        outputs: weighted averages of the values

A mask says which keys a query may look at (True = allowed, as
``F.scaled_dot_product_attention`` reads a boolean mask): a forbidden score becomes -inf before
the softmax, so its weight is exactly 0.
A *padding* mask hides the <pad> positions of short sentences; a *causal* mask hides the future
(query i sees keys j <= i), which is what lets a decoder be trained on whole sentences at once.

The script shows numerically why the 1/sqrt(d_k) is there, draws attention heat maps for a short
sentence (no mask, causal, padded) and measures how time and memory grow with sequence length.
"""

from __future__ import annotations

import math
import time
import tracemalloc
from dataclasses import dataclass
from typing import Annotated, ClassVar

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter

from common.config import BaseConfig, Range
from common.device import pick_device, seed_everything
from common.errors import ConfigError
from common.parity import max_relative_error, numerical_grad
from common.plots import save
from common.runner import launch
from common.runs import Run


@dataclass
class Config(BaseConfig):
    """Week 7, Part 1: attention, masks, multi-head attention, positional encoding in NumPy."""

    head_dim: Annotated[int, Range(1, 1024)] = 64  # d_k of the head timed for cost vs length
    lengths: tuple[int, ...] = (128, 256, 512, 1024, 2048)  # lengths L timed (L x L scores each)
    SMOKE: ClassVar[dict] = {"lengths": (128, 256, 512), "head_dim": 32}
    UNUSED: ClassVar[tuple] = ("device", "data_dir")  # NumPy on the CPU, no data set

    def check(self) -> None:
        if len(self.lengths) < 2 or any(n < 2 or n > 8192 for n in self.lengths):
            raise ConfigError("--lengths: give at least two sequence lengths, each in [2, 8192] "
                              "(the largest needs about 5 x 8 x L^2 bytes)")


# ----------------------------------------------------------------------------------------
# Softmax
# ----------------------------------------------------------------------------------------
def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """softmax(x)_j = exp(x_j - m) / sum_i exp(x_i - m), m = max_i x_i.

    Subtracting the max changes nothing mathematically (it cancels) but keeps exp() from
    overflowing. A -inf entry (a masked score) gets exactly 0.
    """
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=axis, keepdims=True)


# ----------------------------------------------------------------------------------------
# Masks (True = this query may attend to this key)
# ----------------------------------------------------------------------------------------
def causal_mask(length: int) -> np.ndarray:
    """(L, L) lower triangle: query i may see keys 0..i, never a later position."""
    return np.tril(np.ones((length, length), dtype=bool))


def padding_mask(lengths, max_len: int) -> np.ndarray:
    """(N, max_len): True for the real tokens of each sequence, False for its <pad> positions.
    As an attention mask it broadcasts as (N, 1, 1, Lk): every query ignores the pad keys."""
    return np.arange(max_len)[None, :] < np.asarray(lengths)[:, None]


# ----------------------------------------------------------------------------------------
# Scaled dot-product attention, forward and backward
# ----------------------------------------------------------------------------------------
@dataclass
class AttentionCache:
    """What the backward pass needs from the forward pass."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    p: np.ndarray  # the attention weights softmax(S)
    scale: float


def attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None,
                      scale: float | None = None) -> tuple[np.ndarray, AttentionCache]:
    """O = softmax(Q K^T * scale, masked) V with scale = 1/sqrt(d_k) by default.

    ``mask`` (broadcastable to (..., Lq, Lk)) is True where attending is allowed. Every query
    must be allowed at least one key, or its row of weights would be 0/0.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ np.swapaxes(k, -1, -2) * scale  # (..., Lq, Lk)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    p = softmax(scores)
    return p @ v, AttentionCache(q, k, v, p, scale)


def attention_backward(d_out: np.ndarray, cache: AttentionCache,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of a loss L given d_out = dL/dO, by the chain rule through O = P V, P = softmax(S):

        dV = P^T dO                       each value was used with weight P[i, j] by output i
        dP = dO V^T
        dS = P * (dP - rowsum(dP * P))    the softmax Jacobian diag(p) - p p^T, row by row
        dQ = dS K * scale,  dK = dS^T Q * scale

    A masked score had P = 0, so dS = 0 there: no gradient flows through a forbidden link.
    """
    q, k, v, p, scale = cache.q, cache.k, cache.v, cache.p, cache.scale
    dv = np.swapaxes(p, -1, -2) @ d_out
    dp = d_out @ np.swapaxes(v, -1, -2)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
    dq = ds @ k * scale
    dk = np.swapaxes(ds, -1, -2) @ q * scale
    # Broadcast inputs (e.g. one k shared by a batch of q) get their gradient summed back.
    return _unbroadcast(dq, q.shape), _unbroadcast(dk, k.shape), _unbroadcast(dv, v.shape)


def _unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    while grad.ndim > len(shape):
        grad = grad.sum(axis=0)
    for axis, size in enumerate(shape):
        if size == 1 and grad.shape[axis] != 1:
            grad = grad.sum(axis=axis, keepdims=True)
    return grad


# ----------------------------------------------------------------------------------------
# Multi-head attention: project, split into heads, attend, concatenate, project
# ----------------------------------------------------------------------------------------
def init_mha(embed_dim: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Weights of one multi-head attention layer: four (E, E) projections and their biases.
    The H heads share these matrices: head h uses columns h*d .. (h+1)*d of Q, K and V."""
    bound = 1 / math.sqrt(embed_dim)
    params = {f"w_{n}": rng.uniform(-bound, bound, (embed_dim, embed_dim)) for n in "qkvo"}
    params.update({f"b_{n}": rng.uniform(-bound, bound, embed_dim) for n in "qkvo"})
    return params


def split_heads(x: np.ndarray, num_heads: int) -> np.ndarray:
    """(N, L, E) -> (N, H, L, E/H): the E features of each position cut into H slices."""
    n, length, embed = x.shape
    return x.reshape(n, length, num_heads, embed // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(N, H, L, d) -> (N, L, H*d): the heads' outputs side by side ("concat")."""
    n, heads, length, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(n, length, heads * d)


@dataclass
class MHACache:
    query: np.ndarray
    key: np.ndarray
    value: np.ndarray
    concat: np.ndarray
    attention: AttentionCache
    num_heads: int


def mha_forward(query: np.ndarray, key: np.ndarray, value: np.ndarray,
                params: dict[str, np.ndarray], num_heads: int, key_keep: np.ndarray | None = None,
                attn_mask: np.ndarray | None = None,
                ) -> tuple[np.ndarray, np.ndarray, MHACache]:
    """MultiHead(Q, K, V) = Concat(head_1, ..., head_H) W_o^T + b_o,
    head_h = Attention(query W_q^T + b_q, key W_k^T + b_k, value W_v^T + b_v) restricted to slice h,
    each head with scale 1/sqrt(E/H).

    query (N, Lq, E); key, value (N, Lk, E). ``key_keep`` (N, Lk): True for real keys (a padding
    mask); ``attn_mask`` (Lq, Lk): True where allowed (e.g. ``causal_mask``). Returns the output
    (N, Lq, E), the weights (N, H, Lq, Lk) and the cache for ``mha_backward``.
    """
    embed = query.shape[-1]
    if embed % num_heads:
        raise ValueError(f"embed_dim {embed} is not divisible by num_heads {num_heads}")
    q = split_heads(query @ params["w_q"].T + params["b_q"], num_heads)
    k = split_heads(key @ params["w_k"].T + params["b_k"], num_heads)
    v = split_heads(value @ params["w_v"].T + params["b_v"], num_heads)
    mask = None
    if key_keep is not None:
        mask = key_keep[:, None, None, :]  # (N, 1, 1, Lk): the same for every head and query
    if attn_mask is not None:
        mask = attn_mask if mask is None else mask & attn_mask
    heads, att_cache = attention_forward(q, k, v, mask)
    concat = merge_heads(heads)
    out = concat @ params["w_o"].T + params["b_o"]
    return out, att_cache.p, MHACache(query, key, value, concat, att_cache, num_heads)


def _linear_backward(d_y: np.ndarray, x: np.ndarray,
                     w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """y = x W^T + b over (N, L, E) inputs: dx = dy W, dW = sum over positions of dy^T x,
    db = sum dy."""
    flat_dy, flat_x = d_y.reshape(-1, d_y.shape[-1]), x.reshape(-1, x.shape[-1])
    return d_y @ w, flat_dy.T @ flat_x, flat_dy.sum(axis=0)


def mha_backward(d_out: np.ndarray, params: dict[str, np.ndarray], cache: MHACache,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """dL/dquery, dL/dkey, dL/dvalue and the parameter gradients, given d_out = dL/dout: the
    output projection's backward, then un-concatenate, attention's backward per head, merge the
    heads back, and each input projection's backward. For self-attention (query = key = value
    = x), dL/dx is the sum of the three input gradients."""
    grads = {}
    d_concat, grads["w_o"], grads["b_o"] = _linear_backward(d_out, cache.concat, params["w_o"])
    dq, dk, dv = attention_backward(split_heads(d_concat, cache.num_heads), cache.attention)
    d_inputs = []
    for name, d_heads, x in (("q", dq, cache.query), ("k", dk, cache.key), ("v", dv, cache.value)):
        d_x, grads[f"w_{name}"], grads[f"b_{name}"] = _linear_backward(merge_heads(d_heads), x,
                                                                       params[f"w_{name}"])
        d_inputs.append(d_x)
    return d_inputs[0], d_inputs[1], d_inputs[2], grads


# ----------------------------------------------------------------------------------------
# Sinusoidal positional encoding
# ----------------------------------------------------------------------------------------
def positional_encoding(max_len: int, d_model: int) -> np.ndarray:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)),  PE[pos, 2i+1] = cos(pos / 10000^(2i/d)).

    Attention itself ignores order (permute the keys and values together: the same output),
    so the position is added to each token's embedding. Each pair of dimensions is a clock
    turning at its own speed (wavelengths 2*pi .. 10000*2*pi), and PE[pos + k] is a fixed
    rotation of PE[pos] for every pos: relative offsets are easy for a linear map to read.
    """
    if d_model % 2:
        raise ValueError(f"d_model must be even (sin/cos pairs), got {d_model}")
    pos = np.arange(max_len)[:, None]
    inv_freq = 1.0 / 10000 ** (np.arange(0, d_model, 2) / d_model)  # 1 / 10000^(2i/d)
    pe = np.zeros((max_len, d_model))
    pe[:, 0::2] = np.sin(pos * inv_freq)
    pe[:, 1::2] = np.cos(pos * inv_freq)
    return pe


# ----------------------------------------------------------------------------------------
# Why divide by sqrt(d_k)?
# ----------------------------------------------------------------------------------------
def scaling_demo(rng: np.random.Generator, dims=(4, 16, 64, 256, 1024), keys: int = 16,
                 trials: int = 2000) -> list[dict]:
    """q and k with independent N(0, 1) entries: q.k is a sum of d_k products of variance 1, so
    its variance is d_k and its spread grows as sqrt(d_k). Unscaled, large d_k makes the scores
    far apart, the softmax puts ~all weight on one key (a near one-hot), and its gradient
    p_j (delta_ij - p_i) vanishes. Dividing by sqrt(d_k) brings the variance back to 1."""
    rows = []
    for d in dims:
        q = rng.standard_normal((trials, 1, d))
        k = rng.standard_normal((trials, keys, d))
        raw = (q @ k.transpose(0, 2, 1))[:, 0]  # (trials, keys)
        row = {"d_k": d, "score_std_unscaled": float(raw.std()),
               "score_std_scaled": float((raw / math.sqrt(d)).std())}
        for name, scores in (("unscaled", raw), ("scaled", raw / math.sqrt(d))):
            p = softmax(scores)
            row[f"max_weight_{name}"] = float(p.max(axis=-1).mean())
            # Size of the softmax Jacobian: sum_ij |p_i (delta_ij - p_j)|, averaged over trials.
            jac = p[:, :, None] * (np.eye(keys)[None] - p[:, None, :])
            row[f"softmax_grad_{name}"] = float(np.abs(jac).sum(axis=(1, 2)).mean())
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------
# Attention weights of a short sentence
# ----------------------------------------------------------------------------------------
SENTENCE = ["the", "cat", "sat", "on", "the", "mat", "because", "the", "cat", "was", "tired"]


def sentence_attention(rng: np.random.Generator,
                       d_model: int = 32) -> dict[str, tuple[list[str], np.ndarray]]:
    """Weights of one untrained attention head over a short sentence: each word is a random
    vector (the same word, the same vector) plus its positional encoding, and W_q = W_k = I, so
    the score is the similarity of two tokens. Repeated words find each other, neighbours share
    some positional signal. Three views: no mask, causal, and the sentence padded with 3 <pad>."""
    vocab = sorted(set(SENTENCE))
    vectors = {w: 0.7 * rng.standard_normal(d_model) for w in vocab}  # 0.7: position still shows
    pe = positional_encoding(len(SENTENCE) + 3, d_model)
    x = np.stack([vectors[w] for w in SENTENCE]) + pe[:len(SENTENCE)]
    views = {}
    _, cache = attention_forward(x, x, x)
    views["no mask"] = (SENTENCE, cache.p)
    _, cache = attention_forward(x, x, x, causal_mask(len(SENTENCE)))
    views["causal mask"] = (SENTENCE, cache.p)
    padded_tokens = SENTENCE + ["<pad>"] * 3
    padded = np.concatenate([x, pe[len(SENTENCE):]])  # <pad> embeds as zeros: only position shows
    keep = padding_mask([len(SENTENCE)], len(padded_tokens))[0]
    _, cache = attention_forward(padded, padded, padded, keep[None, :])
    views["padding mask"] = (padded_tokens, cache.p)
    return views


def plot_heat_maps(views: dict[str, tuple[list[str], np.ndarray]], path) -> None:
    fig, axes = plt.subplots(1, len(views), figsize=(5.2 * len(views), 5.0),
                             gridspec_kw={"wspace": 0.4})
    for ax, (title, (tokens, weights)) in zip(axes, views.items()):
        ax.imshow(weights, cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(tokens)), tokens, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=8)
        ax.set(title=title, xlabel="key (attended to)", ylabel="query (attending)")
    fig.suptitle("One untrained head: word similarity + positional encoding (rows sum to 1)")
    save(fig, path)


# ----------------------------------------------------------------------------------------
# Cost vs sequence length
# ----------------------------------------------------------------------------------------
def attention_cost(length: int, head_dim: int, rng: np.random.Generator, repeats: int = 3) -> dict:
    """Forward + backward of one head on (L, d) inputs: best-of-``repeats`` wall time and the
    peak memory NumPy allocated (``tracemalloc`` sees NumPy's buffers), inputs excluded. The
    L x L score and weight matrices make both grow as L^2 once L is well above d."""
    q, k, v = (rng.standard_normal((length, head_dim)) for _ in range(3))
    d_out = rng.standard_normal((length, head_dim))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        _, cache = attention_forward(q, k, v)
        attention_backward(d_out, cache)
        best = min(best, time.perf_counter() - start)
        del cache
    tracemalloc.start()
    _, cache = attention_forward(q, k, v)
    attention_backward(d_out, cache)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"length": length, "time_ms": best * 1e3, "peak_mib": peak / 2**20}


def plot_cost(rows: list[dict], head_dim: int, path) -> None:
    lengths = [r["length"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "time_ms", "forward + backward time (ms)"),
                           (axes[1], "peak_mib", "peak memory (MiB)")):
        values = [r[key] for r in rows]
        ax.loglog(lengths, values, "o-", label="measured")
        ax.loglog(lengths, [values[-1] * (n / lengths[-1]) ** 2 for n in lengths], "--",
                  color="gray", label="~ L^2")
        ax.set(xlabel="sequence length L", ylabel=label)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(f"NumPy attention, one head, d_k = {head_dim}")
    save(fig, path)


def log_slope(xs: list[float], ys: list[float]) -> float:
    """The exponent b of y ~ x^b between the last two points (where the L^2 term dominates)."""
    return math.log(ys[-1] / ys[-2]) / math.log(xs[-1] / xs[-2])


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    run = Run.start(cfg, __file__, pick_device("cpu"))
    summary: dict = {}

    print("\n=== Why 1/sqrt(d_k): q, k with N(0, 1) entries, 16 keys ===")
    print(f"{'d_k':>6} {'std q.k':>9} {'std q.k/sqrt(d)':>16} {'max weight':>11} {'(scaled)':>9} "
          f"{'|softmax grad|':>15} {'(scaled)':>9}")
    for row in scaling_demo(rng):
        print(f"{row['d_k']:6d} {row['score_std_unscaled']:9.2f} {row['score_std_scaled']:16.3f} "
              f"{row['max_weight_unscaled']:11.3f} {row['max_weight_scaled']:9.3f} "
              f"{row['softmax_grad_unscaled']:15.4f} {row['softmax_grad_scaled']:9.4f}")
        run.log(step="scaling", **row)
        summary.update({f"{k}_d{row['d_k']}": v for k, v in row.items() if k != "d_k"})

    print("\n=== Backward by hand vs central differences (2 heads, padding + causal masks) ===")
    params = init_mha(8, rng)
    x = rng.standard_normal((2, 5, 8))
    keep = padding_mask([5, 3], 5)
    upstream = rng.standard_normal((2, 5, 8))
    out, _, cache = mha_forward(x, x, x, params, 2, keep, causal_mask(5))
    dq, dk, dv, grads = mha_backward(upstream, params, cache)
    loss = lambda x_: float(np.sum(mha_forward(x_, x_, x_, params, 2, keep, causal_mask(5))[0]
                                   * upstream))
    summary["mha_dx_rel_error"] = max_relative_error(dq + dk + dv, numerical_grad(loss, x))

    def loss_w(w):
        out_w = mha_forward(x, x, x, {**params, "w_q": w}, 2, keep, causal_mask(5))[0]
        return float(np.sum(out_w * upstream))

    summary["mha_dwq_rel_error"] = max_relative_error(grads["w_q"],
                                                      numerical_grad(loss_w, params["w_q"]))
    print(f"max relative error dL/dx {summary['mha_dx_rel_error']:.1e}, "
          f"dL/dW_q {summary['mha_dwq_rel_error']:.1e}")

    print("\n=== Attention weights of a short sentence ===")
    views = sentence_attention(rng)
    plot_heat_maps(views, run.path("attention_heat_maps.png"))
    causal = views["causal mask"][1]
    padded_tokens, padded = views["padding mask"]
    summary["causal_weight_above_diagonal"] = float(np.triu(causal, 1).sum())
    summary["weight_on_pad_keys"] = float(padded[:, len(SENTENCE):].sum())
    cat = [i for i, w in enumerate(SENTENCE) if w == "cat"]
    summary["cat_attends_to_cat"] = float(views["no mask"][1][cat[1], cat].sum())
    print(f"second 'cat' puts {summary['cat_attends_to_cat']:.2f} of its weight on the two 'cat's; "
          f"causal weight above the diagonal {summary['causal_weight_above_diagonal']:.1f}; "
          f"weight on <pad> keys {summary['weight_on_pad_keys']:.1f}")

    print(f"\n=== Cost vs sequence length (one head, d_k = {cfg.head_dim}) ===")
    costs = []
    for length in sorted(cfg.lengths):
        costs.append(attention_cost(length, cfg.head_dim, rng))
        print(f"L = {length:5d}: {costs[-1]['time_ms']:9.2f} ms  "
              f"peak {costs[-1]['peak_mib']:8.2f} MiB")
        run.log(step="cost", **costs[-1])
    plot_cost(costs, cfg.head_dim, run.path("attention_cost.png"))
    lengths = [c["length"] for c in costs]
    summary["memory_exponent"] = log_slope(lengths, [c["peak_mib"] for c in costs])
    summary["time_exponent"] = log_slope(lengths, [c["time_ms"] for c in costs])
    print(f"doubling L multiplies memory by 2^{summary['memory_exponent']:.2f} and time by "
          f"2^{summary['time_exponent']:.2f} (between the two longest)")
    return run.finish(**summary)


if __name__ == "__main__":
    launch(main, Config)
