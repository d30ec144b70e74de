"""Tiny random AR models built from configs, offline: for tests, examples and `diffusionvl convert --tiny`.

Contract: `make_tiny(arch, seed)` returns an untrained (random, seeded) transformers model and its tokenizer or
processor, with no download: a byte-level BPE tokenizer trained on a built-in paragraph (deterministic), a ChatML
chat template that also renders image parts, and for the Qwen-VL archs (Qwen2-VL, Qwen2.5-VL, Qwen3-VL dense
and MoE) a PIL image processor sized so that a small image becomes a handful of visual tokens; `gemma3_vl` is Gemma 3
with its vision tower, Gemma's own tokens and Gemma3Processor; the VLM families InternVL, Mistral 3, Idefics3,
SmolVLM and LLaVA-OneVision come from `tiny_families.FAMILIES`, each with its own tokens, chat template and
processor class.
Architectures: see `TINY_ARCHS`.
"""

from __future__ import annotations

from typing import Any

import torch

from diffusionvl.backbone.tiny_families import FAMILIES, Family
from diffusionvl.core.errors import DiffusionVLError

CORPUS = """
The quick brown fox jumps over the lazy dog. A block diffusion model fills several tokens at once, block after
block, and keeps the finished blocks in a key value cache. What is the capital of France? The capital of France
is Paris. What shape is in the image? It is a red circle. How many squares are there? There are two squares.
Describe the picture: a cat sits on a table next to a cup of coffee. Count the stars, name the colour, read the
text. Yes. No. One two three four five six seven eight nine ten. Hello, how can I help you today?
""".split("\n")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

QWEN_VL_ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
TINY_ARCHS = ("llama", "qwen2", "gemma3", *QWEN_VL_ARCHS, "gemma3_vl", *FAMILIES)


def tiny_tokenizer(vocab_size: int = 384, family: Family | None = None) -> Any:
    """Deterministic byte-level BPE tokenizer with ChatML special tokens and chat template, or with the special
    tokens, end of turn and chat template of a `tiny_families` family."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = family.special_tokens if family else SPECIAL_TOKENS
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([line for line in CORPUS if line.strip()], trainer)
    named = {"extra_special_tokens": family.named_tokens} if family and family.named_tokens else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=family.eos if family else "<|im_end|>",
                                  pad_token=family.pad if family else "<|endoftext|>",
                                  additional_special_tokens=special[1:], **named)
    tok.chat_template = family.template if family else CHATML_TEMPLATE
    return tok


def _text_kwargs(vocab: int, tok: Any) -> dict[str, Any]:
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def _config(arch: str, tok: Any) -> Any:
    import transformers as tf

    exact, roomy = len(tok), -(-(len(tok) + 1) // 64) * 64  # llama: no headroom (mask token forces a resize)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in
           [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    if arch == "llama":
        return tf.LlamaConfig(**_text_kwargs(exact, tok), tie_word_embeddings=False)
    if arch == "qwen2":
        return tf.Qwen2Config(**_text_kwargs(roomy, tok), tie_word_embeddings=True)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**_text_kwargs(roomy, tok), head_dim=16, sliding_window=12,
                                   layer_types=["sliding_attention", "full_attention"])
    text = dict(_text_kwargs(roomy, tok), rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                          "rope_theta": 10000.0})
    if arch == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
        return tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    if arch in ("qwen3_vl", "qwen3_vl_moe"):
        return _qwen3_vl_config(arch, tok, ids)
    if arch == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        return tf.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    raise DiffusionVLError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}")


def _qwen3_vl_config(arch: str, tok: Any, ids: dict[str, int]) -> Any:
    """Qwen3-VL (dense or MoE): interleaved M-RoPE over head_dim 16, 16-px patches, deepstack features from vision
    layers 0 and 1 added after decoder layers 0 and 1."""
    import transformers as tf

    roomy = -(-(len(tok) + 1) // 64) * 64
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True, "rope_theta": 10000.0}
    text = dict(_text_kwargs(roomy, tok), head_dim=16, rope_parameters=rope)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1])
    if arch == "qwen3_vl":
        return tf.Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    return tf.Qwen3VLMoeConfig(text_config={**text, **moe}, vision_config=vision, **ids)


def _processor(arch: str, tok: Any) -> Any:
    if arch not in QWEN_VL_ARCHS:
        return tok
    import transformers as tf
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from diffusionvl.backbone.processing import make_qwen_vl_processor

    # Qwen2-VL/2.5-VL: 56x56 .. 112x112 pixels -> 4 .. 16 patches of 14 px -> 1 .. 4 visual tokens after the 2x2
    # merge; Qwen3-VL: 16-px patches, 64x64 .. 128x128 pixels (the same token counts)
    patch = 16 if arch.startswith("qwen3") else 14
    images = Qwen2VLImageProcessorPil(size={"shortest_edge": 16 * patch * patch, "longest_edge": 64 * patch * patch},
                                      patch_size=patch, merge_size=2, temporal_patch_size=2)
    cls = {"qwen2_vl": tf.Qwen2VLProcessor, "qwen2_5_vl": tf.Qwen2_5_VLProcessor}.get(arch, tf.Qwen3VLProcessor)
    return make_qwen_vl_processor(cls, images, tok, CHATML_TEMPLATE)


GEMMA3_TEMPLATE = (
    "{{ '<bos>' }}{%- for message in messages -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def _gemma3_vl(seed: int, dtype: torch.dtype) -> tuple[Any, Any]:
    """Gemma 3 with a vision tower: Gemma's turn and image tokens (named on the tokenizer, where Gemma3Processor
    reads them), 32x32 images in 8-px patches pooled to 4 soft tokens, sliding-window and global layers."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    special = ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
               "<image_soft_token>", "<end_of_image>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([line for line in CORPUS if line.strip()], trainer)
    named = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<end_of_turn>",
                                     pad_token="<pad>", additional_special_tokens=special[3:],
                                     extra_special_tokens=named)
    text = dict(_text_kwargs(-(-(len(tok) + 1) // 64) * 64, tok), head_dim=16, sliding_window=12,
                bos_token_id=tok.bos_token_id, layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                             image_token_id=tok.image_token_id, boi_token_id=tok.boi_token_id,
                             eoi_token_id=tok.convert_tokens_to_ids("<end_of_image>"))
    torch.manual_seed(seed)
    model = tf.AutoModelForImageTextToText.from_config(config, dtype=dtype)
    with torch.no_grad():  # transformers starts the projector at zero: every image would embed the same
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 1.0)
    processor = tf.Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
                                   tokenizer=tok, chat_template=GEMMA3_TEMPLATE, image_seq_length=4)
    return model, processor


def make_tiny(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """A tiny random AR model of `arch` and its tokenizer (text) or processor (VLM)."""
    import transformers as tf

    if arch == "gemma3_vl":
        model, processor = _gemma3_vl(seed, dtype)
        return _generation_ready(model, processor.tokenizer), processor

    family = FAMILIES.get(arch)
    tok = tiny_tokenizer(family=family)
    config = family.config(tok) if family else _config(arch, tok)
    torch.manual_seed(seed)
    if family or arch in QWEN_VL_ARCHS:
        model = tf.AutoModelForImageTextToText.from_config(config, dtype=dtype)
    else:
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return _generation_ready(model, tok), family.processor(tok) if family else _processor(arch, tok)


def _generation_ready(model: Any, tok: Any) -> Any:
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.config.use_cache = True
    return model.eval()
