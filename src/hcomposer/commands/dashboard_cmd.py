"""hcomposer dashboard: watch a search's study live in the browser (optuna-dashboard)."""

from __future__ import annotations

from hcomposer.search.dashboard import serve

HELP = "Serve a search's study with optuna-dashboard (live, read-only)."


def add_arguments(p) -> None:
    p.add_argument("folder", nargs="?", default=None, help="search run folder (holds search.json)")
    p.add_argument(
        "--storage", default=None, help="or a storage URL (postgresql://..., sqlite:///...)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")


def run(args) -> int:
    try:
        serve(args.folder, args.storage, args.host, args.port)
    except KeyboardInterrupt:
        return 0
    return 0
