"""The ``hcomposer`` command line: a small dispatcher over ``hcomposer.commands``.

Each command lives in ``hcomposer/commands/<module>.py`` and exposes ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``, and, where its options set config
fields, ``option_fields() -> {dest: (ConfigClass, field)}``: those options are checked
against the fields' declarations before the command runs. Exit codes: 0 done; 2 bad
input (one line on stderr, no traceback, nothing written); 1 internal error.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from hcomposer.errors import UserError
from hcomposer.fields import field_spec
from hcomposer.guards import check_args
from hcomposer.threads import apply_thread_policy
from hcomposer.version import __version__

__all__ = ["main", "COMMANDS", "ALIASES"]

# command name -> module in hcomposer.commands
COMMANDS: dict[str, str] = {
    "inspect": "inspect_cmd",
    "plan": "plan_cmd",
    "score": "score_cmd",
    "search": "search_cmd",
    "dashboard": "dashboard_cmd",
    "aggregate": "aggregate_cmd",
    "scale": "scale_cmd",
    "train": "train_cmd",
    "eval": "eval_cmd",
    "compare": "compare_cmd",
    "export": "export_cmd",
    "convert": "convert_cmd",
    "run": "run_cmd",
    "bench-search": "bench_search_cmd",
    "proxy-rank": "proxy_rank_cmd",
    "isoflop": "isoflop_cmd",
}

# Old names kept working for one release, not listed by --help: one command per concept
# ("eval" a run folder vs "evaluate" a pattern collided; "scale" a pattern vs "scaling" sweeps).
ALIASES: dict[str, str] = {"evaluate": "score", "scaling": "isoflop"}


def _resolve_alias(argv: list[str]) -> list[str]:
    """``argv`` with an old command name replaced by its new one."""
    for i, a in enumerate(argv):
        if not a.startswith("-"):
            return [*argv[:i], ALIASES.get(a, a), *argv[i + 1 :]] if a in ALIASES else argv
    return argv


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UserError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="hcomposer", description="Discover hybrid language-model architectures.")
    parser.add_argument("--version", action="version", version=f"hcomposer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module in COMMANDS.items():
        if only is not None and name != only:
            # Register cheaply so --help lists every command without importing torch.
            sub.add_parser(name, help=f"(see hcomposer {name} --help)")
            continue
        mod = importlib.import_module(f"hcomposer.commands.{module}")
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _fields=getattr(mod, "option_fields", None))
    return parser


def _quiet_stdout() -> None:
    """After a closed pipe (``hcomposer inspect --json | head``): drop further output."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout is not a real file (captured in tests): nothing will be flushed to it


def main(argv: list[str] | None = None) -> int:
    argv = _resolve_alias(sys.argv[1:] if argv is None else list(argv))
    command = next((a for a in argv if not a.startswith("-")), None)
    # Before torch loads: OpenMP reads its wait policy once (see hcomposer.threads).
    apply_thread_policy(command)
    try:
        parser = build_parser(only=command if command in COMMANDS else None)
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 0 if not argv else 2
        args.argv = ["hcomposer", *argv]
        # Options that set config fields are checked against the fields' declarations.
        fields = args._fields() if args._fields else {}
        check_args(args, {dest: field_spec(*where) for dest, where in fields.items()})
        code = int(args._run(args) or 0)
        sys.stdout.flush()
        return code
    except UserError as e:
        # One line, whatever the message holds.
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        if os.environ.get("HCOMPOSER_DEBUG"):
            raise
        import traceback

        traceback.print_exc()
        print("internal error (exit 1): please report it with the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
