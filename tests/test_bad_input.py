"""The README's promise, case by case: bad input -> exit 2, one line on stderr, no traceback,
nothing written.

Each case runs the CLI in-process (``hcomposer.cli.main``) in its own folder, which may hold
copies of a real run folder and a real search folder, damaged on purpose. The folder (and the
token-shard cache, which lives inside it) is snapshotted before and after: every file's bytes
and every folder must be unchanged.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from hcomposer.cli import main

# ---------------------------------------------------------------- fixtures: one run, one search


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A finished tiny training run and a finished search (synthetic proxy), made once."""
    return build_world(tmp_path_factory.mktemp("world"))


def build_world(root: Path) -> Path:
    from hcomposer.architecture import Architecture
    from hcomposer.search import SearchConfig, run_search
    from hcomposer.training.trainer import TrainConfig, train

    old_cache = os.environ.get("HCOMPOSER_CACHE")
    os.environ["HCOMPOSER_CACHE"] = str(root / "cache")
    cfg = TrainConfig(
        tokens=2 * 4 * 32, batch_size=4, seq_len=32, dtype="fp32", eval_every=0,
        eval_tokens=256, log_every=1, checkpoint_every=1,
    )  # fmt: skip
    train(Architecture.parse("AF", shape="tiny"), cfg, root / "run", progress=False)
    # One checkpoint only: beside a whole previous one, a damaged latest one is not refused
    # but replaced by it (tests/test_faults.py checks that).
    shutil.rmtree(root / "run" / ".checkpoint.old")
    search = SearchConfig(
        primitives="AF", layers=3, trials=3, sampler="random", shape="tiny",
        proxy="synthetic", seed=0,
    )  # fmt: skip
    run_search(search, root / "search", progress=False)
    # Fold the WAL into study.db so the folder can be copied file by file.
    gc.collect()
    con = sqlite3.connect(root / "search" / "study.db")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    if old_cache is None:
        os.environ.pop("HCOMPOSER_CACHE")
    else:
        os.environ["HCOMPOSER_CACHE"] = old_cache
    return root


def _snapshot(root: Path) -> dict[str, object]:
    """Every folder and file under ``root``: files by size, modification time and content
    hash (small files) -- a rewrite with the same bytes still changes the time."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            digest = ""
            if st.st_size < 1 << 16 and not os.path.islink(p):
                with open(p, "rb") as fh:
                    digest = hashlib.sha256(fh.read()).hexdigest()
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns, st.st_mode, digest)
    return out


# ---------------------------------------------------------------- helpers to build case folders

Setup = Callable[[Path], None]


def write(name: str, content: str | bytes) -> Setup:
    def setup(d: Path) -> None:
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")

    return setup


def jwrite(name: str, obj) -> Setup:
    return write(name, json.dumps(obj))


def mkdir(name: str) -> Setup:
    return lambda d: (d / name).mkdir(parents=True, exist_ok=True)


def copy(what: str) -> str:
    return f"@copy:{what}"


def damage_json(path: str, edit: Callable[[dict], object]) -> Setup:
    def setup(d: Path) -> None:
        p = d / path
        data = json.loads(p.read_text())
        p.write_text(json.dumps(edit(data)))

    return setup


def _pop(key):
    def f(data):
        data.pop(key, None)
        return data

    return f


def _set(key, value):
    def f(data):
        data[key] = value
        return data

    return f


# ---------------------------------------------------------------- the corpus

CASES: list[tuple[str, list[str], list]] = []


def case(cid: str, argv: list[str], *setups) -> None:
    CASES.append((cid, argv, list(setups)))


BAD_PATTERNS = {
    "empty": "",
    "blank": "   ",
    "unknown": "AX",
    "lower": "af",
    "close-paren": "AF)",
    "open-paren": "(AF",
    "no-star": "(AF)",
    "no-count": "(AF)*",
    "zero-count": "(AF)*0",
    "neg-count": "(AF)*-1",
    "superscript": "(AF)*²",
    "arabic-digit": "(AF)*٣",
    "fullwidth-digit": "(AF)*３",
    "one-branch": "[A]",
    "ffn-branch": "[A|F]",
    "open-group": "[A|S",
    "bare-bar": "A|S",
    "empty-repeat": "()*3",
    "star-first": "*3",
    "close-bracket": "AF]",
    "nested-group": "[[A|S]|A]",
    "ten-big-repeats": "(AF)*50000" * 10,
    "120k-tokens": "A" * 120_000,
    "nested-huge": "((AF)*1000)*1000",
    "nul": "AF\x00",
    "accent": "AFé",
    "emoji": "A🙂F",
    "huge-count": "(AF)*99999999999999999999999999999",
}
for pid, pat in BAD_PATTERNS.items():
    case(f"inspect-pattern-{pid}", ["inspect", pat])
    case(f"evaluate-pattern-{pid}", ["evaluate", pat, "--proxy", "mad:copy", "--steps", "1"])
    case(f"train-pattern-{pid}", ["train", pat, "--out", "{d}/out", "--tokens", "1K"])
    case(f"scale-pattern-{pid}", ["scale", pat, "--layers", "8"])

NAN = "NaN"
BAD_SHAPES = {
    "theta-str": '{"preset": "tiny", "rope_theta": "abc"}',
    "preset-list": '{"preset": ["tiny"]}',
    "preset-unknown": '{"preset": "nosuch"}',
    "theta-nan": '{"preset": "tiny", "rope_theta": NaN}',
    "theta-inf": '{"preset": "tiny", "rope_theta": 1e999}',
    "tie-no": '{"preset": "tiny", "tie_embeddings": "no"}',
    "dmodel-float": '{"preset": "tiny", "d_model": 64.5}',
    "dmodel-bool": '{"preset": "tiny", "d_model": true}',
    "dmodel-neg": '{"preset": "tiny", "d_model": -64}',
    "dmodel-huge": '{"preset": "tiny", "d_model": 1000000000000}',
    "heads-zero": '{"preset": "tiny", "n_heads": 0}',
    "heads-3": '{"preset": "tiny", "n_heads": 3}',
    "unknown-field": '{"preset": "tiny", "colour": 1}',
    "router": '{"preset": "tiny", "router": "relu"}',
    "eps-zero": '{"preset": "tiny", "norm_eps": 0}',
    "window-str": '{"preset": "tiny", "window": "16"}',
    "fusion-int": '{"preset": "tiny", "fusion": 5}',
    "list": "[]",
    "string": '"tiny"',
    "number": "42",
    "null": "null",
    "not-json": "{",
    "empty": "",
    "missing-fields": '{"d_model": 64}',
    "newer-version": '{"format_version": 99, "preset": "tiny"}',
    "version-str": '{"format_version": "1", "preset": "tiny"}',
    "deep": "[" * 100_000 + "]" * 100_000,
}
for sid, text in BAD_SHAPES.items():
    f = f"shape-{sid}.json"
    case(f"inspect-shape-{sid}", ["inspect", "AF", "--shape", "{d}/" + f], write(f, text))
    case(f"train-shape-{sid}", ["train", "AF", "--shape", "{d}/" + f, "--out", "{d}/o"],
         write(f, text))  # fmt: skip
    case(f"search-shape-{sid}", ["search", "--shape", "{d}/" + f, "--out", "{d}/o"],
         write(f, text))  # fmt: skip
    case(f"scale-shape-{sid}", ["scale", "AF", "--layers", "4", "--shape", "{d}/" + f],
         write(f, text))  # fmt: skip
for sid in ("theta-str", "preset-list", "theta-nan", "tie-no", "list", "not-json"):
    f = f"shape-{sid}.json"
    case(
        f"evaluate-shape-{sid}",
        ["evaluate", "AF", "--shape", "{d}/" + f],
        write(f, BAD_SHAPES[sid]),
    )
case(
    "shape-binary", ["inspect", "AF", "--shape", "{d}/b.json"], write("b.json", b"\xff\xfe\x00bad")
)
case("shape-missing-file", ["inspect", "AF", "--shape", "{d}/nosuch.json"])
case("shape-folder", ["inspect", "AF", "--shape", "{d}/dir.json"], mkdir("dir.json"))
case("shape-unicode-name", ["inspect", "AF", "--shape", "données"])
case("shape-unknown-preset", ["inspect", "AF", "--shape", "nosuch"])

BAD_PROXY = {
    "steps-str": '{"steps": "abc"}',
    "lrs-int": '{"lrs": 5}',
    "list": "[]",
    "lrs-empty": '{"lrs": []}',
    "lrs-nan": '{"lrs": [NaN]}',
    "lrs-neg": '{"lrs": [-1]}',
    "steps-zero": '{"steps": 0}',
    "steps-bool": '{"steps": true}',
    "unknown": '{"nosuch": 1}',
    "dtype": '{"dtype": "fp8"}',
    "task-unknown": '{"mad_tasks": [{"task": "nosuch"}]}',
    "tasks-int": '{"mad_tasks": 5}',
    "task-vocab-str": '{"mad_tasks": [{"task": "selective_copying", "vocab_size": "x"}]}',
    "mqar-odd": '{"mqar_tasks": [{"seq_len": 3}]}',
    "threads-neg": '{"threads": -1}',
    "not-json": "{steps: 1}",
    "newer": '{"format_version": 2}',
    "text-lr-neg": '{"text_lr": -1}',
    "wd-neg": '{"weight_decays": [-1]}',
    "grad-clip-str": '{"grad_clip": "1"}',
}
for cid, text in BAD_PROXY.items():
    case(
        f"evaluate-config-{cid}",
        ["evaluate", "AF", "--config", "{d}/p.json"],
        write("p.json", text),
    )
case("evaluate-config-missing", ["evaluate", "AF", "--config", "{d}/nosuch.json"])

BAD_ARCH = {
    "pattern-int": {"pattern": 5, "shape": "tiny"},
    "no-shape": {"pattern": "AF"},
    "shape-int": {"pattern": "AF", "shape": 5},
    "layers-str": {"pattern": "AF", "shape": "tiny", "layers": "AF"},
    "layers-disagree": {"pattern": "AF", "shape": "tiny", "layers": ["A", "A"]},
    "format": {"pattern": "AF", "shape": "tiny", "format": "other/9"},
    "newer": {"pattern": "AF", "shape": "tiny", "format_version": 9},
    "list": [],
    "shape-bad-field": {"pattern": "AF", "shape": {"d_model": "x"}},
    "bad-pattern": {"pattern": "AX", "shape": "tiny"},
}
for aid, obj in BAD_ARCH.items():
    case(f"train-arch-{aid}", ["train", "{d}/a.json", "--out", "{d}/o"], jwrite("a.json", obj))
    case(f"evaluate-arch-{aid}", ["evaluate", "{d}/a.json"], jwrite("a.json", obj))
case("train-batch-threads-moe", ["train", "AE", "--shape", "tiny", "--out", "{d}/o",
                                 "--batch-threads", "2"])  # fmt: skip
case("train-arch-not-json", ["train", "{d}/a.json", "--out", "{d}/o"], write("a.json", "{"))
case("evaluate-arch-not-json", ["evaluate", "{d}/a.json"], write("a.json", "{"))

TRAIN_BAD = {
    "seed-neg": ["--seed", "-1"],
    "seed-huge": ["--seed", str(2**40)],
    "lr-nan": ["--lr", "nan"],
    "lr-inf": ["--lr", "inf"],
    "lr-zero": ["--lr", "0"],
    "lr-neg": ["--lr", "-1"],
    "lr-str": ["--lr", "fast"],
    "min-lr-nan": ["--min-lr", "nan"],
    "min-lr-above": ["--min-lr", "1"],
    "warmup-neg": ["--warmup", "-5"],
    "warmup-nan": ["--warmup", "nan"],
    "grad-clip-neg": ["--grad-clip", "-1"],
    "grad-clip-nan": ["--grad-clip", "nan"],
    "wd-neg": ["--weight-decay", "-1"],
    "batch-zero": ["--batch-size", "0"],
    "batch-neg": ["--batch-size", "-4"],
    "seq-zero": ["--seq-len", "0"],
    "seq-huge": ["--seq-len", str(2**30)],
    "accum-zero": ["--grad-accum", "0"],
    "accum-split": ["--batch-size", "3", "--grad-accum", "2"],
    "eval-every-neg": ["--eval-every", "-1"],
    "log-every-zero": ["--log-every", "0"],
    "ckpt-every-neg": ["--checkpoint-every", "-1"],
    "tokens-str": ["--tokens", "lots"],
    "tokens-huge": ["--tokens", "1e99"],
    "tokens-neg": ["--tokens", "-5"],
    "tokens-zero": ["--tokens", "0"],
    "tokens-below-batch": ["--tokens", "10"],
    "eval-tokens-zero": ["--eval-tokens", "0"],
    "device-nosuch": ["--device", "nosuch"],
    "device-cuda-x": ["--device", "cuda:x"],
    "device-empty": ["--device", ""],
    "dtype": ["--dtype", "fp8"],
    "schedule": ["--schedule", "nope"],
    "tokenizer": ["--tokenizer", "nosuch"],
    "data-missing": ["--data", "{d}/nosuch.txt"],
    "data-tiny": ["--data", "{d}/small.txt"],
    "unknown-flag": ["--colour", "red"],
    "memory": ["--batch-size", str(2**20), "--seq-len", "2048", "--tokens", "1e14"],
    "threads-neg": ["--threads", "-1"],
    "threads-str": ["--threads", "two"],
    "threads-huge": ["--threads", "100000"],
    "batch-threads-negative": ["--batch-threads", "-1"],
    "batch-threads-str": ["--batch-threads", "two"],
    "batch-threads-huge": ["--batch-threads", "100000"],
    "batch-threads-with-threads": ["--batch-threads", "2", "--threads", "2"],
    "batch-threads-compile": ["--batch-threads", "2", "--compile"],
}
for tid, extra in TRAIN_BAD.items():
    setups = [write("small.txt", "tiny")] if tid == "data-tiny" else []
    case(f"train-{tid}", ["train", "AF", "--shape", "tiny", "--out", "{d}/o", *extra], *setups)

EVALUATE_BAD = {
    "steps-zero": ["--steps", "0"],
    "steps-neg": ["--steps", "-1"],
    "lrs-nan": ["--lrs", "nan"],
    "lrs-inf": ["--lrs", "1e-3,inf"],
    "lrs-empty": ["--lrs", ","],
    "lrs-str": ["--lrs", "abc"],
    "lrs-neg": ["--lrs", "-1"],
    "wds-neg": ["--wds", "-1"],
    "wds-nan": ["--wds", "nan"],
    "seed-neg": ["--seed", "-1"],
    "threads-neg": ["--threads", "-1"],
    "proxy-nosuch": ["--proxy", "nosuch"],
    "proxy-mad-nosuch": ["--proxy", "mad:nosuch"],
    "tokens-huge": ["--tokens", "1e99"],
    "tokens-str": ["--tokens", "x"],
    "dtype": ["--dtype", "fp8"],
    "shape-unknown": ["--shape", "nosuch"],
}
for eid, extra in EVALUATE_BAD.items():
    case(f"evaluate-{eid}", ["evaluate", "AF", *extra])

SEARCH_BAD = {
    "layers-zero": ["--layers", "0"],
    "layers-huge": ["--layers", "1000000"],
    "trials-zero": ["--trials", "0"],
    "trials-neg": ["--trials", "-1"],
    "trials-huge": ["--trials", str(10**9)],
    "workers-zero": ["--workers", "0"],
    "workers-huge": ["--workers", "100000"],
    "seed-neg": ["--seed", "-1"],
    "sampler": ["--sampler", "nosuch"],
    "strategy": ["--strategy", "nosuch"],
    "stage-zero": ["--stage-size", "0"],
    "stage-big": ["--strategy", "end-incremental", "--stage-size", "99"],
    "proxy": ["--proxy", "nosuch"],
    "objective": ["--objective", "nosuch"],
    "objective-cost-only": ["--objective", "kv"],
    "max-params-str": ["--max-params", "abc"],
    "max-params-huge": ["--max-params", "1e99"],
    "max-kv-str": ["--max-kv-bytes", "x"],
    "min-count-bare": ["--min-count", "A"],
    "min-count-str": ["--min-count", "A=x"],
    "min-count-token": ["--min-count", "Q=1"],
    "min-count-above": ["--min-count", "A=99"],
    "max-count-neg": ["--max-count", "A=-1"],
    "primitives-empty": ["--primitives", ""],
    "primitives-unknown": ["--primitives", "XYZ"],
    "primitives-ffn-group": ["--primitives", "A,[A|F]"],
    "n-startup-zero": ["--n-startup", "0"],
    "storage-plain": ["--storage", "nosuch"],
    "storage-proc": ["--storage", "sqlite:////proc/x.db"],
    "storage-journal-nodir": ["--storage", "journal:{d}/nodir/x.log"],
    "storage-sqlite-nodir": ["--storage", "sqlite:///{d}/nodir/x.db"],
    "storage-journal-folder": ["--storage", "journal:{d}/sub"],
    "shape": ["--shape", "nosuch"],
    "recipe": ["--recipe", "nosuch"],
    "space-too-small": ["--layers", "1", "--trials", "5", "--primitives", "AF"],
    "max-params-tiny": ["--max-params", "10"],
}
for sid, extra in SEARCH_BAD.items():
    setups = [mkdir("sub")] if sid == "storage-journal-folder" else []
    case(f"search-{sid}", ["search", "--proxy", "synthetic", "--out", "{d}/o", *extra], *setups)
    # The same mistakes with the default folder (runs/...) under the case's folder.
    if sid in ("trials-zero", "space-too-small", "storage-proc", "layers-huge"):
        case(f"search-default-out-{sid}", ["search", "--proxy", "synthetic", *extra])
case(
    "search-resume-other-config",
    ["search", "--out", "{d}/search", "--proxy", "synthetic", "--trials", "4"],
    copy("search"),
)

EVAL_BAD = {
    "suite-nosuch": ["--suite", "nosuch"],
    "suite-empty": ["--suite", ""],
    "max-len-zero": ["--suite", "efficiency", "--max-len", "0"],
    "max-len-neg": ["--suite", "efficiency", "--max-len", "-1"],
    "niah-huge": ["--suite", "niah", "--niah-lengths", "100000000"],
    "niah-str": ["--suite", "niah", "--niah-lengths", "abc"],
    "niah-zero": ["--suite", "niah", "--niah-lengths", "0"],
    "niah-trials-zero": ["--suite", "niah", "--niah-trials", "0"],
    "mqar-steps-zero": ["--suite", "mqar", "--mqar-steps", "0"],
    "mqar-lengths-str": ["--suite", "mqar", "--mqar-lengths", "x"],
    "device": ["--suite", "loss", "--device", "nosuch"],
    "device-cuda-x": ["--suite", "loss", "--device", "cuda:x"],
    "limit-nan": ["--suite", "loss", "--limit", "nan"],
    "limit-neg": ["--suite", "loss", "--limit", "-1"],
    "fewshot-neg": ["--suite", "loss", "--num-fewshot", "-1"],
    "data-missing": ["--suite", "loss", "--data", "{d}/nosuch.txt"],
}
for eid, extra in EVAL_BAD.items():
    case(f"eval-{eid}", ["eval", "{d}/run", *extra], copy("run"))
case("eval-missing-dir", ["eval", "{d}/nosuch", "--suite", "loss"])
case("eval-empty-dir", ["eval", "{d}/empty", "--suite", "loss"], mkdir("empty"))
case("eval-file", ["eval", "{d}/f", "--suite", "loss"], write("f", "x"))

# Damaged run folders, refused by every command that reads them.
RUN_DAMAGE = {
    "state-no-sums": damage_json("run/checkpoint/state.json", _pop("sha256")),
    "state-not-json": write("run/checkpoint/state.json", "{"),
    "state-list": write("run/checkpoint/state.json", "[]"),
    "state-no-step": damage_json("run/checkpoint/state.json", _pop("step")),
    "model-truncated": write("run/checkpoint/model.safetensors", b"\x00" * 10),
    "optimizer-missing": lambda d: (d / "run/checkpoint/optimizer.safetensors").unlink(),
    "arch-not-json": write("run/architecture.json", "{"),
    "arch-disagrees": jwrite("run/architecture.json", {"pattern": "AFAF", "shape": "tiny"}),
    "arch-wider": jwrite("run/architecture.json", {"pattern": "AF", "shape": {"preset": "x"}}),
    "run-json-not-json": write("run/run.json", "not json"),
    "run-json-list": write("run/run.json", "[]"),
    "run-json-newer": damage_json("run/run.json", _set("format_version", 7)),
    "summary-not-json": write("run/summary.json", "{"),
    "summary-list": write("run/summary.json", "[1]"),
    "no-checkpoint": lambda d: shutil.rmtree(d / "run/checkpoint"),
}
RUN_COMMANDS = {
    "resume": ["train", "AF", "--shape", "tiny", "--out", "{d}/run", "--resume", "--tokens", "1K",
               "--batch-size", "4", "--seq-len", "32", "--dtype", "fp32", "--eval-every", "0",
               "--eval-tokens", "256", "--log-every", "1", "--checkpoint-every", "1"],
    "eval": ["eval", "{d}/run", "--suite", "loss"],
    "export": ["export", "{d}/run", "--out", "{d}/hf"],
    "compare": ["compare", "{d}/run", "{d}/run", "--out", "{d}/cmp"],
}  # fmt: skip
# Which damage each command reads (a command that never opens a file cannot see its damage).
RUN_READS = {
    "resume": set(RUN_DAMAGE) - {"summary-not-json", "summary-list"},
    "eval": set(RUN_DAMAGE) - {"run-json-newer"},
    "export": set(RUN_DAMAGE) - {"run-json-newer"},
    "compare": {"arch-not-json", "run-json-not-json", "run-json-list", "summary-not-json",
                "summary-list", "run-json-newer"},
}  # fmt: skip
for cmd, argv in RUN_COMMANDS.items():
    for did, damage in RUN_DAMAGE.items():
        if did in RUN_READS[cmd]:
            case(f"run-damaged-{did}-{cmd}", argv, copy("run"), damage)
case("train-existing-run-no-resume", ["train", "AF", "--shape", "tiny", "--out", "{d}/run"],
     copy("run"))  # fmt: skip
case(
    "train-status-list",
    ["train", "AF", "--shape", "tiny", "--out", "{d}/run"],
    copy("run"),
    write("run/status.json", "[]"),
)
case("train-resume-other-arch", ["train", "AFAF", "--shape", "tiny", "--out", "{d}/run",
     "--resume"], copy("run"))  # fmt: skip
case("train-out-foreign", ["train", "AF", "--out", "{d}/foreign"], write("foreign/x.txt", "x"))

# Output paths.
OUT_COMMANDS = {
    "train": ["train", "AF", "--shape", "tiny", "--out", "{out}"],
    "search": ["search", "--proxy", "synthetic", "--out", "{out}"],
    "compare": ["compare", "{d}/run", "--out", "{out}"],
    "export": ["export", "{d}/run", "--out", "{out}"],
    "convert": ["convert", "{d}/run", "--keep", "1", "--out", "{out}"],
    "run": ["run", "--out", "{out}"],
    "bench-search": ["bench-search", "--seeds", "1", "--budget", "2", "--out", "{out}"],
}
OUTS = {
    "proc": "/proc/x",
    "proc-nested": "/proc/self/x/y",
    "sys": "/sys/x",
    "dev": "/dev/null",
    "file": "{d}/file",
    "under-file": "{d}/file/sub",
    "empty": "",
    "long-name": "{d}/" + "n" * 300,
    "nul": "{d}/a\x00b",
}
for cmd, argv in OUT_COMMANDS.items():
    for oid, out in OUTS.items():
        setups = [write("file", "x")]
        if "{d}/run" in argv:
            setups.insert(0, copy("run"))
        filled = [a.replace("{out}", out) for a in argv]
        case(f"out-{oid}-{cmd}", filled, *setups)
case("run-out-foreign", ["run", "--out", "{d}/foreign"], write("foreign/x.txt", "x"))
case("run-recipe", ["run", "--recipe", "nosuch", "--out", "{d}/o"])
case("run-trials-zero", ["run", "--trials", "0", "--out", "{d}/o"])
case("run-tokens-zero", ["run", "--tokens", "0", "--out", "{d}/o"])
case("run-seed-neg", ["run", "--seed", "-1", "--out", "{d}/o"])
case("run-pipeline-damaged", ["run", "--out", "{d}/p"], write("p/pipeline.json", "["))
case("run-pipeline-no-stages", ["run", "--out", "{d}/p"], jwrite("p/pipeline.json", {"x": 1}))
case("compare-missing", ["compare", "{d}/nosuch", "--out", "{d}/c"])
case("compare-labels", ["compare", "{d}/run", "--labels", "a,b", "--out", "{d}/c"], copy("run"))
case("compare-not-run", ["compare", "{d}/e", "--out", "{d}/c"], mkdir("e"))
case("export-missing", ["export", "{d}/nosuch", "--out", "{d}/hf"])
case("export-dtype", ["export", "{d}/run", "--out", "{d}/hf", "--dtype", "fp8"], copy("run"))
case("export-kind", ["export", "{d}/run", "--out", "{d}/hf", "--kind", "x"], copy("run"))
case("export-out-nonempty", ["export", "{d}/run", "--out", "{d}/hf"], copy("run"),
     write("hf/x.txt", "x"))  # fmt: skip

# convert: the run folder is a teacher with one attention layer (pattern AF).
CONVERT = ["convert", "{d}/run", "--out", "{d}/conv"]
case("convert-keep-too-many", [*CONVERT, "--keep", "2"], copy("run"))
case("convert-layer-out-of-range", [*CONVERT, "--keep-layers", "1"], copy("run"))
case("convert-layer-not-int", [*CONVERT, "--keep-layers", "x"], copy("run"))
case("convert-no-keep", CONVERT, copy("run"))
case("convert-to-mlp", [*CONVERT, "--keep", "0", "--to", "F"], copy("run"))
case("convert-tokenizer-missing", [*CONVERT, "--keep", "0", "--tokenizer", "{d}/no.json"],
     copy("run"))  # fmt: skip
case("convert-not-a-model", ["convert", "{d}/e", "--keep", "0", "--out", "{d}/conv"], mkdir("e"))
case("convert-missing", ["convert", "{d}/nosuch", "--keep", "0", "--out", "{d}/conv"])
case("convert-out-foreign", [*CONVERT, "--keep", "0"], copy("run"), write("conv/x.txt", "x"))
case("convert-keep-disagrees", [*CONVERT, "--keep", "0", "--keep-layers", "0"], copy("run"))

# bench-search tables and options.
TABLES = {
    "list": "[]",
    "empty-object": "{}",
    "not-json": "{",
    "wrong-format": '{"format": "other"}',
    "scores-list": '{"format": "hcomposer.tabular/1", "name": "t", "choices": ["A", "F"], '
    '"positions": 1, "scores": [1, 2]}',
    "scores-str": '{"format": "hcomposer.tabular/1", "name": "t", "choices": ["A", "F"], '
    '"positions": 1, "scores": {"A": "x", "F": 1}}',
    "positions-str": '{"format": "hcomposer.tabular/1", "name": "t", "choices": ["A", "F"], '
    '"positions": "one", "scores": {"A": 1, "F": 1}}',
    "choices-int": '{"format": "hcomposer.tabular/1", "name": "t", "choices": 5, '
    '"positions": 1, "scores": {"A": 1, "F": 1}}',
    "scores-nan": '{"format": "hcomposer.tabular/1", "name": "t", "choices": ["A", "F"], '
    '"positions": 1, "scores": {"A": NaN, "F": 1}}',
    "incomplete": '{"format": "hcomposer.tabular/1", "name": "t", "choices": ["A", "F"], '
    '"positions": 2, "scores": {"AA": 1}}',
}
for tid, text in TABLES.items():
    case(f"bench-table-{tid}", ["bench-search", "--table", "{d}/t.json", "--seeds", "1"],
         write("t.json", text))  # fmt: skip
BENCH_BAD = {
    "table-nosuch": ["--table", "nosuch"],
    "table-missing-file": ["--table", "{d}/nosuch.json"],
    "synthetic-huge": ["--table", "synthetic:AF:40"],
    "synthetic-str": ["--table", "synthetic:AF:x"],
    "seeds-zero": ["--seeds", "0"],
    "budget-zero": ["--budget", "0"],
    "workers-zero": ["--workers", "0"],
    "samplers": ["--samplers", "nosuch"],
    "samplers-empty": ["--samplers", ","],
    "n-startup-zero": ["--n-startup", "0"],
    "seeds-huge": ["--seeds", str(10**9)],
}
for bid, extra in BENCH_BAD.items():
    case(f"bench-{bid}", ["bench-search", *extra])

# aggregate: damaged search folders and storages named inside them.


def _random_study(d: Path) -> None:
    """study.db replaced by bytes that are no database (its WAL files gone with it)."""
    for name in ("study.db-wal", "study.db-shm"):
        (d / "search" / name).unlink(missing_ok=True)
    (d / "search" / "study.db").write_bytes(bytes(range(256)) * 16)


AGG_DAMAGE = {
    "search-json-empty": write("search/search.json", "{}"),
    "search-json-list": write("search/search.json", "[]"),
    "search-json-not-json": write("search/search.json", "{"),
    "search-json-newer": damage_json("search/search.json", _set("format_version", 5)),
    "search-json-bad-config": damage_json(
        "search/search.json", lambda d: {**d, "config": {**d["config"], "layers": "x"}}
    ),
    "study-random": _random_study,
    "foreign-sqlite": damage_json(
        "search/search.json",
        lambda d: {**d, "config": {**d["config"], "storage": "sqlite:///{d}/elsewhere/x.db"}},
    ),
    "foreign-journal": damage_json(
        "search/search.json",
        lambda d: {**d, "config": {**d["config"], "storage": "journal:{d}/elsewhere.log"}},
    ),
    "foreign-postgres": damage_json(
        "search/search.json",
        lambda d: {**d, "config": {**d["config"], "storage": "postgresql://u:p@127.0.0.1:1/x"}},
    ),
}


def _truncated_study(d: Path) -> None:
    """study.db cut to its first third: the header is whole, pages are missing."""
    path = d / "search" / "study.db"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


# Resuming the world's search on a study.db that is not a database: one line naming the file.
for sid, damage in (("random", _random_study), ("truncated", _truncated_study)):
    case(
        f"search-resume-study-{sid}",
        ["search", "--out", "{d}/search", "--proxy", "synthetic", "--primitives", "AF",
         "--layers", "3", "--trials", "3", "--sampler", "random", "--shape", "tiny"],
        copy("search"),
        damage,
    )  # fmt: skip
for aid, damage in AGG_DAMAGE.items():
    rm_jsonl = lambda d: (d / "search/trials.jsonl").unlink()  # noqa: E731
    case(f"aggregate-{aid}", ["aggregate", "{d}/search"], copy("search"), damage, rm_jsonl)
case("aggregate-missing", ["aggregate", "{d}/nosuch"])
case("aggregate-empty", ["aggregate", "{d}/e"], mkdir("e"))
case("aggregate-file", ["aggregate", "{d}/f.txt"], write("f.txt", "x"))
case("aggregate-method", ["aggregate", "{d}/search", "--method", "x"], copy("search"))
case("aggregate-k-zero", ["aggregate", "{d}/search", "--k", "0"], copy("search"))
case("aggregate-c-neg", ["aggregate", "{d}/search", "--c", "-1"], copy("search"))
case("aggregate-storage-missing", ["aggregate", "{d}/search", "--storage",
     "sqlite:///{d}/nosuch.db"], copy("search"))  # fmt: skip
case("aggregate-jsonl-empty", ["aggregate", "{d}/t.jsonl"], write("t.jsonl", ""))
case("aggregate-jsonl-junk", ["aggregate", "{d}/t.jsonl"], write("t.jsonl", "42\n[1]\n"))

SCALE_BAD = {
    "layers-zero": ["--layers", "0"],
    "layers-str": ["--layers", "x"],
    "layers-huge": ["--layers", str(10**9)],
    "params-zero": ["--params", "0"],
    "params-str": ["--params", "x"],
    "params-huge": ["--params", "1e15"],
    "params-overflow": ["--params", "1e99"],
    "both": ["--layers", "4", "--params", "1M"],
    "neither": [],
    "strategy": ["--layers", "4", "--strategy", "x"],
    "shape": ["--layers", "4", "--shape", "nosuch"],
}
for sid, extra in SCALE_BAD.items():
    case(f"scale-{sid}", ["scale", "AF", *extra])

INSPECT_BAD = {
    "seq-len-zero": ["AF", "--seq-len", "0"],
    "seq-len-neg": ["AF", "--seq-len", "-1"],
    "seq-len-str": ["AF", "--seq-len", "x"],
    "no-pattern": [],
    "unknown-flag": ["AF", "--nosuch"],
}
for iid, extra in INSPECT_BAD.items():
    case(f"inspect-{iid}", ["inspect", *extra])
case("unknown-command", ["nosuch"])
case("bad-top-flag", ["--nosuch"])

IDS = [c[0] for c in CASES]
assert len(IDS) == len(set(IDS)), "duplicate case ids"


CASE_SECONDS = 60


class TooSlow(BaseException):
    """Raised in a case that ran for CASE_SECONDS: it did work instead of refusing."""


def _too_slow(signum, frame):
    raise TooSlow(f"still running after {CASE_SECONDS} s: the input was not refused up front")


def _fill(arg: str, d: Path) -> str:
    return arg.replace("{d}", str(d))


@pytest.mark.parametrize("cid,argv,setups", CASES, ids=IDS)
def test_bad_input(cid, argv, setups, world, tmp_path, monkeypatch, capsys):
    d = tmp_path / "case"
    d.mkdir()
    for s in setups:
        if isinstance(s, str) and s.startswith("@copy:"):
            what = s.split(":", 1)[1]
            shutil.copytree(world / what, d / what, ignore=shutil.ignore_patterns("*-wal", "*-shm"))
        else:
            s(d)
    # Storage URLs planted in folders name the case folder, not the machine.
    for f in d.rglob("search.json"):
        f.write_text(f.read_text().replace("{d}", str(d)))
    monkeypatch.chdir(d)
    monkeypatch.setenv("HCOMPOSER_CACHE", str(d / "cache"))
    (d / "cache").mkdir()
    # The tokenised shards of the embedded corpus are copied in, so a case that gets as far
    # as the data does not tokenise it again (and any new shard shows up as a change).
    if (world / "cache").is_dir() and argv[0] in ("train", "eval", "run"):
        shutil.rmtree(d / "cache")
        shutil.copytree(world / "cache", d / "cache")
    before = _snapshot(tmp_path)
    capsys.readouterr()
    # A refusal takes milliseconds; a case that starts real work is stopped and fails.
    # (Repeating, so a stop swallowed by some cleanup code is raised again.)
    signal.signal(signal.SIGALRM, _too_slow)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS, 1.0)
    try:
        code = main([_fill(a, d) for a in argv])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2, f"exit {code}; stderr: {err[-600:]}"
    assert "Traceback" not in err
    assert len(lines) == 1, f"{len(lines)} stderr lines: {err[-600:]}"
    assert lines[0].startswith("error: ")
    assert _snapshot(tmp_path) == before, "files were created or changed"


def test_corpus_size():
    assert len(CASES) >= 300
