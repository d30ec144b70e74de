"""`diffusionvl serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for a diffusion model.

Contract: loads the model (`--model PATH`, else the embedded default), builds the app with
`diffusionvl.jobs.serve.create_app` and runs uvicorn on `--host`/`--port` (127.0.0.1:8000 by default) until
interrupted. Server flags come from `ServeConfig`, the default decode settings of requests from `DecodeConfig`.
Binding a non-loopback address prints a warning: the API has no authentication. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from diffusionvl.commands._common import add_model_arguments, load_model
from diffusionvl.core.config import DecodeConfig, add_dataclass_arguments, dataclass_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffusionvl.jobs.serve.config import ServeConfig

    add_model_arguments(parser)
    add_dataclass_arguments(parser, ServeConfig)
    parser.add_argument("--allow-remote-images", action="store_true", default=None,
                        help="let requests name http(s) image URLs, which the server then downloads (default: off)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn log level (default: info)")
    add_dataclass_arguments(parser, DecodeConfig)


def run(args: argparse.Namespace) -> int:
    from diffusionvl.jobs.serve.config import ServeConfig, is_loopback

    config = dataclass_from_args(ServeConfig, args).validate()
    decode = dataclass_from_args(DecodeConfig, args).validate()
    if not is_loopback(config.host):
        print(f"warning: listening on {config.host}: anyone who can reach it can use the model "
              "(the API has no authentication)", file=sys.stderr)
    try:
        import uvicorn

        from diffusionvl.jobs.serve.app import create_app
    except ImportError as exc:
        from diffusionvl.core.errors import DiffusionVLError

        raise DiffusionVLError(f"serving needs the serve extra ({exc.name} is missing): "
                               "pip install 'diffusionvl[serve]'") from None
    model = load_model(args)
    from diffusionvl.decoding import hint_untrained

    hint_untrained(model, decode.decoder)  # at start-up, not at the first request
    name = config.model_name or (os.path.basename(os.path.normpath(args.model)) if args.model else None)
    app = create_app(model, config, decode, model_name=name)
    from diffusionvl.jobs.serve.config import limits_line

    print(limits_line(config), file=sys.stderr, flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level, timeout_graceful_shutdown=10)
    return 0
