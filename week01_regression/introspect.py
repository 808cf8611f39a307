"""Week 1 helpers that look inside PyTorch: what the install sees, and the graph autograd records.

Part 2 prints both; neither is needed to train a model, so they live here.
"""

from __future__ import annotations

import platform

import numpy as np
import torch


def environment(device: torch.device) -> dict:
    """What this machine offers PyTorch. Run it first on a new machine: it shows whether the
    install sees your GPU (a CPU-only wheel reports CUDA available: False even with a GPU)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": str(torch.version.cuda),  # the wheel's CUDA ("None": a CPU-only wheel)
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "mps_available": torch.backends.mps.is_available(),
        "cpu_threads": torch.get_num_threads(),
    }


def graph_chain(fn) -> list[str]:
    """The names of the backward nodes reachable from ``fn`` (a tensor's ``grad_fn``), depth first.

    Each operation run on a tensor that requires grad adds a node that knows how to pass a
    gradient back to its inputs (``next_functions``). AccumulateGrad nodes are the leaves: they
    add the incoming gradient into a leaf tensor's ``.grad``.
    """
    names, stack, seen = [], [(fn, 0)], set()
    while stack:
        node, depth = stack.pop()
        if node is None:  # an input that needs no gradient (a constant)
            continue
        name = type(node).__name__
        if hasattr(node, "variable"):  # AccumulateGrad: the leaf tensor whose .grad it fills
            name += " (adds into the leaf tensor's .grad)"
        if id(node) in seen:  # several paths lead here (x is used 3 times): no repeated subtree
            names.append("  " * depth + name + " (same node as above)")
            continue
        seen.add(id(node))
        names.append("  " * depth + name)
        stack.extend((child, depth + 1) for child, _ in reversed(node.next_functions))
    return names
