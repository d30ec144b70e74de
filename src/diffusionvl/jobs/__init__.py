"""Layer 5, jobs: what users run on a model.

train (BD3 finetuning), evaluation (accuracy with speed next to it), serve (the OpenAI-compatible server), bench
(decoding speed against baselines), composition (`diffusionvl compose` to disk), integrations (lmms-eval). Imports
every layer below (core, data, backbone, decoding, model), never recipes or the CLI. Nothing is imported here.
"""
