"""The server command: `aim-serve serve` (gRPC, the Open Inference Protocol and the OpenAI-compatible HTTP API)."""

from __future__ import annotations

from service.settings import Settings


def cmd_serve(args) -> int:
    import asyncio
    import logging

    settings = Settings.from_args(args)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from service.server import serve

    asyncio.run(serve(settings))
    return 0


def add_commands(command) -> None:
    serve = command("serve", cmd_serve, "run the server (gRPC, and HTTP with --http-port)",
                    "Serve local checkpoints over gRPC (and the OpenAI-compatible HTTP API with --http-port). Each "
                    "flag also reads from AIM_<NAME> and from a --config file; a flag wins over the environment, "
                    "which wins over the file.", extra="server")
    Settings.argument_parser(serve)
