"""Week 11, Part 1: the ideas of distributed training in working code.

1. Data parallelism is gradient averaging. N workers each compute the gradient of the mean loss
   on their own B examples; the average of the N gradients is the gradient on all N*B:

       (1/N) sum_k (1/B) sum_{i in shard k} grad l_i  =  (1/(N B)) sum_{all i} grad l_i

   so N workers with batch B take exactly the step one worker with batch N*B would take (if the
   shards are the same size: with unequal shards the plain average weights examples unequally).
2. Ring all-reduce, the algorithm behind that average, written with torch.distributed
   point-to-point sends (isend/irecv) between N processes (gloo), checked against dist.all_reduce.
3. A cost model (NumPy) of a parameter server vs ring all-reduce as the number of workers grows.
4. DataParallel vs DistributedDataParallel.

DataParallel (one process, several GPUs): every step it copies the model to each GPU, splits
the batch, runs the replicas in threads, and gathers the outputs and sums the gradients on GPU 0.
One Python process drives all GPUs (the GIL and GPU 0 become bottlenecks), it works on one
machine only, and the copies are redone every step. DistributedDataParallel (one process per
GPU or CPU worker, started by torchrun): each process keeps its own replica for the whole run,
and only gradients travel, all-reduced in buckets while backward() is still computing: no
master, no per-step copies, and the same code runs across machines. PyTorch recommends DDP even
on a single machine. On a CPU-only machine DataParallel has no devices to split over: it just
calls the model (shown below).

Run: python week11_distributed/part1.py [--smoke] [--help]
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, ClassVar

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from common.config import BaseConfig, Range
from common.device import seed_everything
from common.distributed import spawn
from common.errors import LabError
from common.plots import save
from common.runner import launch
from common.runs import Run


@dataclass
class Config(BaseConfig):
    """Week 11, Part 1: gradient averaging, ring all-reduce across processes, a cost model."""

    workers: Annotated[int, Range(2, 16)] = 4  # processes in the ring all-reduce (gloo, here)
    elements: Annotated[int, Range(1, 100_000_000)] = 1_000_003  # vector all-reduced and timed
    model_mb: Annotated[float, Range(0, 1e6, lo_open=True)] = 100.0  # cost model: MB of gradients
    bandwidth_gbit: Annotated[float, Range(0, 1e6, lo_open=True)] = 10.0  # cost model: Gbit/s
    latency_us: Annotated[float, Range(0, 1e6)] = 50.0  # cost model: microseconds per message
    max_workers: Annotated[int, Range(2, 4096)] = 64  # cost model: workers from 1 to this

    SMOKE: ClassVar[dict] = {"workers": 2, "elements": 10_007}
    UNUSED: ClassVar[tuple] = ("device", "data_dir")  # gloo on the CPU; no data set


# ----------------------------------------------------------------------------------------
# 1. Data parallelism = averaging gradients
# ----------------------------------------------------------------------------------------
def mse_gradient(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gradient of the mean squared error L = (1/B) sum_i (x_i . w - y_i)^2:

        dL/dw = (2/B) X^T (X w - y)
    """
    return 2.0 / len(x) * x.T @ (x @ w - y)


def averaged_gradient(w: np.ndarray, x: np.ndarray, y: np.ndarray, workers: int) -> np.ndarray:
    """What N data-parallel workers compute together: each the gradient on its own shard (rows
    k, k + N, k + 2N, ..., as DistributedSampler deals them), then the average of the N."""
    return np.mean([mse_gradient(w, x[k::workers], y[k::workers]) for k in range(workers)], axis=0)


# ----------------------------------------------------------------------------------------
# 2. Ring all-reduce with point-to-point messages
# ----------------------------------------------------------------------------------------
def exchange(send: torch.Tensor, receive: torch.Tensor, right: int, left: int) -> None:
    """Send ``send`` to the right neighbour while receiving ``receive`` from the left one.
    Both at once (isend/irecv): if every rank first did a blocking send, all would wait for a
    receiver that is itself still sending, a deadlock once messages outgrow the socket buffers."""
    requests = []
    # A vector shorter than the ring has empty chunks: nothing to send or receive for those. The
    # chunk a rank sends is the one its right neighbour receives, so both sides skip it alike.
    if send.numel():
        requests.append(dist.isend(send.contiguous(), right))
    if receive.numel():
        requests.append(dist.irecv(receive, left))
    for request in requests:
        request.wait()


def ring_all_reduce(tensor: torch.Tensor) -> int:
    """Sum ``tensor`` over all ranks, in place; returns the number of elements this rank sent.

    The N ranks stand in a ring (rank r sends to r+1 and receives from r-1, modulo N) and the
    tensor is cut into N chunks c_0 .. c_{N-1}.

    Reduce-scatter, N-1 steps: at step s rank r sends chunk (r - s) mod N and adds the chunk
    (r - s - 1) mod N that arrives into its own copy. Each chunk travels once around the ring
    collecting every rank's part, so afterwards rank r holds the full sum of chunk (r + 1) mod N.

    All-gather, N-1 steps: at step s rank r sends chunk (r + 1 - s) mod N (a finished sum) and
    stores the chunk (r - s) mod N that arrives. Afterwards every rank has every summed chunk.

    Each rank sends 2(N-1) chunks of M/N elements, 2(N-1)/N * M in all: almost independent of
    N, and every link carries data at every step. That is why rings scale (Part 1's cost model).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    right, left = (rank + 1) % world, (rank - 1) % world
    chunks = list(tensor.view(-1).tensor_split(world))  # views; sizes differ by at most one
    sent = 0
    for s in range(world - 1):  # reduce-scatter
        out, into = (rank - s) % world, (rank - s - 1) % world
        incoming = torch.empty_like(chunks[into])
        exchange(chunks[out], incoming, right, left)
        chunks[into] += incoming
        sent += chunks[out].numel()
    for s in range(world - 1):  # all-gather
        out, into = (rank + 1 - s) % world, (rank - s) % world
        incoming = torch.empty_like(chunks[into])
        exchange(chunks[out], incoming, right, left)
        chunks[into].copy_(incoming)
        sent += chunks[out].numel()
    return sent


def rank_input(rank: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A different vector on every rank, with exact zeros and ties (DESIGN.md 7)."""
    g = torch.Generator().manual_seed(1000 + rank)
    if dtype.is_floating_point:
        x = torch.randn(n, generator=g, dtype=dtype)
    else:
        x = torch.randint(-50, 50, (n,), generator=g, dtype=dtype)
    x[::5] = 0  # zeros
    x[1::7] = 3  # the same value on every rank
    return x


def ring_worker(rank: int, world: int, store_dir: str, sizes: list[int], timed_elements: int,
                timeout_s: float) -> None:
    """One process of the ring: compare ring_all_reduce with dist.all_reduce, time both."""
    # A FileStore to meet in: no port to pick, so no clash with another run on this machine.
    # timeout: a rank waiting longer than this for a message fails instead of waiting forever.
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))
    torch.set_num_threads(1)
    results = []
    for n in sizes:
        for dtype in (torch.int64, torch.float64):
            mine, reference = rank_input(rank, n, dtype), rank_input(rank, n, dtype)
            sent = ring_all_reduce(mine)
            dist.all_reduce(reference)
            expected = sum(rank_input(r, n, dtype) for r in range(world))  # the sum, computed here
            results.append({"n": n, "dtype": str(dtype), "sent": sent,
                            "equal_ints": None if dtype.is_floating_point
                            else bool(torch.equal(mine, reference)),
                            "max_abs_diff": (mine - reference).abs().max().item() if n else 0.0,
                            "max_abs_diff_expected":
                                (mine - expected).abs().max().item() if n else 0.0})
    x = rank_input(rank, timed_elements, torch.float32)
    timing = {}
    for name, reduce in (("ring", ring_all_reduce), ("all_reduce", dist.all_reduce)):
        reduce(x.clone())  # warm up the connections
        dist.barrier()
        start = time.perf_counter()
        for _ in range(3):
            reduce(x.clone())
        timing[name] = (time.perf_counter() - start) / 3
    torch.save({"results": results, "timing": timing}, Path(store_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run_ring(world: int, sizes: list[int], timed_elements: int,
             timeout_s: float = 120) -> list[dict]:
    """Start ``world`` processes that all-reduce both ways; each rank's results.

    A ring with a bug in its chunk arithmetic deadlocks (a rank waits for a message nobody
    sends): gloo fails a rank that waits ``timeout_s`` for one, and ``spawn`` kills whatever
    still runs a little later, so a wrong ring fails with a message instead of hanging."""
    with tempfile.TemporaryDirectory() as store_dir:
        try:
            spawn(ring_worker, world, args=(world, store_dir, sizes, timed_elements, timeout_s),
                  timeout_s=timeout_s + 15)
        except LabError as e:
            raise LabError(f"the ring all-reduce failed: {e}") from None
        return [torch.load(Path(store_dir) / f"rank{r}.pt", weights_only=True)
                for r in range(world)]


# ----------------------------------------------------------------------------------------
# 3. Cost model: parameter server vs ring all-reduce
# ----------------------------------------------------------------------------------------
def parameter_server_cost(workers: np.ndarray, model_bytes: float, bandwidth: float,
                          latency: float):
    """One parameter server. Each worker pushes its gradient (M bytes) and pulls the new weights
    (M bytes): 2M per worker, but all 2NM go through the server's one link, one after another:

        time = 2 (latency + N M / bandwidth)          grows linearly with N
    Returns (bytes sent or received per worker, bytes through the busiest link, seconds)."""
    per_worker = np.full(workers.shape, 2.0 * model_bytes)
    busiest = 2.0 * workers * model_bytes
    return per_worker, busiest, 2 * (latency + workers * model_bytes / bandwidth)


def ring_cost(workers: np.ndarray, model_bytes: float, bandwidth: float, latency: float):
    """Ring all-reduce: 2(N-1) steps, each moving a chunk of M/N bytes over every link at once:

        per worker  2 (N-1)/N M  (-> 2M: does not grow with N)
        time        2 (N-1) (latency + M / (N bandwidth))   -> 2 M / bandwidth + 2 N latency
    Bandwidth-optimal; latency grows with N (trees and hierarchical rings fix that at scale)."""
    n = workers.astype(float)
    per_worker = 2 * (n - 1) / n * model_bytes
    return per_worker, per_worker, 2 * (n - 1) * (latency + model_bytes / (n * bandwidth))


def plot_costs(workers: np.ndarray, costs: dict[str, tuple], path: Path, model_mb: float,
               gbit: float) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (_, busiest, seconds) in costs.items():
        left.plot(workers, busiest / 1e6, label=name)
        right.plot(workers, seconds, label=name)
    left.set(xlabel="workers N", ylabel="MB through the busiest link per step", yscale="log",
             title=f"traffic, {model_mb:g} MB of gradients")
    right.set(xlabel="workers N", ylabel="seconds per gradient exchange", yscale="log",
              title=f"time at {gbit:g} Gbit/s")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    return save(fig, path)


# ----------------------------------------------------------------------------------------
# 4. DataParallel where it can run
# ----------------------------------------------------------------------------------------
def data_parallel_demo() -> dict:
    """nn.DataParallel over the visible GPUs. With none (this CPU) it has nothing to split over
    and calls the wrapped model directly; with several it scatters the batch and gathers the
    outputs."""
    model = nn.Linear(8, 3)
    wrapped = nn.DataParallel(model)
    x = torch.randn(32, 8)
    if torch.cuda.device_count() >= 1:
        model.cuda()
        x = x.cuda()
    same = torch.allclose(wrapped(x), model(x), atol=1e-6)
    gpus = len(wrapped.device_ids)
    how = (f"; on this CPU it simply calls the model (same output: {same})" if gpus == 0 else
           f"; each gets {32 // gpus} of the 32 examples, outputs gathered on GPU 0")
    print(f"DataParallel: {gpus} GPU(s) to split a batch over{how}")
    return {"dataparallel_gpus": gpus, "dataparallel_same_output": same}


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    run = Run.start(cfg, __file__, torch.device("cpu"))

    print("=== 1. Data parallelism: the average of the shard gradients is the big-batch one ===")
    rng = np.random.default_rng(cfg.seed)
    x, y, w = rng.normal(size=(96, 5)), rng.normal(size=96), rng.normal(size=5)
    full, averaged = mse_gradient(w, x, y), averaged_gradient(w, x, y, cfg.workers)
    uneven = np.mean([mse_gradient(w, x[:10], y[:10]), mse_gradient(w, x[10:], y[10:])], axis=0)
    grad_diff = float(np.abs(full - averaged).max())
    uneven_diff = float(np.abs(full - uneven).max())
    print(f"{cfg.workers} equal shards of {96 // cfg.workers}: "
          f"max |average - full batch| = {grad_diff:.1e}")
    print(f"shards of 10 and 86 averaged plainly: max |difference| = {uneven_diff:.3f} "
          "(why shards are equal)")

    print(f"\n=== 2. Ring all-reduce across {cfg.workers} processes (gloo) vs dist.all_reduce ===")
    sizes = sorted({1, cfg.workers - 1, cfg.workers, 2 * cfg.workers + 1, 1000})
    ranks = run_ring(cfg.workers, sizes, cfg.elements)
    rows = [row for rank in ranks for row in rank["results"]]
    ints_equal = all(r["equal_ints"] for r in rows if r["equal_ints"] is not None)
    float_diff = max(r["max_abs_diff"] for r in rows if r["equal_ints"] is None)
    expected_diff = max(r["max_abs_diff_expected"] for r in rows)
    sent = [r["sent"] for r in ranks[0]["results"] if r["n"] == 1000][0]
    formula = 2 * (cfg.workers - 1) / cfg.workers * 1000
    print(f"sizes {sizes}: int64 identical on every rank: {ints_equal}; "
          f"float64 max |ring - all_reduce| = {float_diff:.1e} (sums added in another order)")
    print(f"rank 0 sent {sent} elements to all-reduce 1000; 2(N-1)/N x 1000 = {formula:.1f}")
    ring_s = max(r["timing"]["ring"] for r in ranks)
    builtin_s = max(r["timing"]["all_reduce"] for r in ranks)
    print(f"{cfg.elements:,} float32: ring {ring_s * 1e3:.1f} ms, "
          f"dist.all_reduce {builtin_s * 1e3:.1f} ms")
    for r in rows:
        run.log(step="ring", n=r["n"], dtype=r["dtype"], sent=r["sent"],
                max_abs_diff=r["max_abs_diff"])

    print("\n=== 3. Cost model: parameter server vs ring ===")
    workers = np.arange(1, cfg.max_workers + 1)
    model_bytes, bandwidth = cfg.model_mb * 1e6, cfg.bandwidth_gbit * 1e9 / 8
    latency = cfg.latency_us * 1e-6
    costs = {"parameter server": parameter_server_cost(workers, model_bytes, bandwidth, latency),
             "ring all-reduce": ring_cost(workers, model_bytes, bandwidth, latency)}
    plot_costs(workers, costs, run.path("cost_model.png"), cfg.model_mb, cfg.bandwidth_gbit)
    for n in sorted({2, 8, cfg.max_workers}):
        ps, ring = costs["parameter server"][2][n - 1], costs["ring all-reduce"][2][n - 1]
        print(f"N={n:4d}: parameter server {ps:8.3f} s, ring {ring:6.3f} s per exchange")
        run.log(step="cost", n=n, parameter_server_s=ps, ring_s=ring)

    print("\n=== 4. DataParallel vs DistributedDataParallel ===")
    demo = data_parallel_demo()
    print("DDP: one process per device, gradients all-reduced during backward (Part 2 uses it)")
    return run.finish(grad_avg_max_diff=grad_diff, uneven_shards_max_diff=uneven_diff,
                       ring_ints_equal=ints_equal, ring_float_max_diff=float_diff,
                       ring_vs_exact_sum_max_diff=expected_diff,
                       ring_sent_elements=sent, ring_sent_formula=formula, ring_ms=ring_s * 1e3,
                       all_reduce_ms=builtin_s * 1e3, workers=cfg.workers,
                       ps_time_s_at_max=float(costs["parameter server"][2][-1]),
                       ring_time_s_at_max=float(costs["ring all-reduce"][2][-1]), **demo)


if __name__ == "__main__":
    launch(main, Config)
