"""common.data, common.augment, common.device, common.parity, benchmarks/run.py."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch

from common.augment import crop_flip, random_crop, random_flip
from common.data import REGISTRY, TensorLoader, data_root, load, normalizer, split, synthetic_images
from common.device import autocast, pick_device, seed_everything
from common.errors import DataUnavailable, LabError
from common.parity import assert_close, max_relative_error, numerical_grad, torch_reference
from tests.conftest import ROOT, run_script


def test_missing_mnist_offline_gives_the_clear_error(offline):
    root = offline / "empty-data-root"
    with pytest.raises(DataUnavailable) as info:
        load("mnist", root)
    message = str(info.value)
    assert "mnist" in message and str(root) in message
    assert "--data-dir PATH" in message and "--smoke" in message
    assert "\n" not in message


def test_missing_data_in_a_script_is_one_line_exit_1_no_traceback(tmp_path):
    script = tmp_path / "needs_mnist.py"
    script.write_text(textwrap.dedent('''
        """Needs MNIST."""
        from common.config import BaseConfig, dataclass, run
        from common.data import load

        @dataclass
        class Config(BaseConfig):
            """No settings beyond the common ones."""

        def main(cfg):
            load("mnist", cfg.data_dir, smoke=cfg.smoke)
            return {}

        if __name__ == "__main__":
            run(main, Config)
    '''))
    result = run_script(script, tmp_path=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "--smoke" in error_lines[0]
    assert run_script(script, "--smoke", tmp_path=tmp_path).returncode == 0


def test_unknown_data_set_names_the_known_ones():
    with pytest.raises(DataUnavailable, match="known: .*cifar10.*mnist"):
        load("imagenet")


def test_data_root_order(monkeypatch, tmp_path):
    monkeypatch.setenv("DL_LABS_DATA", str(tmp_path / "env"))
    assert data_root("/explicit") == data_root("/explicit").__class__("/explicit")
    assert data_root("") == tmp_path / "env"
    monkeypatch.delenv("DL_LABS_DATA")
    assert data_root(None).parts[-3:] == (".cache", "dl-labs", "data")


@pytest.mark.parametrize("name, shape", [("mnist", (1, 28, 28)), ("fashion_mnist", (1, 28, 28)),
                                         ("cifar10", (3, 32, 32))])
def test_synthetic_twins_match_the_real_shapes(name, shape):
    data = load(name, smoke=True)
    assert data.synthetic and data.x_train.dtype == torch.uint8 and data.x_train.shape[1:] == shape
    assert data.num_classes == 10 and set(data.y_train.tolist()) == set(range(10))
    assert torch.bincount(data.y_train).min() >= 0.8 * len(data.y_train) / 10  # roughly balanced


def test_twins_are_seeded():
    a, ya = synthetic_images(20, seed=3)
    b, yb = synthetic_images(20, seed=3)
    c, _ = synthetic_images(20, seed=4)
    assert torch.equal(a, b) and torch.equal(ya, yb) and not torch.equal(a, c)


def test_twin_needs_learning_but_is_learnable():
    """A linear classifier on raw pixels learns the twin well above chance (10%), yet stays far
    from perfect: the classes are shapes at random places, not a pixel lookup."""
    x, y = synthetic_images(2000, seed=0)
    x = x.float().flatten(1) / 255
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    seed_everything(0)
    model = torch.nn.Linear(784, 10)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:1500]), y[:1500]).backward()
        opt.step()
    acc = (model(x[1500:]).argmax(1) == y[1500:]).float().mean().item()
    assert 0.25 < acc < 0.95


def test_bundled_tabular_sets_are_real_offline(offline):
    iris = load("iris", smoke=True)
    assert not iris.synthetic and iris.x_train.shape == (120, 4) and iris.classes[0] == "setosa"
    diabetes = load("diabetes")
    assert diabetes.classes == [] and diabetes.y_train.dtype == torch.float32
    assert load("iris", synthetic=True, n_synthetic=30).synthetic
    assert set(REGISTRY) >= {"mnist", "cifar10", "iris", "digits", "breast_cancer", "diabetes"}


def test_tensor_loader_covers_every_example_once_per_epoch():
    x, y = torch.arange(10).float().view(10, 1), torch.arange(10)
    loader = TensorLoader(x, y, batch_size=4, shuffle=True, transform=lambda b: b * 2, seed=1)
    assert len(loader) == 3
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert all(torch.equal(xb.view(-1), yb.float() * 2) for xb, yb in batches)  # pairs stay paired
    assert [len(b[1]) for b in TensorLoader(x, y, 4, drop_last=True)] == [4, 4]
    second = torch.cat([b[1] for b in loader])
    assert second.tolist() != seen.tolist()  # a new order every epoch
    with pytest.raises(ValueError, match="rows"):
        TensorLoader(x, y[:5], 2)


def test_normalizer_and_split():
    x = torch.full((4, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(x)
    assert out.dtype == torch.float32 and torch.allclose(out, torch.full_like(out, 2.0))
    xs, ys = torch.arange(100).view(100, 1), torch.arange(100)
    x_tr, y_tr, x_val, y_val = split(xs, ys, 0.2, seed=0)
    assert len(x_val) == 20 and len(x_tr) == 80
    assert sorted(torch.cat([y_tr, y_val]).tolist()) == list(range(100))


def test_random_crop_is_a_translation_and_flip_mirrors():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = random_crop(x, padding=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    # Every crop is a window of the reflect-padded image.
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(2):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert random_crop(x, 0) is x
    u8 = torch.randint(0, 255, (64, 1, 4, 4), dtype=torch.uint8)
    assert random_crop(u8, 1).dtype == torch.uint8
    flipped = random_flip(u8, torch.Generator().manual_seed(0))
    same = (flipped == u8).flatten(1).all(1)
    mirrored = (flipped == u8.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and 10 < mirrored.sum() < 54
    assert crop_flip(4)(torch.zeros(3, 3, 32, 32)).shape == (3, 3, 32, 32)


def test_device_and_seeds():
    assert pick_device("cpu").type == "cpu" and pick_device("auto").type in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        with pytest.raises(LabError, match="no CUDA GPU"):
            pick_device("cuda")
    with autocast(torch.device("cpu")):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32  # no autocast on CPU
    seed_everything(3)
    a = (torch.rand(3), np.random.rand(3))
    seed_everything(3)
    assert torch.equal(a[0], torch.rand(3)) and np.array_equal(a[1], np.random.rand(3))


def test_parity_helpers():
    f = lambda v: float(np.sum(np.sin(v) * v))
    x = np.linspace(-1, 1, 5)
    analytic = np.cos(x) * x + np.sin(x)
    assert max_relative_error(numerical_grad(f, x), analytic) < 1e-8
    out, (grad,) = torch_reference(lambda t: torch.sin(t) * t, x)
    assert_close(out, np.sin(x) * x, "forward")
    assert_close(grad, analytic, "gradient")
    _, (weighted,) = torch_reference(lambda t: t**2, x, upstream=np.full(5, 3.0))
    assert_close(weighted, 6 * x, "upstream-weighted gradient")
    with pytest.raises(AssertionError, match="shape"):
        assert_close(np.zeros(3), np.zeros(4))
    with pytest.raises(AssertionError, match="differs from PyTorch"):
        assert_close(np.ones(3), np.ones(3) + 1e-3, "g")


def test_benchmark_runner_lists_entries_and_rejects_unknown(tmp_path):
    listing = run_script(ROOT / "benchmarks" / "run.py", "--list", tmp_path=tmp_path)
    assert listing.returncode == 0 and listing.stdout.strip(), listing.stderr
    bad = run_script(ROOT / "benchmarks" / "run.py", "no_such_bench", tmp_path=tmp_path)
    assert bad.returncode == 2 and "--list" in bad.stderr
    assert sys.executable


def test_cpu_bf16_autocast_only_when_asked():
    from common.device import CpuBFloat16

    cpu = torch.device("cpu")
    a, b = torch.randn(2, 3), torch.randn(3, 2)
    with autocast(cpu, cpu_bf16=True):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(cpu, enabled=False, cpu_bf16=True):
        assert (a @ b).dtype == torch.float32
    wrapped = CpuBFloat16(torch.nn.Linear(3, 2))
    out = wrapped(a)
    assert out.dtype == torch.float32 and wrapped.model.weight.dtype == torch.float32
    torch.testing.assert_close(out, wrapped.model(a), rtol=2e-2, atol=2e-2)  # bf16: ~3 digits
