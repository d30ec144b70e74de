"""Layer 2, backbone: what differs between transformers architectures, and how inputs reach them.

adapters (the one interface the engine asks a model through), prompts (conversations and chat templates),
processing (tokenizers / processors), compose (LLaVA-style composition of an LM + a vision tower), vision (towers,
anyres tiling, the token cache), assets (offline pretrained weights), tiny (tiny random models). Imports core and
data only. Nothing is imported here: import the module you need.
"""
