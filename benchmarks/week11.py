"""Week 11 benchmarks on real MNIST: one process vs two DDP ranks, the profiler's bottleneck and
its fixes, and the throughput sweep.

    python benchmarks/run.py ddp_mnist --data-dir DATA [--set epochs=1]
    python benchmarks/run.py profile_mnist --data-dir DATA [--set batch_size=128]
    python benchmarks/run.py throughput_mnist --data-dir DATA [--set steps=20]

``ddp_mnist`` trains week11_distributed/part2.py for the same epochs and the same global batch
twice, as whole processes one after the other: one process with a batch of B and torch's
threads (2 on this machine; ``--set single_threads=1`` for one), then ``torchrun
--nproc_per_node 2`` (each rank gets its share of the cores, one here:
``common.distributed.threads_per_rank``) with B/2 per rank. Same steps, same
math (Part 2's equivalence test): it reports both training throughputs (images/s of the last
epoch, start-up excluded), both whole-process wall times, the ratio, and both test accuracies.
On a machine with N free cores two ranks can approach 2x; two ranks on 2 cores only trade
intra-op threads for processes plus an all-reduce per step.

``profile_mnist`` runs week11_distributed/profiling.py (per-image loading, batched loading,
channels-last) and ``throughput_mnist`` week11_distributed/throughput.py; their figures are
copied next to the result JSON. Any ``--set key=value`` that names a field of the script's
Config is passed on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.run import RESULTS, Benchmark, config_options
from week11_distributed import part2, profiling, throughput

ROOT = Path(__file__).resolve().parents[1]
DDP = dict(epochs=1, batch_size=128)  # global batch; each of the 2 ranks gets half


def _summary(out: Path) -> dict:
    (path,) = out.glob("week11/part2/*/summary.json")
    return json.loads(path.read_text())


def _timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    return round(time.perf_counter() - start, 2)


def ddp_vs_single(data_dir: str, device: str, options: dict) -> dict:
    fields, extra = config_options(options, part2.Config, extra_keys=("single_threads",))
    settings = {**DDP, **fields}
    single_threads = int(extra.get("single_threads", 0))  # 0: torch's default (one per core)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items() if k != "batch_size"]
    common = [str(ROOT / "week11_distributed" / "part2.py"), "--data-dir", data_dir,
              "--device", device, *flags]
    with tempfile.TemporaryDirectory() as tmp:
        single_out, ddp_out = Path(tmp) / "single", Path(tmp) / "ddp"
        # torch's default threads
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        single_env = {**env, "OMP_NUM_THREADS": str(single_threads)} if single_threads else env
        single_wall = _timed([sys.executable, *common, "--out", str(single_out),
                              f"--batch-size={settings['batch_size']}"], single_env)
        ddp_wall = _timed([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", *common, "--out", str(ddp_out),
                           f"--batch-size={settings['batch_size'] // 2}"], env)
        single, ddp = _summary(single_out), _summary(ddp_out)
    keep = ("images_per_s", "test_acc", "final_train_loss", "steps", "global_batch", "world_size")
    return {"metric": "ddp_vs_single_images_per_s",
            "value": round(ddp["images_per_s"] / single["images_per_s"], 3),
            "single": {k: single[k] for k in keep}, "ddp_2_ranks": {k: ddp[k] for k in keep},
            "wall_s_single": single_wall, "wall_s_ddp": ddp_wall,
            "single_threads": single_threads or "default", "config": settings}


def _script_run(module, data_dir: str, device: str, options: dict, figure: str, name: str) -> dict:
    fields, _ = config_options(options, module.Config)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = module.Config(**fields, data_dir=data_dir, device=device, out=tmp)
        summary = module.main(cfg)
        RESULTS.mkdir(exist_ok=True)
        shutil.copy(Path(summary["run_dir"]) / figure, RESULTS / f"{name}.png")
        if module is profiling:
            for table in Path(summary["run_dir"]).glob("top_ops_*.txt"):
                shutil.copy(table, RESULTS / f"{name}_{table.name}")
    return {k: v for k, v in summary.items() if k != "run_dir"} | {"config": fields}


def profile_mnist(data_dir: str, device: str, options: dict) -> dict:
    result = _script_run(profiling, data_dir, device, options, "bottleneck.png", "profile_mnist")
    return {"metric": "channels_last_vs_per_image_images_per_s", "value": result["speedup"],
            **result}


def throughput_mnist(data_dir: str, device: str, options: dict) -> dict:
    result = _script_run(throughput, data_dir, device, options, "throughput.png",
                         "throughput_mnist")
    return {"metric": "best_images_per_s", "value": result["best_images_per_s"], **result}


ENTRIES = {
    "ddp_mnist": Benchmark(ddp_vs_single, "Week 11 Part 2 on MNIST: 2 DDP ranks (torchrun, gloo) "
                                          "vs 1 process, same global batch: training images/s "
                                          "ratio"),
    "profile_mnist": Benchmark(profile_mnist, "Week 11 profiler on MNIST: per-image loading -> "
                                              "batched -> channels-last, images/s ratio of the "
                                              "last to the first"),
    "throughput_mnist": Benchmark(throughput_mnist, "Week 11 throughput sweep on MNIST: batch "
                                                    "size x workers x bf16, best images/s"),
}
