"""Layer 4, model: the diffusion model and its checkpoint formats.

modeling (DiffusionVLModel, its saving format), wrapping (AR model -> DiffusionVLModel in memory), compat (the
DiffusionVL reference checkpoints and generate call), conversion (convert / load, with the explicit list of
checkpoint formats). Imports core, data, backbone and decoding. Nothing is imported here: import the module you need.
"""
