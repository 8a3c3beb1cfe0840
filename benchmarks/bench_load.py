"""Throughput beside a competing busy process: torch's default threading against our policy.

The question (issue 13): on a small shared machine, how much training (and proxy-evaluation)
throughput is kept when one other process spins on a core, and what does the policy cost
when the machine is quiet? OpenMP reads its wait policy once, when the library loads, so
every configuration runs in a fresh child process; the configurations are run in turns
(round-robin, ``--rounds`` times) so drifting load from other users spreads over all of them.

Configurations (each measured quiet and beside one busy process):

- ``default``: torch's defaults (all cores, OpenMP's spin-then-sleep wait);
- ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep at once) -- the policy
  ``hcomposer`` applies to every command but ``train`` (``hcomposer.threads``);
- ``one-thread``: one intra-op thread;
- ``adaptive``: OpenMP's default wait policy and the thread count ``hcomposer train`` chooses
  (``hcomposer.threads.choose_threads``, measured in the child once the busy process runs:
  all cores when quiet, fewer beside busy processes); the child reports the count it chose.
  The chooser sees every process on the machine, not only the benchmark's busy one: its
  "quiet" rows mean something only on a quiet machine. Run under ``nice``, the busy process is
  niced too and counted (the chooser counts niced processes only when it is niced itself).
- ``split``: ``hcomposer train --batch-threads 2``: each step's batch cut into two halves whose
  forward and backward run concurrently in two Python threads, one intra-op thread each
  (``train_step(batch_threads=2)``), so the threads meet once per step instead of at every
  op's OpenMP barrier (``train`` workload only).

Workloads: ``train`` is a training step of ``(AF)*6`` at shape ``10m`` (byte vocabulary,
batch 16 x 256, ``--dtype auto``: bf16 autocast where the CPU has native bf16, else fp32;
AdamW, one ``hcomposer.training.step.train_step`` with clipping at 1), as
``hcomposer train "(AF)*6" --shape 10m`` runs it;
``proxy`` is a proxy-evaluation step (shape ``proxy``, 6 sublayers, batch 32 x 32, fp32), at the
proxies' own one thread.

    nice -n 10 python benchmarks/bench_load.py --rounds 3 --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "one-thread": {"OMP_NUM_THREADS": "1"},
    "adaptive": {},
    "split": {},
}
# Configurations whose child chooses its thread count itself.
ADAPTIVE = {"adaptive"}
# Configurations that split the batch over threads: config -> batch threads (train only).
SPLIT = {"split": 2}
WORKLOADS = {
    "train": {"pattern": "(AF)*6", "shape": "10m", "batch": 16, "seq_len": 256},
    "proxy": {
        "pattern": "AFAFAF",
        "shape": "proxy",
        "batch": 32,
        "seq_len": 32,
        "threads": 1,
        "dtype": "fp32",
    },
}


def child(
    workload: str, steps: int, warmup: int, adaptive: bool = False, batch_threads: int = 1
) -> None:
    import torch

    from hcomposer.architecture import Architecture
    from hcomposer.model import build_model, lm_loss
    from hcomposer.threads import choose_threads
    from hcomposer.training.step import train_step

    w = WORKLOADS[workload]
    if "threads" in w:
        torch.set_num_threads(w["threads"])
    if batch_threads > 1:
        # As the trainer does with --batch-threads: one intra-op thread per batch thread.
        torch.set_num_threads(1)
    chosen = None
    if adaptive:
        # As the trainer does at set-up: measure the other processes, then set the count.
        chosen = choose_threads()
        if chosen is not None:
            torch.set_num_threads(chosen)
    arch = Architecture.parse(w["pattern"], shape=w["shape"])
    arch = arch.with_shape(arch.shape.replace(vocab_size=256, max_seq_len=w["seq_len"]))
    model = build_model(arch, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (w["batch"], w["seq_len"] + 1), generator=gen)
    batches = [(x[:, :-1], x[:, 1:])]
    times, cpu = [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        train_step(
            lambda xs, ys: lm_loss(model(xs), ys), batches, opt, device=torch.device("cpu"),
            dtype=w.get("dtype", "auto"), grad_clip=1.0, batch_threads=batch_threads,
        )  # fmt: skip
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    tokens = w["batch"] * w["seq_len"]
    print(
        json.dumps(
            {
                "tokens_per_s": tokens / statistics.median(times),
                "cpu_s_per_step": statistics.median(cpu),
                "threads": torch.get_num_threads(),
                "chosen": chosen,
                "batch_threads": batch_threads,
            }
        )
    )


def _busy() -> subprocess.Popen:
    # One process spinning on a core: the competing load of the measurement.
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _measure(config: str, workload: str, loaded: bool, steps: int, warmup: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(CONFIGS[config])
    cmd = [sys.executable, __file__, "--child", workload, "--steps", str(steps)]
    cmd += ["--warmup", str(warmup)]
    if config in ADAPTIVE:
        cmd.append("--adaptive")
    if config in SPLIT:
        cmd += ["--batch-threads", str(SPLIT[config])]
    busy = _busy() if loaded else None
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--adaptive", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch-threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workloads", default="train,proxy")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="subset of " + ",".join(CONFIGS))
    ap.add_argument("--out", default=None, help="JSON file for every measurement")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.steps, args.warmup, args.adaptive, args.batch_threads)
        return
    results: dict[str, list[float]] = {}
    threads: dict[str, list[int]] = {}
    for r in range(args.rounds):
        for workload in args.workloads.split(","):
            for config in args.configs.split(","):
                if workload == "proxy" and config in ("one-thread", *ADAPTIVE, *SPLIT):
                    continue  # the proxies run one thread already
                for loaded in (False, True):
                    key = f"{workload}/{config}/{'loaded' if loaded else 'quiet'}"
                    m = _measure(config, workload, loaded, args.steps, args.warmup)
                    results.setdefault(key, []).append(m["tokens_per_s"])
                    threads[key] = threads.get(key, []) + [m["threads"]]
                    print(
                        f"round {r + 1} {key}: {m['tokens_per_s']:,.0f} tok/s "
                        f"({m['threads']} threads)",
                        flush=True,
                    )
    print()
    print("| workload | config | quiet tok/s | loaded tok/s | loaded / default quiet | "
          "quiet / default quiet |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    summary = {}
    for workload in args.workloads.split(","):
        base = statistics.median(results[f"{workload}/default/quiet"])
        for config in args.configs.split(","):
            key = f"{workload}/{config}"
            if f"{key}/quiet" not in results:
                continue
            q, lo = results[f"{key}/quiet"], results[f"{key}/loaded"]
            mq, ml = statistics.median(q), statistics.median(lo)
            summary[key] = {"quiet": q, "loaded": lo, "loaded_ratio": ml / base,
                            "quiet_ratio": mq / base, "threads_quiet": threads[f"{key}/quiet"],
                            "threads_loaded": threads[f"{key}/loaded"]}  # fmt: skip
            print(
                f"| {workload} | {config} | {mq:,.0f} ({min(q):,.0f}-{max(q):,.0f}) | "
                f"{ml:,.0f} ({min(lo):,.0f}-{max(lo):,.0f}) | {ml / base:.2f} | {mq / base:.2f} |"
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
