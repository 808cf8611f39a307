"""common.data, common.twins, common.loader, common.augment, common.device, common.parity,
benchmarks/run.py."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from common.augment import crop_flip, random_crop, random_flip, translate
from common.data import REGISTRY, data_root, load, validate
from common.device import autocast, pick_device, seed_everything
from common.errors import DataError, DataUnavailable, LabError
from common.loader import TensorLoader, normalizer, split
from common.parity import assert_close, max_relative_error, numerical_grad, torch_reference
from common.twins import synthetic_images
from tests.conftest import run_script


def test_missing_mnist_offline_gives_the_clear_error_and_leaves_nothing_on_disk(offline):
    root = offline / "empty-data-root"  # the default root ($DL_LABS_DATA), not there yet
    with pytest.raises(DataUnavailable) as info:
        load("mnist")
    message = str(info.value)
    assert "mnist" in message and str(root) in message and "could not be downloaded" in message
    assert "--data-dir PATH" in message and "--smoke" in message
    assert "\n" not in message
    assert not root.exists(), "the folder created to download into is removed again"
    root.mkdir()  # an existing root keeps existing, without the empty MNIST/raw the download made
    with pytest.raises(DataUnavailable):
        load("mnist")
    assert root.is_dir() and list(root.iterdir()) == []


def test_a_data_dir_that_does_not_exist_is_an_error_and_is_not_created(offline):
    typo = offline / "dtaa"
    with pytest.raises(DataUnavailable) as info:
        load("mnist", typo)
    message = str(info.value)
    assert f"--data-dir {typo} does not exist" in message and message.startswith("mnist")
    assert "--smoke" in message and "\n" not in message
    assert not typo.exists()
    assert load("mnist", typo, smoke=True).synthetic  # --smoke never looks at the data root


def write_idx(path: Path, array) -> None:
    """An MNIST idx file: magic (0, 0, uint8, ndim), big-endian dimensions, raw bytes."""
    array = np.asarray(array, dtype=np.uint8)
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(bytes([0, 0, 0x08, array.ndim]) + dims + array.tobytes())


@pytest.fixture
def tiny_mnist(tmp_path) -> Path:
    """A data root holding a tiny MNIST in torchvision's layout (30 training, 10 test digits)."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return tmp_path / "data"


def test_mnist_from_disk_loads_and_is_validated(offline, tiny_mnist):
    data = load("mnist", tiny_mnist)
    assert not data.synthetic and data.x_train.shape == (30, 1, 28, 28)
    assert data.y_test.tolist() == list(range(10))
    write_idx(tiny_mnist / "MNIST" / "raw" / "train-labels-idx1-ubyte", [3] * 10 + [12] + [3] * 19)
    with pytest.raises(DataError) as info:
        load("mnist", tiny_mnist)
    message = str(info.value)
    assert message.startswith("mnist: ") and "training labels must be in 0..9, found 12" in message
    assert str(tiny_mnist / "MNIST" / "raw") in message and "delete" in message
    assert "\n" not in message


def test_truncated_mnist_file_is_reported_as_damaged_naming_the_file(offline, tiny_mnist):
    images = tiny_mnist / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])  # a download cut short
    with pytest.raises(DataError) as info:
        load("mnist", tiny_mnist)
    message = str(info.value)
    assert "train-images-idx3-ubyte is truncated (5,000 bytes" in message
    assert str(images.parent) in message
    assert "could not be downloaded" not in message and "\n" not in message


def test_damaged_cifar_batch_offline_is_named(offline, tmp_path):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"):
        (folder / name).write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"^cifar10: data_batch_1 is damaged .*checksum") as info:
        load("cifar10", tmp_path / "data")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("change, problem", [
    (lambda d: setattr(d, "y_train", d.y_train[:-1]), "has 50 inputs but 49 labels"),
    (lambda d: setattr(d, "x_test", d.x_test.float()), "test images must be uint8"),
    (lambda d: setattr(d, "y_train", d.y_train.float()), "training labels must be int64"),
    (lambda d: setattr(d, "y_test", d.y_test - 1), "test labels must be in 0..9, found -1"),
])
def test_validate_rejects_malformed_data(change, problem):
    data = load("mnist", synthetic=True, n_synthetic=50)
    validate("mnist", data)
    change(data)
    with pytest.raises(DataError, match=f"^mnist: .*{problem}"):
        validate("mnist", data)


def test_missing_data_in_a_script_is_one_line_exit_1_no_traceback(tmp_path):
    script = tmp_path / "needs_mnist.py"
    script.write_text(textwrap.dedent('''
        """Needs MNIST."""
        from dataclasses import dataclass

        from common.config import BaseConfig
        from common.data import load
        from common.runner import launch

        @dataclass
        class Config(BaseConfig):
            """No settings beyond the common ones."""

        def main(cfg):
            load("mnist", cfg.data_dir, smoke=cfg.smoke)
            return {}

        if __name__ == "__main__":
            launch(main, Config)
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
    assert crop_flip(4)(torch.zeros(3, 3, 32, 32), torch.Generator()).shape == (3, 3, 32, 32)


def test_translate_never_mirrors_but_crop_flip_does():
    x = torch.zeros(200, 1, 8, 16, dtype=torch.uint8)
    x[..., 8:] = 255  # dark left half, bright right half: a mirror swaps them
    g = torch.Generator().manual_seed(0)
    shifted = translate(2)(x, g)
    assert (shifted[..., 0] == 0).all() and (shifted[..., -1] == 255).all()
    assert not torch.equal(shifted, x)  # it does shift
    mirrored = (crop_flip(2)(x, g)[..., 0] == 255).flatten(1).all(1).sum()
    assert 50 < mirrored < 150  # the same check does see crop_flip's mirrors


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb)
                                    for (xa, ya), (xb, yb) in zip(a, b))


def test_loader_batches_are_a_function_of_seed_and_epoch():
    """What exact resume needs: the batches of epoch e, augmentation included, do not depend on
    what the loader did before; set_epoch(e) on a fresh loader replays them."""
    x = torch.randint(0, 256, (24, 1, 6, 6), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    y = torch.arange(24)

    def make(seed=7):
        return TensorLoader(x, y, 5, shuffle=True, augment=crop_flip(2),
                            transform=lambda b: b.float(), seed=seed)

    assert make().epoch == 1
    loader = make()
    through = [list(loader) for _ in range(4)]  # epochs 1..4, never calling set_epoch
    again = make()
    # A fresh loader repeats the sequence.
    assert same_batches([list(again) for _ in range(3)][2], through[2])
    skipped = make()
    skipped.set_epoch(3)
    assert same_batches(list(skipped), through[2])  # straight to epoch 3 == iterated through 1..3
    assert skipped.epoch == 4 and same_batches(list(skipped), through[3])  # and then on to epoch 4
    assert not same_batches(through[0], through[1])  # a new order every epoch
    other_seed = make(8)
    other_seed.set_epoch(3)
    assert not same_batches(list(other_seed), through[2])
    # The augmentation too, not just the order: without shuffling, each epoch crops afresh.
    unshuffled = TensorLoader(x, y, 5, augment=crop_flip(2), seed=7)
    a, b = list(unshuffled), list(unshuffled)
    assert all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(a, b)) and not same_batches(a, b)
    unshuffled.set_epoch(1)
    assert same_batches(list(unshuffled), a)


def test_each_batch_of_an_epoch_gets_its_own_augmentation():
    x = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).repeat(16, 1, 1, 1)  # one image x16
    loader = TensorLoader(x, torch.zeros(16, dtype=torch.long), 4, augment=translate(2))
    batches = [xb for xb, _ in loader]
    assert len({tuple(b.flatten().tolist()) for b in batches}) == 4


def test_augment_runs_before_transform():
    calls = []

    def augment(xb, generator):
        calls.append(("augment", xb.dtype))
        assert isinstance(generator, torch.Generator) and generator.device.type == "cpu"
        return xb + 1

    def transform(xb):
        calls.append(("transform", xb.dtype))
        return xb.float() * 10

    x = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    (out, _), = TensorLoader(x, torch.zeros(4, dtype=torch.long), 4, augment=augment,
                             transform=transform)
    assert calls == [("augment", torch.uint8), ("transform", torch.uint8)]
    assert torch.equal(out, torch.full((4, 1, 2, 2), 10.0))


def test_device_and_seeds():
    assert pick_device("cpu").type == "cpu" and pick_device("auto").type in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        with pytest.raises(LabError, match="no CUDA GPU"):
            pick_device("cuda")
    with autocast(torch.device("cpu")):
        # No autocast on the CPU.
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
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


def test_benchmark_runner_lists_entries_and_rejects_unknown(capsys):
    from benchmarks import run as bench

    assert bench.main(["--list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) >= 10 and all(line.split()[0] in bench.entries() for line in listing)
    with pytest.raises(SystemExit) as stop:
        bench.main(["no_such_bench"])
    assert stop.value.code == 2 and "--list" in capsys.readouterr().err


def test_benchmark_result_records_cpu_time_and_the_load_around_it(monkeypatch):
    from benchmarks import run as bench

    fake = bench.Benchmark(
        lambda data_dir, device, options: {"metric": "m", "value": sum(range(10**5))}, "fake")
    monkeypatch.setattr(bench, "entries", lambda: {"fake": fake})
    loads = iter([(0.4, 0, 0), (2.5, 0, 0)])
    monkeypatch.setattr(bench.os, "getloadavg", lambda: next(loads))
    result = bench.run_once("fake", "", "cpu", {})
    assert result["value"] == sum(range(10**5)) and result["cpu_s"] > 0
    assert (result["load_start"], result["load_end"]) == (0.4, 2.5)


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


def test_half_of_an_mnist_pair_names_the_missing_file(tmp_path, offline):
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    n = 2
    header = bytes([0, 0, 8, 3]) + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (raw / "train-images-idx3-ubyte").write_bytes(header + bytes(n * 784))
    with pytest.raises(LabError, match="train-labels-idx1-ubyte is missing"):
        load("mnist", tmp_path / "root")


def test_data_dir_that_is_a_file_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(LabError, match="is not a folder"):
        load("mnist", tmp_path / "afile")
    monkeypatch.setenv("DL_LABS_DATA", str(tmp_path / "afile"))
    with pytest.raises(LabError, match=r"\$DL_LABS_DATA .* is a file"):
        data_root()


def test_download_keeps_a_file_only_when_its_checksum_matches(tmp_path):
    import hashlib

    from common.download import download, fetching
    from common.errors import DataUnavailable

    source = tmp_path / "archive.bin"
    source.write_bytes(b"the original bytes")
    good = hashlib.sha256(b"the original bytes").hexdigest()
    root = tmp_path / "new" / "root"
    expected = (r"^demo is not in .*root and could not be downloaded "
                r"\(the download's sha256 is not 0+\).*--smoke")
    with pytest.raises(DataUnavailable, match=expected), fetching("demo", root):
        download(source.as_uri(), root / "archive.bin", "0" * 64)
    assert not (tmp_path / "new").exists(), "a failed download leaves no folder behind"
    with fetching("demo", root):
        kept = download(source.as_uri(), root / "archive.bin", good)
    assert kept.read_bytes() == b"the original bytes"
    assert sorted(p.name for p in root.iterdir()) == ["archive.bin"]
