"""aim-serve: serve multimodal LLMs over gRPC and HTTP with AIM token reduction, call them, and work with the
engine alone.

  serving        serve                                       (cli/server.py)
  client         generate, stream, estimate, info, health    (cli/client.py: gRPC only, never torch)
  engine alone   ask, build-tiny, sample-media               (cli/engine.py)
  reference      build-reference, train-reference, eval, calibrate  (cli/reference.py)

`aim-serve COMMAND --help` lists a command's flags with their defaults and units."""

from __future__ import annotations

import argparse
import os
import sys

from aim_engine.errors import Cancelled, EngineError, ModelLoadError

from . import client, engine, reference, server
from .flags import Help, Parser

# the extra (pyproject.toml) that brings a module the client install lacks
_EXTRA_OF = {**dict.fromkeys(("torch", "transformers", "safetensors", "numpy", "PIL", "av", "grpc_reflection",
                              "prometheus_client", "pynvml", "fastapi", "uvicorn"), "server"),
             **dict.fromkeys(("gguf", "onnx", "accelerate", "tqdm", "matplotlib", "reference_model", "evaluation"),
                             "reference")}  # the last two: this project's, absent from the server images


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="aim-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help: str, description: str | None = None, extra: str | None = None):
        """`extra`: what the command needs beyond the client install (pyproject.toml's optional dependencies)."""
        p = sub.add_parser(name, help=help, description=description or help, formatter_class=Help)
        p.set_defaults(func=func, extra=extra)
        return p

    for audience in (server, client, engine, reference):
        audience.add_commands(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not sys.stderr.isatty():
        # a log file or a pipe: no progress bars in it (tqdm's own, and transformers' and the Hub's, which read
        # this when they are first imported)
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except ImportError as exc:
        module = (exc.name or "").split(".")[0]
        if module not in _EXTRA_OF:
            raise
        extra = "reference" if "reference" in (_EXTRA_OF[module], args.extra) else "server"
        print(f"error: `aim-serve {args.command}` needs {exc.name}, which this install lacks: "
              f"pip install 'aim-serve[{extra}]'", file=sys.stderr)
        return 2
    except (EngineError, ModelLoadError, Cancelled, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        import grpc

        if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        raise
