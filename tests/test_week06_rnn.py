"""Week 6: NumPy embedding, RNN and LSTM (forward and BPTT) == PyTorch; packing; the IMDB lab
(learning, padding that changes nothing, clipping, best checkpoint, exact resume); GloVe and the
length study.

Parity checks run in float64 (common.parity), so the tolerance measures our math, not float32
rounding. Inputs contain exact zeros (zero vectors, a zero initial state) and repeated ids.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from common.checkpoint import read_checkpoint
from common.errors import ConfigError, DataError
from common.parity import assert_close
from common.text import PAD, Vocab
from common.train import Loop
from tests.conftest import CtrlC, run_lab
from tests.test_common_text import write_reviews
from week06_rnn import glove_vs_random, max_length, part1, part2


# ------------------------------------------------------------------------------------------
# What each script's --smoke run must show (tests/test_smoke.py runs them; rows are metrics.csv)
# ------------------------------------------------------------------------------------------
def check_part1(summary: dict, rows: list[dict]) -> None:
    assert summary["rnn_first_over_last"] < 1e-6, "a default-init RNN's gradient must vanish over 40 steps"
    assert summary["rnn_big_first_over_last"] > 1, "3x recurrent weights: the gradient grows back in time"
    assert summary["lstm_first_over_last"] > 1e3 * summary["rnn_first_over_last"], "the LSTM keeps it far longer"


def check_part2(summary: dict, rows: list[dict]) -> None:
    assert summary["test_acc"] >= summary["majority_baseline"] + 0.2, summary  # the twin is learned
    assert summary["last_train_loss"] < 0.5 * summary["first_train_loss"], summary
    accs = [float(r["val_acc"]) for r in rows]
    assert summary["best_epoch"] == 1 + accs.index(max(accs)), "the kept model is the best on validation"
    matrix = np.array(summary["confusion"])
    assert matrix.sum() == 256 and np.trace(matrix) / matrix.sum() == pytest.approx(summary["test_acc"])
    assert all(math.isfinite(float(r["grad_norm"])) for r in rows)


def check_glove(summary: dict, rows: list[dict]) -> None:
    assert summary["coverage"] == 1, summary  # the twin's stand-in vectors cover every word
    # Vectors that already separate positive from negative words: learned in the time a random
    # embedding is still at chance.
    assert summary["test_acc_glove"] >= 0.8 and summary["glove_gain"] >= 0.1, summary


def check_max_length(summary: dict, rows: list[dict]) -> None:
    lengths = [int(r["max_len"]) for r in rows]
    assert lengths == sorted(lengths) and len(lengths) >= 2
    # The twin's sentiment clause comes after filler: cutting to 4 tokens loses it, 64 keeps it.
    assert summary["test_acc_longest"] >= summary["test_acc_shortest"] + 0.1, summary


SMOKE_OUTCOMES = {"part1.py": check_part1, "part2.py": check_part2, "glove_vs_random.py": check_glove,
                  "max_length.py": check_max_length}


# ------------------------------------------------------------------------------------------
# Part 1: embeddings, RNN, LSTM == PyTorch
# ------------------------------------------------------------------------------------------
def inputs(rng, n=3, t=5, d=4, h=6):
    x = rng.standard_normal((n, t, d))
    x[0, 1] = 0.0  # an exact zero input vector
    x[2, :, 0] = 0.0
    return x, np.zeros((n, h)), rng.standard_normal((n, h))  # a zero and a random initial state


@pytest.mark.parametrize("zero_h0", [True, False])
def test_rnn_forward_and_bptt_match_nn_rnn(zero_h0):
    rng = np.random.default_rng(0)
    x, h_zero, h_rand = inputs(rng)
    h0 = h_zero if zero_h0 else h_rand
    w = part1.init_weights(rng, 4, 6, 1)
    dh = rng.standard_normal((3, 5, 6))  # a loss on every output: L = sum(h * dh)
    h = part1.rnn_forward(x, h0, **w)
    grads = part1.rnn_backward(dh, x, h0, h, w["W_ih"], w["W_hh"])

    rnn = nn.RNN(4, 6, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        for name, value in w.items():
            getattr(rnn, f"weight_{name[2:]}_l0" if name.startswith("W") else f"bias_{name[2:]}_l0").copy_(
                torch.from_numpy(value))
    xt, h0t = torch.tensor(x, requires_grad=True), torch.tensor(h0[None], requires_grad=True)
    out, h_n = rnn(xt, h0t)
    (out * torch.from_numpy(dh)).sum().backward()
    assert_close(h, out.detach().numpy(), "RNN outputs")
    assert_close(h[:, -1], h_n[0].detach().numpy(), "RNN h_n")
    assert_close(grads["x"], xt.grad.numpy(), "dL/dx")
    assert_close(grads["h0"], h0t.grad[0].numpy(), "dL/dh0")
    assert_close(grads["W_ih"], rnn.weight_ih_l0.grad.numpy(), "dL/dW_ih")
    assert_close(grads["W_hh"], rnn.weight_hh_l0.grad.numpy(), "dL/dW_hh")
    assert_close(grads["b"], rnn.bias_ih_l0.grad.numpy(), "dL/db_ih")
    assert_close(grads["b"], rnn.bias_hh_l0.grad.numpy(), "dL/db_hh")


def load_lstm(w: dict, hidden: int, input_size: int) -> nn.LSTM:
    lstm = nn.LSTM(input_size, hidden, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.from_numpy(w["W_ih"]))
        lstm.weight_hh_l0.copy_(torch.from_numpy(w["W_hh"]))
        lstm.bias_ih_l0.copy_(torch.from_numpy(w["b_ih"]))
        lstm.bias_hh_l0.copy_(torch.from_numpy(w["b_hh"]))
    return lstm


@pytest.mark.parametrize("last_only", [False, True])
def test_lstm_forward_and_bptt_match_nn_lstm(last_only):
    rng = np.random.default_rng(1)
    x, h0, c0 = inputs(rng)
    c0[1] = 0.0
    w = part1.init_weights(rng, 4, 6, 4)
    dh = rng.standard_normal((3, 5, 6))
    if last_only:  # a classifier reading h_T only: the gradient of earlier steps comes through time alone
        dh[:, :-1] = 0.0
    dc = rng.standard_normal((3, 6))  # and a loss on c_T, so the cell path is checked from its end too
    h, cache = part1.lstm_forward(x, h0, c0, **w)
    grads = part1.lstm_backward(dh, cache, w["W_ih"], w["W_hh"], dc_last=dc)

    lstm = load_lstm(w, 6, 4)
    xt = torch.tensor(x, requires_grad=True)
    h0t, c0t = torch.tensor(h0[None], requires_grad=True), torch.tensor(c0[None], requires_grad=True)
    out, (h_n, c_n) = lstm(xt, (h0t, c0t))
    ((out * torch.from_numpy(dh)).sum() + (c_n[0] * torch.from_numpy(dc)).sum()).backward()
    assert_close(h, out.detach().numpy(), "LSTM outputs")
    assert_close(h[:, -1], h_n[0].detach().numpy(), "LSTM h_n")
    assert_close(cache[4][:, -1], c_n[0].detach().numpy(), "LSTM c_n")
    assert_close(grads["x"], xt.grad.numpy(), "dL/dx")
    assert_close(grads["h0"], h0t.grad[0].numpy(), "dL/dh0")
    assert_close(grads["c0"], c0t.grad[0].numpy(), "dL/dc0")
    assert_close(grads["W_ih"], lstm.weight_ih_l0.grad.numpy(), "dL/dW_ih")
    assert_close(grads["W_hh"], lstm.weight_hh_l0.grad.numpy(), "dL/dW_hh")
    assert_close(grads["b"], lstm.bias_hh_l0.grad.numpy(), "dL/db")


def test_embedding_gradient_is_a_scatter_add_equal_to_autograd():
    rng = np.random.default_rng(2)
    E = rng.standard_normal((7, 3))
    E[PAD] = 0.0
    ids = np.array([[3, 3, 5, PAD], [3, 6, PAD, PAD]])  # repeated ids accumulate; PAD gets nothing
    dx = rng.standard_normal((2, 4, 3))
    dx[0, 2] = 0.0
    assert_close(part1.embedding_forward(E, ids), E[ids], "lookup")
    Et = torch.tensor(E, requires_grad=True)
    (F.embedding(torch.from_numpy(ids), Et, padding_idx=PAD) * torch.from_numpy(dx)).sum().backward()
    dE = part1.embedding_backward(dx, ids, 7)
    assert_close(dE, Et.grad.numpy(), "dL/dE")
    assert_close(dE[3], dx[0, 0] + dx[0, 1] + dx[1, 0], "the three uses of id 3")
    assert not dE[[1, 2, 4]].any() and not dE[PAD].any()


def test_vanishing_gradient_rnn_vs_lstm():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 60, 8))
    rnn = part1.gradient_through_time("rnn", part1.init_weights(rng, 8, 16, 1), x)
    lstm_w = part1.init_weights(rng, 8, 16, 4)
    lstm_w["b_hh"][16:32] += 1.0
    lstm = part1.gradient_through_time("lstm", lstm_w, x)
    assert rnn[0] / rnn[-1] < 1e-8 and lstm[0] / lstm[-1] > 1e4 * rnn[0] / rnn[-1]
    rate = np.polyfit(np.arange(60), np.log(rnn), 1)[0]  # log-norm gained per step towards the end
    assert rate > 0.3, "the RNN's gradient should shrink by a steady factor per step back"


# ------------------------------------------------------------------------------------------
# Part 2: packing, the final states, padding, clipping
# ------------------------------------------------------------------------------------------
def test_reverse_within_length_keeps_padding_at_the_end():
    x = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [6, 0, 0, 0]])
    got = part2.reverse_within_length(x, torch.tensor([3, 2, 1]))
    assert got.tolist() == [[3, 2, 1, 0], [5, 4, 0, 0], [6, 0, 0, 0]]


def ragged_batch(seed=0, n=5, vocab=30):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 1, 4, 7, 2])[:n]
    x = torch.randint(2, vocab, (n, 7), generator=g)
    for i, length in enumerate(lengths):
        x[i, length:] = PAD
    return x, lengths


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_packed_and_padded_give_each_sequence_its_own_final_states(cell):
    torch.manual_seed(0)
    x, lengths = ragged_batch()
    model = part2.TextRNN(30, 2, 5, 4, cell=cell, bidirectional=True).double().eval()
    padded = model.summary(x)
    model.packed = True
    packed = model.summary(x)
    alone = torch.cat([model.summary(x[i:i + 1, :length]) for i, length in enumerate(lengths)])
    assert_close(packed.detach().numpy(), alone.detach().numpy(), "packed batch vs each sequence alone")
    assert_close(padded.detach().numpy(), alone.detach().numpy(), "padded + gather vs each sequence alone")
    # What goes wrong without either: the RNN's last output has read the padding.
    out, _ = model.forward_rnn(model.embed(x))
    assert not torch.allclose(out[:, -1][lengths < 7], alone[lengths < 7, :4])


def test_one_layer_textrnn_is_exactly_a_bidirectional_nn_lstm():
    torch.manual_seed(1)
    x, lengths = ragged_batch(1)
    model = part2.TextRNN(30, 2, 5, 4, cell="lstm", bidirectional=True).double().eval()
    bi = nn.LSTM(5, 4, batch_first=True, bidirectional=True, dtype=torch.float64)
    with torch.no_grad():
        for name, p in model.forward_rnn.named_parameters():
            getattr(bi, name).copy_(p)
            getattr(bi, f"{name}_reverse").copy_(getattr(model.backward_rnn, name))
    _, (h_n, _) = bi(pack_padded_sequence(model.embed(x), lengths, batch_first=True, enforce_sorted=False))
    expected = torch.cat([h_n[0], h_n[1]], dim=1)
    assert_close(model.summary(x).detach().numpy(), expected.detach().numpy(), "TextRNN vs nn.LSTM(bidirectional)")


@pytest.mark.parametrize("model_name", ["lstm", "gru", "ngram_bag"])
def test_extra_padding_does_not_change_a_prediction(model_name):
    torch.manual_seed(2)
    cfg = part2.Config(model=model_name, embed_dim=6, hidden=5, ngram_buckets=64, dropout=0.5)
    model = part2.make_model(cfg, 30, 2).double().eval()
    x, lengths = ragged_batch(2)
    wider = torch.cat([x, torch.full((len(x), 9), PAD)], dim=1)
    assert_close(model(wider).detach().numpy(), model(x).detach().numpy(), "logits with 9 more PAD columns")
    alone = torch.cat([model(x[i:i + 1, :length]) for i, length in enumerate(lengths)])
    assert_close(model(x).detach().numpy(), alone.detach().numpy(), "logits in a batch vs alone")


def test_ngram_bag_bigrams_never_touch_padding():
    bag = part2.NgramBag(10, 2, 3, buckets=7)
    ids = bag.ngrams(torch.tensor([[4, 5, 6, PAD], [4, 5, PAD, PAD]]))
    assert ids.shape == (2, 7) and ids[0, 4:6].ge(10).all() and ids[0, 6] == PAD and ids[1, 5:].eq(PAD).all()
    assert ids[0, 4] == ids[1, 4], "the same bigram (4, 5) has the same bucket in every review"


def test_clip_gradients_bounds_the_global_norm_and_keeps_the_direction():
    model = nn.Linear(3, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    before = torch.cat([p.grad.flatten() for p in model.parameters()])
    clip = part2.ClipGradients(model, max_norm=1.0)
    loop = Loop(model, torch.optim.SGD(model.parameters(), lr=0.1), epochs=1)
    clip.on_after_backward(loop)
    after = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert after.norm().item() == pytest.approx(1.0) and torch.allclose(after / after.norm(), before / before.norm())
    clip.on_after_backward(loop)  # now 1.0: not above the limit, left alone
    loop.row = {}
    clip.on_epoch_end(loop)
    assert loop.row["clipped"] == 0.5 and loop.row["grad_norm_max"] == pytest.approx(before.norm().item())


# ------------------------------------------------------------------------------------------
# Part 2 as a program: best checkpoint, bad input, exact resume
# ------------------------------------------------------------------------------------------
TINY = ("--smoke", "--epochs", "3", "--embed-dim", "8", "--hidden", "8", "--no-packed")


def lab(module, out: Path, *argv: str) -> dict:
    return run_lab(module.main, module.Config, ["--out", str(out), "--device", "cpu", *argv])


def test_best_checkpoint_holds_the_validation_best_and_its_vocabulary(tmp_path):
    summary = lab(part2, tmp_path, *TINY)
    run_dir = Path(summary["run_dir"])
    best = read_checkpoint(run_dir / "best_model.pt")
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    accs = [float(r["val_acc"]) for r in rows]
    assert best["epoch"] == summary["best_epoch"] == 1 + accs.index(max(accs))
    vocab = Vocab.from_state_dict(best["extra"]["vocab"])
    assert len(vocab) == summary["vocab"] and "good" in vocab.stoi
    assert (run_dir / "confusion.png").is_file() and (run_dir / "curves.png").is_file()


def test_part2_resumes_exactly_after_ctrl_c(tmp_path, monkeypatch, capsys):
    whole = lab(part2, tmp_path / "whole", *TINY)
    steps_per_epoch = math.ceil((1024 - round(0.1 * 1024)) / 32)
    real_fit = part2.fit
    monkeypatch.setattr(part2, "fit", lambda *a, callbacks=(), **k: real_fit(
        *a, callbacks=[*callbacks, CtrlC(steps_per_epoch + 5)], **k))
    assert lab(part2, tmp_path / "cut", *TINY) == {"exit": 130}
    monkeypatch.setattr(part2, "fit", real_fit)
    (checkpoint,) = (tmp_path / "cut").glob("week06/part2/*/checkpoint.pt")
    assert read_checkpoint(checkpoint)["epoch"] == 1
    resumed = lab(part2, tmp_path / "cut", "--resume", str(checkpoint))
    for key in ("test_acc", "val_acc", "best_epoch", "epochs_done", "confusion", "last_train_loss"):
        assert resumed[key] == whole[key], key
    for name in ("checkpoint.pt", "best_model.pt"):
        (a,), (b,) = ((tmp_path / d).glob(f"week06/part2/*/{name}") for d in ("whole", "cut"))
        expected, got = read_checkpoint(a)["model"], read_checkpoint(b)["model"]
        assert all(torch.equal(expected[k], got[k]) for k in expected), name  # bit for bit
    # best_model.pt (weights only) is not a resume point: refused in one line, not restarted silently
    (best,) = (tmp_path / "whole").glob("week06/part2/*/best_model.pt")
    capsys.readouterr()
    runs_before = sorted((tmp_path / "whole").glob("week06/part2/*"))
    assert lab(part2, tmp_path / "whole", "--resume", str(best)) == {"exit": 2}
    assert "holds the weights only" in capsys.readouterr().err
    assert sorted((tmp_path / "whole").glob("week06/part2/*")) == runs_before


def test_part2_bad_input_is_one_line(tmp_path, offline, capsys):
    for argv, code, words in ((["--max-len", "0"], 2, "--max-len"),
                              (["--data-dir", str(tmp_path / "nope")], 1, "imdb: --data-dir"),
                              (["--resume", str(tmp_path / "bad.pt")], 2, "corrupt")):
        (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
        assert lab(part2, tmp_path / "runs", *argv) == {"exit": code}
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------
# Self-work: GloVe reading, the length study
# ------------------------------------------------------------------------------------------
def test_glove_text_file_fills_known_rows_and_counts_coverage(tmp_path):
    path = tmp_path / "glove.6B.3d.txt"
    path.write_text("good 0.5 1 -1\nbad -0.5 -1 1\nthe 0 0 0\n")
    vocab = Vocab(["<pad>", "<unk>", "good", "bad", "film"])
    vectors = glove_vs_random.read_glove_txt(path, 3, set(vocab.itos))
    assert set(vectors) == {"good", "bad"}  # only the vocabulary's words are kept
    matrix, found = glove_vs_random.embedding_matrix(vocab, vectors, 3, seed=0)
    assert found == 2 and matrix.shape == (5, 3)
    assert matrix[2].tolist() == [0.5, 1.0, -1.0] and matrix[3].tolist() == [-0.5, -1.0, 1.0]
    assert not matrix[PAD].any() and matrix[4].abs().sum() > 0  # a word without a vector keeps a random one
    with pytest.raises(DataError, match="line 1 .* has 3 numbers, expected 50"):
        glove_vs_random.read_glove_txt(path, 50)
    path.write_text("good 0.5 1 -1\nbroken 1 2\n")
    with pytest.raises(DataError, match="line 2"):
        glove_vs_random.read_glove_txt(path, 3)
    for line in ("bad 1 nan 0", "bad 1 inf 0", "bad 1 x 0"):  # never a silent nan embedding
        path.write_text(f"good 0.5 1 -1\n{line}\n")
        with pytest.raises(DataError, match="line 2"):
            glove_vs_random.read_glove_txt(path, 3)


def test_glove_missing_is_one_line_and_leaves_no_run(tmp_path, offline, capsys):
    root = tmp_path / "data"
    for name, blob in write_reviews(root).items():  # a tiny IMDB, but no GloVe file
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(blob)
    assert lab(glove_vs_random, tmp_path / "runs", "--dim", "100", "--data-dir", str(root)) == {"exit": 1}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "glove.6B.100d.txt" in err and "--glove PATH" in err and "--smoke" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("lengths", [(), (8, 8), (0, 16)])
def test_max_length_refuses_lengths_that_cannot_be_compared(lengths):
    with pytest.raises(ConfigError, match="--lengths"):
        max_length.Config(lengths=lengths)
