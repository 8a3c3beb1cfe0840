"""Thread policy: the load arithmetic on hand-made psutil CPU times (known answers), which
commands get ``OMP_WAIT_POLICY=PASSIVE``, and the trainer's adaptive thread count."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

from hcomposer import threads
from hcomposer.architecture import Architecture
from hcomposer.cli import COMMANDS
from hcomposer.data import embedded_corpus_text
from hcomposer.io import read_json, read_jsonl
from hcomposer.threads import (
    AdaptiveThreads,
    CpuSample,
    adapts,
    apply_thread_policy,
    busy_by_others,
    choose_threads,
    cpu_sample,
    thread_count,
    usable_cores,
)
from hcomposer.training import TrainConfig, Trainer, train

# psutil.cpu_times(percpu=True) on Linux: one of these per CPU, in seconds (the ticks of
# /proc/stat divided by the tick rate). guest and guest_nice are already inside user and nice.
LinuxTimes = namedtuple(
    "LinuxTimes", "user nice system idle iowait irq softirq steal guest guest_nice"
)
# ... and on macOS.
MacTimes = namedtuple("MacTimes", "user nice system idle")


def stat(*cpus: dict[str, int], hz: int = 100, kind=LinuxTimes) -> tuple:
    """psutil's per-CPU times for CPUs given as {field: ticks} at ``hz`` ticks per second."""
    return tuple(kind(*(c.get(k, 0) / hz for k in kind._fields)) for c in cpus)


BASE = stat({"user": 1000, "idle": 5000}, {"user": 2000, "idle": 4000, "nice": 300})


def after(*deltas: dict[str, int]) -> tuple:
    """BASE advanced by ``deltas`` (ticks) per CPU."""
    base = [{"user": 1000, "idle": 5000}, {"user": 2000, "idle": 4000, "nice": 300}]
    fields = LinuxTimes._fields
    return stat(*({k: b.get(k, 0) + d.get(k, 0) for k in fields} for b, d in zip(base, deltas)))


def others(times: tuple, own_seconds: float = 0.0, **kw) -> float | None:
    return busy_by_others(CpuSample(BASE, 10.0), CpuSample(times, 10.0 + own_seconds), **kw)


# 0.2 s at 100 ticks/s: 20 ticks on each CPU.
@pytest.mark.parametrize(
    "deltas, own, want_others, want_threads",
    [
        # Idle machine: all cores.
        (({"idle": 20}, {"idle": 20}), 0.0, 0.0, 2),
        # One other process keeps a core busy: one thread.
        (({"user": 20}, {"idle": 20}), 0.0, 1.0, 1),
        # Both cores busy, but with our own threads: still all cores.
        (({"user": 20}, {"user": 20}), 0.4, 0.0, 2),
        # Both busy, half of it ours: another process holds one core.
        (({"user": 20}, {"system": 20}), 0.2, 1.0, 1),
        # Both busy with others: one thread, never zero.
        (({"user": 20}, {"user": 15, "system": 5}), 0.0, 2.0, 1),
        # Waiting for I/O is idle; interrupts and hypervisor steal are busy.
        (({"iowait": 20}, {"idle": 20}), 0.0, 0.0, 2),
        (({"steal": 10, "irq": 5, "softirq": 5}, {"idle": 20}), 0.0, 1.0, 1),
        # Half a core of others rounds up; a quarter rounds down.
        (({"user": 10, "idle": 10}, {"idle": 20}), 0.0, 0.5, 1),
        (({"user": 5, "idle": 15}, {"idle": 20}), 0.0, 0.25, 2),
    ],
)
def test_known_answers_on_two_cores(deltas, own, want_others, want_threads):
    got = others(after(*deltas), own)
    assert got == pytest.approx(want_others)
    assert thread_count(got, 2) == want_threads


def test_guest_time_is_not_counted_twice():
    # A guest's ticks are already inside user: 20 user ticks of which 20 guest = one core.
    assert others(after({"user": 20, "guest": 20}, {"idle": 20})) == pytest.approx(1.0)


def test_niced_processes_count_only_when_we_are_niced():
    text = after({"idle": 20}, {"nice": 20})
    assert others(text, count_nice=True) == pytest.approx(1.0)
    assert others(text, count_nice=False) == pytest.approx(0.0)


def test_other_ticks_per_second():
    # psutil divides by the tick rate: at 1000 ticks/s, 0.2 s is 200 ticks per CPU; our own
    # 0.2 s of CPU is taken off.
    before = CpuSample(stat({"idle": 1000}, {"idle": 1000}, hz=1000), 0.0)
    later = CpuSample(stat({"idle": 1000, "user": 200}, {"idle": 1000, "user": 200}, hz=1000), 0.2)
    assert busy_by_others(before, later) == pytest.approx(1.0)


def test_only_the_cpus_we_may_run_on_are_looked_at():
    quad = [{"idle": 100}] * 4
    busy = [{"idle": 120}, {"idle": 120}, {"idle": 100, "user": 20}, {"idle": 100, "user": 20}]
    before, later = CpuSample(stat(*quad), 0.0), CpuSample(stat(*busy), 0.0)
    # CPUs 2 and 3 are busy, but this process may run on 0 and 1 only.
    assert busy_by_others(before, later, cpus={0, 1}) == pytest.approx(0.0)
    assert busy_by_others(before, later, cpus={1, 2}) == pytest.approx(1.0)
    # The aggregate line: two of four CPUs busy.
    assert busy_by_others(before, later) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        busy_by_others(before, later, cpus={7})


def test_too_short_an_interval_decides_nothing():
    assert others(after({"user": 5}, {"idle": 5})) is None  # 0.05 s
    assert others(BASE) is None  # no time passed


def test_macos_has_fewer_fields():
    # macOS's psutil gives user nice system idle only: the same arithmetic on what is there.
    before = CpuSample(stat({"user": 10, "system": 10, "idle": 100}, kind=MacTimes), 0.0)
    later = CpuSample(stat({"user": 30, "system": 10, "idle": 100}, kind=MacTimes), 0.0)
    assert busy_by_others(before, later) == pytest.approx(1.0)
    nice = CpuSample(stat({"user": 10, "system": 10, "idle": 100, "nice": 20}, kind=MacTimes), 0)
    assert busy_by_others(before, nice, count_nice=False) == pytest.approx(0.0)


def test_thread_count_bounds():
    assert thread_count(0.0, 8) == 8
    assert thread_count(3.4, 8) == 5
    assert thread_count(3.5, 8) == 4
    assert thread_count(20.0, 8) == 1
    assert thread_count(0.0, 1) == 1


def test_live_choice_is_within_the_usable_cores():
    n = choose_threads()
    assert n is not None and 1 <= n <= usable_cores()


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux only")
def test_psutil_reads_proc_stat_as_the_arithmetic_expects():
    """On Linux psutil's per-CPU times are /proc/stat's per-CPU lines, in order, divided by the
    tick rate, with guest time left inside user (so leaving guest out counts it once)."""

    def proc() -> list[list[int]]:
        lines = Path("/proc/stat").read_text().splitlines()
        return [
            [int(v) for v in line.split()[1:]]
            for line in lines
            if line.startswith("cpu") and not line.startswith("cpu ")
        ]

    hz = os.sysconf("SC_CLK_TCK")
    before, times, later = proc(), psutil.cpu_times(percpu=True), proc()
    assert len(times) == len(before) == len(later)
    for lo, t, hi in zip(before, times, later):
        for field, a, b in zip(t._fields, lo, hi):
            # One tick of slack for the division by the tick rate.
            assert a - 1 <= getattr(t, field) * hz <= b + 1, field


def _fake_psutil(monkeypatch, state):
    """psutil on a fake 2-core machine: each look at the CPU times is ``state["seconds"]``
    later, CPU 1 busy with another process while ``state["busy"]``, CPU 0 busy with this
    process while ``state.get("own")`` (its CPU clock advancing by as much); ``sleep`` does not
    wait."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    clock = [{"idle": 0, "user": 0}, {"idle": 0, "user": 0}]
    own = [0.0]

    def cpu_times(percpu=False):
        assert percpu
        n = round(state["seconds"] * 100)
        clock[0]["user" if state.get("own") else "idle"] += n
        own[0] += state["seconds"] if state.get("own") else 0.0
        clock[1]["user" if state["busy"] else "idle"] += n
        return list(stat(*clock))

    monkeypatch.setattr(psutil, "cpu_times", cpu_times)
    fake_time = SimpleNamespace(process_time=lambda: own[0], sleep=lambda seconds: None)
    monkeypatch.setattr(threads, "time", fake_time)


def test_adaptive_threads_follows_the_load(monkeypatch):
    """The count changes only when the load does; short intervals wait for the next check."""
    state = {"busy": True, "seconds": 0.2}
    _fake_psutil(monkeypatch, state)
    calls = []
    chooser = AdaptiveThreads(calls.append, current=2)
    assert chooser.start() == 1 and calls == [1]
    assert chooser.update() == 1 and calls == [1]  # unchanged: not set again
    state.update(busy=False, seconds=0.01)
    assert chooser.update() == 1  # 0.01 s: too short, the window grows to the next check
    state.update(seconds=10.0)
    assert chooser.update() == 2 and calls == [1, 2]


def test_choice_from_fake_psutil_readings(monkeypatch):
    """Through psutil: a core busy with another process costs a thread, a core busy with this
    process does not (its own CPU time is taken off)."""
    state = {"busy": False, "seconds": 0.2}
    _fake_psutil(monkeypatch, state)
    assert choose_threads() == 2
    state.update(busy=True)
    assert choose_threads() == 1
    state.update(busy=False, own=True)
    assert choose_threads() == 2
    sample = cpu_sample()
    # Three looks (two by choose_threads, this one) while busy ourselves: 0.6 s of our CPU.
    assert len(sample.cpus) == 2 and sample.own_seconds == pytest.approx(0.6)


def test_without_affinity_every_cpu_counts(monkeypatch):
    """macOS has no sched_getaffinity: all CPUs psutil lists are looked at and usable."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    looks = iter([[{"idle": 0}] * 4, [{"idle": 20}, {"user": 20}, {"system": 20}, {"idle": 20}]])
    monkeypatch.setattr(psutil, "cpu_times", lambda percpu: list(stat(*next(looks), kind=MacTimes)))
    monkeypatch.setattr(
        threads, "time", SimpleNamespace(process_time=lambda: 0.0, sleep=lambda s: None)
    )
    assert usable_cores() == 4
    assert choose_threads() == 2


@pytest.mark.parametrize("fails", [OSError("no /proc"), []])
def test_without_cpu_times_nothing_is_chosen(monkeypatch, fails):
    def cpu_times(percpu=False):
        if isinstance(fails, Exception):
            raise fails
        return fails

    monkeypatch.setattr(psutil, "cpu_times", cpu_times)
    calls = []
    assert cpu_sample() is None
    assert choose_threads() is None
    assert AdaptiveThreads(calls.append).start() is None and calls == []


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("command", [*COMMANDS, None, "nosuch"])
def test_passive_for_every_command_but_train(clean_env, command):
    apply_thread_policy(command)
    want = None if command == "train" else "PASSIVE"
    assert os.environ.get("OMP_WAIT_POLICY") == want


def test_train_gets_passive_when_it_does_not_adapt(clean_env):
    assert adapts("train")
    clean_env.setenv("OMP_NUM_THREADS", "2")
    assert not adapts("train")
    apply_thread_policy("train")
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert not adapts("train", {"WORLD_SIZE": "4"})
    assert adapts("train", {"WORLD_SIZE": "1"}) and not adapts("search", {})


def test_a_user_set_wait_policy_is_kept(clean_env):
    for command in ("train", "search"):
        clean_env.setenv("OMP_WAIT_POLICY", "ACTIVE")
        apply_thread_policy(command)
        assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.parametrize("command, policy", [("search", "PASSIVE"), ("train", None)])
def test_cli_applies_the_policy_before_torch_loads(command, policy):
    """``hcomposer.cli.main`` sets the policy before anything imports torch (a fresh process)."""
    code = (
        "import os, sys; import hcomposer.cli as cli; real = cli.apply_thread_policy; "
        "cli.apply_thread_policy = lambda c: (print('torch' in sys.modules), real(c)); "
        f"code = cli.main([{command!r}, '--nosuch']); "
        "print(code, os.environ.get('OMP_WAIT_POLICY'))"
    )
    src = str(Path(threads.__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "2", str(policy)]


def test_config_threads_validation():
    TrainConfig(threads=None)
    TrainConfig(threads=0)
    TrainConfig(threads=3)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(Exception, match="threads"):
            TrainConfig(threads=bad)
    with pytest.raises(Exception, match="threads"):
        TrainConfig.from_dict({"threads": -1})


def _train_config(text_file, **kw) -> TrainConfig:
    return TrainConfig(
        tokens=6 * 2 * 32, batch_size=2, seq_len=32, dtype="fp32", eval_every=0,
        eval_tokens=64, log_every=1, checkpoint_every=0, data=str(text_file), **kw,
    )  # fmt: skip


@pytest.fixture
def text_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HCOMPOSER_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "text.txt"
    path.write_text(embedded_corpus_text()[:20_000], encoding="utf-8")
    return path


def test_trainer_fixed_and_default_threads(tmp_path, text_file, clean_env):
    before = torch.get_num_threads()
    arch = Architecture.parse("AF", shape="tiny")
    train(arch, _train_config(text_file, threads=2), tmp_path / "two", progress=False)
    assert {r["threads"] for r in read_jsonl(tmp_path / "two" / "metrics.jsonl")} == {2}
    assert read_json(tmp_path / "two" / "run.json")["config"]["threads"] == 2
    # The caller's count is back once train returns.
    assert torch.get_num_threads() == before
    # None (library default): torch's setting is left as it is.
    train(arch, _train_config(text_file), tmp_path / "none", progress=False)
    assert {r["threads"] for r in read_jsonl(tmp_path / "none" / "metrics.jsonl")} == {before}


def test_trainer_adapts_to_the_load_as_it_goes(tmp_path, text_file, clean_env, monkeypatch):
    """Another process busy at set-up (1 thread), gone once training starts: back to 2 threads
    at the first re-check (every 2 steps here)."""
    state = {"busy": True, "seconds": 1.0}
    _fake_psutil(monkeypatch, state)
    monkeypatch.setattr("hcomposer.training.trainer.THREADS_EVERY", 2)
    real_step = Trainer.step

    def step(self, k):
        state["busy"] = False
        return real_step(self, k)

    monkeypatch.setattr(Trainer, "step", step)
    before = torch.get_num_threads()
    out = tmp_path / "adaptive"
    arch = Architecture.parse("AF", shape="tiny")
    train(arch, _train_config(text_file, threads=0), out, progress=False)
    # Steps 1-2 ran at the count chosen at set-up; the re-check after step 2 gave 2 threads.
    assert [r["threads"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 1, 2, 2, 2, 2]
    assert read_json(out / "run.json")["config"]["threads"] == "adaptive"
    assert torch.get_num_threads() == before


def test_auto_batch_threads_splits_only_where_measured_and_allowed():
    from hcomposer.threads import AUTO_SPLIT_MAX_CORES, auto_batch_threads

    def auto(**kw):
        base = dict(usable=2, cpu=True, threads=0, rows=16, excluded=False, environ={})
        return auto_batch_threads(**{**base, **kw})

    assert auto() == 2  # the measured case: a 2-core CPU
    assert auto(usable=4) == 4 and auto(usable=3, rows=2) == 2  # never more slices than rows
    assert auto(usable=1) == 1 and auto(usable=AUTO_SPLIT_MAX_CORES + 1) == 1
    assert auto(cpu=False) == 1  # a GPU trains the whole batch at once
    assert auto(threads=2) == 1 and auto(threads=1) == 2  # a fixed intra-op count > 1 wins
    assert auto(excluded=True) == 1  # compile, FSDP, MoE
    assert auto(rows=1) == 1
    assert auto(environ={"OMP_NUM_THREADS": "2"}) == 1
    assert auto(environ={"WORLD_SIZE": "2"}) == 1 and auto(environ={"WORLD_SIZE": "1"}) == 2
