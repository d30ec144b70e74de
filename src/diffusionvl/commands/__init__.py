"""Subcommands of the `diffusionvl` CLI: one module per job, each exposing `add_arguments(parser)` and `run(args)`."""
