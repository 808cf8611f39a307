"""Week 10, Part 1: saving a model right, and exporting it for other runtimes.

One Week 3 CNN (BatchNorm + Dropout, a few training steps on the synthetic twin) goes through
every way of keeping a model, and each copy is checked against the eager model on a batch size
other than the one it was exported with (tolerance: ATOL below), then timed:

    state_dict        tensors only; rebuild the class, load the weights (weights_only=True)
    whole model       torch.save(model) pickles the object: refused by weights_only=True, and
                      rightly: unpickling runs code (shown with a harmless payload, never executed)
    checkpoint        model + optimizer + scheduler + epoch (common.checkpoint): training resumes
                      exactly; the weights alone do not (AdamW's moments are lost)
    torch.export      .pt2 file, dynamic batch axis; needs no Python class to load (but unpickles)
    ONNX              the torch.export-based exporter, onnx.checker, run in ONNX Runtime
    TorchScript       torch.jit.trace: deprecated (PyTorch says "switch to torch.compile or
                      torch.export"); shown as the legacy path, and why it is risky

Dynamic graphs, the classic pitfall: tracing records the ONE path the example input took, so a
model with ``if x.sum() > 0`` is silently wrong for other inputs after ``torch.jit.trace``;
``torch.export`` refuses it with an error instead (rewrite the branch with ``torch.cond``).

Run: python week10_deploy/part1.py [--smoke] [--help]
     python week10_deploy/part1.py --dataset cifar10 --repeats 200
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from common.checkpoint import load_checkpoint, save_checkpoint
from common.config import BaseConfig, Range
from common.data import load
from common.device import seed_everything
from common.loader import TensorLoader, normalizer
from common.runner import launch
from common.runs import Run
from week03_cnn.part2 import CNN
from week10_deploy.export import export_onnx, export_program

# largest |difference| from eager accepted: float32 kernels summing in another order, not a bug
ATOL = 1e-4


@dataclass
class Config(BaseConfig):
    """Week 10, Part 1: state_dict vs pickle, checkpoints, torch.export, ONNX, old TorchScript."""

    dataset: Literal["mnist", "cifar10"] = "mnist"  # image shape and classes (data: synthetic twin)
    width: Annotated[int, Range(1, 512)] = 32  # channels of the CNN's first block (Week 3's: 32)
    train_steps: Annotated[int, Range(1)] = 20  # steps before saving (BN statistics, AdamW moments)
    export_batch: Annotated[int, Range(2)] = 8  # batch size of the example input for the exporters
    check_batches: tuple[int, ...] = (1, 5, 64)  # batch sizes the copies are compared with eager at
    repeats: Annotated[int, Range(1)] = 100  # timed calls per copy and batch size (median reported)

    SMOKE: ClassVar[dict] = {"width": 8, "train_steps": 6, "check_batches": (1, 5), "repeats": 10}
    UNUSED: ClassVar[tuple] = ("device", "data_dir")  # CPU inference on the synthetic twin

    def check(self) -> None:
        from common.errors import ConfigError

        if not self.check_batches or min(self.check_batches) < 1:
            raise ConfigError("--check-batches needs batch sizes >= 1")
        if 1 not in self.check_batches:
            raise ConfigError("--check-batches must include 1: the batch size a service sees most")


def max_diff(a, b) -> float:
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else a
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else b
    return float(np.abs(a - b).max())


def median_ms(call, x, repeats: int) -> float:
    """Median wall time of ``call(x)`` in ms, after 3 warm-up calls (first calls allocate)."""
    for _ in range(3):
        call(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


# ---- A model in a realistic state: trained a little, so BN statistics and AdamW moments exist ----
def trained_model(cfg: Config):
    data = load(cfg.dataset, smoke=True, seed=cfg.seed)  # twin: Part 1 is about files, not accuracy
    model = CNN(data.x_train.shape[1], data.num_classes, (cfg.width, 2 * cfg.width, 4 * cfg.width),
                batch_norm=True, dropout=0.2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    batches = TensorLoader(data.x_train, data.y_train, 32, shuffle=True, seed=cfg.seed,
                           transform=normalizer(data.mean, data.std))
    steps = 0
    while steps < cfg.train_steps:
        for x, y in batches:
            train_step(model, optimizer, scheduler, x, y)
            steps += 1
            if steps == cfg.train_steps:
                break
    return model, optimizer, scheduler, data, batches


def train_step(model, optimizer, scheduler, x, y) -> None:
    model.train()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    scheduler.step()


# ---- 1. state_dict vs the whole pickled model ----
class RunsCodeWhenUnpickled:
    """What a malicious .pt file can hold: unpickling calls ``__reduce__``'s function with its
    arguments. Ours would only print; a real one could call os.system."""

    def __reduce__(self):
        return (print, ("this ran while the file was being loaded!",))


def state_dict_round_trip(model: nn.Module, make: callable, x: torch.Tensor, folder: Path) -> dict:
    torch.save(model.state_dict(), folder / "weights.pt")  # tensors in a dict: nothing to execute
    fresh = make()  # the code defines the architecture, the file only holds numbers
    fresh.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
    fresh.eval()
    with torch.inference_mode():
        diff = max_diff(fresh(x), model(x))
    torch.save(model, folder / "whole_model.pt")  # a pickle: loading needs week03_cnn.part2.CNN
    torch.save({"weights": model.state_dict(), "surprise": RunsCodeWhenUnpickled()},
               folder / "malicious.pt")
    refused = {}
    for name in ("whole_model.pt", "malicious.pt"):
        try:
            torch.load(folder / name, weights_only=True)  # the default since PyTorch 2.6
            refused[name] = False
        except Exception as e:
            # pickle.UnpicklingError: "Weights only load failed ... Unsupported global"
            refused[name] = True
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            why = (f"it would call or build {found.group(1)}" if found
                   else str(e).splitlines()[0][:90])
            print(f"  torch.load({name}, weights_only=True) refused it: {why}")
    # We never call torch.load(..., weights_only=False) on these: on a file from elsewhere that
    # is running the stranger's code. Only for your own files; a state_dict needs none of it.
    return {"state_dict_max_abs_diff": diff, "pickled_model_refused": refused["whole_model.pt"],
            "malicious_refused": refused["malicious.pt"]}


# ---- 2. A full training checkpoint: resume exactly ----
def checkpoint_round_trip(model, optimizer, scheduler, make, batches, folder: Path,
                          x: torch.Tensor) -> dict:
    path = save_checkpoint(folder / "checkpoint.pt", model, optimizer, scheduler, epoch=1,
                           script="week10/part1")
    resumed = make()
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=2e-3)
    resumed_sched = torch.optim.lr_scheduler.StepLR(resumed_opt, step_size=5, gamma=0.5)
    load_checkpoint(path, resumed, resumed_opt, resumed_sched)  # weights_only=True inside
    weights_only = make()  # the mistake: the model's weights, a fresh optimizer
    weights_only.load_state_dict(model.state_dict())
    fresh_opt = torch.optim.AdamW(weights_only.parameters(), lr=2e-3)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=5, gamma=0.5)
    rng = torch.get_rng_state()
    for net, opt, sched in ((model, optimizer, scheduler), (resumed, resumed_opt, resumed_sched),
                            (weights_only, fresh_opt, fresh_sched)):
        torch.set_rng_state(rng)  # the same dropout masks for all three
        for i, (xb, yb) in enumerate(batches):
            train_step(net, opt, sched, xb, yb)
            if i == 2:
                break
    for net in (model, resumed, weights_only):
        net.eval()
    with torch.inference_mode():
        reference = model(x)
        return {"checkpoint_max_abs_diff": max_diff(resumed(x), reference),
                "weights_only_resume_diff": max_diff(weights_only(x), reference)}


# ---- 3. Dynamic graphs: tracing bakes in a branch, torch.export refuses it ----
class Branchy(nn.Module):
    """Flips the sign of inputs whose sum is negative: Python control flow on a tensor's value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return -x * 2


def dynamic_graph_pitfall(folder: Path) -> dict:
    model, positive, negative = Branchy(), torch.ones(2, 3), -torch.ones(2, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, positive)  # records the x.sum() > 0 path only
    trace_warned = any("Converting a tensor to a Python boolean" in str(w.message) for w in caught)
    wrong = not torch.equal(traced(negative), model(negative))
    print(f"  torch.jit.trace: follows the traced branch for a negative input: {wrong} "
          f"(its only hint, a TracerWarning: {trace_warned})")
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    # the exporter also prints the partial graph; its error says enough
    torch_log.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            export_program(model, positive, folder / "branchy.pt2")
        refused = False
    except Exception as e:
        refused = True
        print(f"  torch.export refuses it: {str(e)[:110]}...")
    finally:
        torch_log.setLevel(level)
    return {"trace_wrong_branch": wrong, "export_refused_branch": refused}


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    # as configured (OMP_NUM_THREADS); stated in the summary
    torch.set_num_threads(torch.get_num_threads())
    run = Run.start(cfg, __file__, torch.device("cpu"))
    folder = run.path("files")
    folder.mkdir()
    model, optimizer, scheduler, data, batches = trained_model(cfg)
    widths = (cfg.width, 2 * cfg.width, 4 * cfg.width)
    make = lambda: CNN(model.features[0].in_channels, data.num_classes, widths,
                       batch_norm=True, dropout=0.2)
    c, h, w = data.x_train.shape[1:]
    normalize = normalizer(data.mean, data.std)
    inputs = {b: normalize(data.x_test[torch.arange(b) % len(data.x_test)])
              for b in cfg.check_batches}
    x = inputs[max(cfg.check_batches)]

    print("1. state_dict vs pickling the whole model")
    model.eval()
    results = state_dict_round_trip(model, make, x, folder)
    with torch.inference_mode():  # the pitfall before any export: forgetting model.eval()
        results["train_mode_diff"] = max_diff(model.train()(x), model.eval()(x))
    print(f"  eval() vs train() outputs differ by up to {results['train_mode_diff']:.3g} "
          "(Dropout, BN batch stats)")

    print("2. a full training checkpoint (common.checkpoint) and an exact resume")
    results.update(checkpoint_round_trip(model, optimizer, scheduler, make, batches, folder, x))
    print(f"  3 more steps after loading: checkpoint {results['checkpoint_max_abs_diff']:.3g} "
          f"from the uninterrupted model, weights alone "
          f"{results['weights_only_resume_diff']:.3g}")
    model.eval()

    print(f"3. exports with an example batch of {cfg.export_batch}, "
          f"checked at batches {list(cfg.check_batches)}")
    example = normalize(data.x_test[: cfg.export_batch])
    export_program(model, example, folder / "model.pt2")
    program = torch.export.load(folder / "model.pt2").module()
    export_onnx(model, example, folder / "model.onnx")  # onnx.checker-checked inside
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_input = session.get_inputs()[0]
    print(f"  ONNX input {onnx_input.name}: {onnx_input.shape} (the batch axis is a symbol)")
    # the legacy path, and what PyTorch says of it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scripted = torch.jit.trace(model, example)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        scripted = torch.jit.load(buffer)
    deprecations = list(dict.fromkeys(str(w.message) for w in caught
                                      if "deprecated" in str(w.message)))
    for message in deprecations:
        if "trace_method" not in message:
            print(f"  TorchScript: {message}")
    results["torchscript_deprecated"] = bool(deprecations)

    run_onnx = lambda t: torch.from_numpy(session.run(None, {onnx_input.name: t.numpy()})[0])
    copies = {"eager": model, "pt2": program, "torchscript": scripted, "onnx": run_onnx}
    with torch.inference_mode():
        for name, call in copies.items():
            diffs = [max_diff(call(inputs[b]), model(inputs[b])) for b in cfg.check_batches]
            if name != "eager":
                results[f"{name}_max_abs_diff"] = max(diffs)
                ok = "ok" if max(diffs) <= ATOL else f"MISMATCH (> {ATOL})"
                print(f"  {name:>11s}: max |difference| from eager {max(diffs):.2e} {ok}")
            for b, diff in zip(cfg.check_batches, diffs):
                ms = median_ms(call, inputs[b], cfg.repeats)
                run.log(form=name, batch=b, max_abs_diff=diff, median_ms=ms)
                results[f"{name}_ms_batch{b}"] = ms
    eager_ms = results["eager_ms_batch1"]
    for name in ("pt2", "onnx", "torchscript"):
        results[f"{name}_speedup_batch1"] = eager_ms / results[f"{name}_ms_batch1"]
    print("  median ms at batch 1: "
          + ", ".join(f"{n} {results[f'{n}_ms_batch1']:.3f}" for n in copies)
          + f"  (ONNX Runtime {results['onnx_speedup_batch1']:.2f}x eager; "
          f"{torch.get_num_threads()} threads)")

    print("4. dynamic graphs")
    results.update(dynamic_graph_pitfall(folder))
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
    print("  files: " + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in sizes.items()))
    return run.finish(**results, threads=torch.get_num_threads(), input_shape=[c, h, w],
                       file_kib={k: round(v / 1024, 1) for k, v in sizes.items()})


if __name__ == "__main__":
    launch(main, Config)
