"""Tiny random VLMs of the transformers families people finetune today, each with its own processor class.

Contract: `FAMILIES[name]` is a `Family`: the special tokens its tokenizer needs (the family's image placeholder and
layout tokens, with the named ones the processor reads off the tokenizer), the end-of-turn token, a chat template
shaped like the family's (it renders an image part as the placeholder the processor expands), `config(tok)` (a tiny
transformers config: 2 layers, width 64, a vision tower of width 32) and `processor(tok)` (the family's processor
class around a PIL image processor sized so that a small image becomes a few tiles of a few tokens). Families whose
processor also takes video (InternVL, SmolVLM, LLaVA-OneVision) get it through `processing.image_only` (the
video processor needs torchvision).
`tiny.make_tiny` builds the tokenizer and the model from these; nothing here downloads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from diffusionvl.backbone.processing import PixtralRowsProcessor, image_only


def _chatml(image: str) -> str:
    """ChatML (Qwen2-based families) with an image part rendered as `image`."""
    return (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{ '" + image + "' }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def _parts(image: str) -> str:
    return ("{%- if message['content'] is string -%}{{ message['content'] }}"
            "{%- else -%}{%- for part in message['content'] -%}"
            "{%- if part['type'] == 'image' -%}{{ '" + image + "' }}"
            "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
            "{%- endfor -%}{%- endif -%}")


# Idefics3: "<|im_start|>User:<image>text<end_of_utterance>\nAssistant: answer<end_of_utterance>\n"
IDEFICS3_TEMPLATE = (
    "{{ '<|im_start|>' }}{%- for message in messages -%}"
    "{{ message['role'] | capitalize }}{{ ':' if message['role'] == 'user' else ': ' }}" + _parts("<image>")
    + "{{ '<end_of_utterance>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)

# SmolVLM: as Idefics3, but "User:" when the turn opens with an image and "User: " when it opens with text
SMOLVLM_TEMPLATE = (
    "{{ '<|im_start|>' }}{%- for message in messages -%}"
    "{{ message['role'] | capitalize }}"
    "{{ ':' if message['content'] is not string and message['content'][0]['type'] == 'image' else ': ' }}"
    + _parts("<image>") + "{{ '<end_of_utterance>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)

# Mistral 3: "<s>[INST][IMG]text[/INST]answer</s>"
MISTRAL3_TEMPLATE = (
    "{{ '<s>' }}{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '[INST]' }}" + _parts("[IMG]") + "{{ '[/INST]' }}"
    "{%- elif message['role'] == 'system' -%}{{ '[SYSTEM_PROMPT]' }}" + _parts("") + "{{ '[/SYSTEM_PROMPT]' }}"
    "{%- else -%}" + _parts("") + "{{ '</s>' }}{%- endif -%}"
    "{%- endfor -%}"
)

CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class Family:
    special_tokens: list[str]
    eos: str
    pad: str
    template: str
    config: Callable[[Any], Any]
    processor: Callable[[Any], Any]
    named_tokens: dict[str, str] = field(default_factory=dict)  # tokenizer attributes the processor reads


def _text(tok: Any, vocab: int, **extra: Any) -> dict[str, Any]:
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, **extra)


def _vocab(tok: Any) -> int:
    return -(-(len(tok) + 1) // 64) * 64  # room for the mask token


def _vision(**extra: Any) -> dict[str, Any]:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, **extra)


# ---- InternVL: 28 px tiles of 7 px patches -> 16 patches -> pixel shuffle 0.5 -> 4 tokens per tile --------------
def _internvl_config(tok: Any) -> Any:
    import transformers as tf

    config = tf.InternVLConfig(text_config=dict(_text(tok, _vocab(tok)), model_type="qwen2"),
                               vision_config=_vision(image_size=28, patch_size=7),
                               image_token_id=tok.context_image_token_id, image_seq_length=4, downsample_ratio=0.5)
    # at InternVL's 0.02 the tiny model answers one token whatever the image
    config.initializer_range = config.text_config.initializer_range = 0.2
    return config


def _internvl_processor(tok: Any) -> Any:
    import transformers as tf
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    images = GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, crop_to_patches=True, min_patches=1,
                                      max_patches=4)
    return image_only(tf.InternVLProcessor)(images, tok, image_seq_length=4, chat_template=tok.chat_template)


# ---- Mistral 3: Pixtral patches of 4 px, 2x2 merge -> one [IMG] per 8x8 px, at most 32 px a side ------------------
def _mistral3_config(tok: Any) -> Any:
    import transformers as tf

    vision = _vision(image_size=32, patch_size=4, head_dim=16, rope_theta=10000.0)
    config = tf.Mistral3Config(text_config=dict(_text(tok, _vocab(tok), head_dim=16), model_type="mistral"),
                               vision_config=dict(vision, model_type="pixtral"),
                               image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2)
    config.initializer_range = config.text_config.initializer_range = 0.2  # as InternVL: 0.02 answers one token
    return config


def _mistral3_processor(tok: Any) -> Any:
    import transformers as tf
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    images = PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size=8)
    kw = dict(patch_size=4, spatial_merge_size=2, chat_template=tok.chat_template)
    try:
        return tf.PixtralProcessor(images, tok, **kw)
    except ImportError:  # its module imports torchvision: the stand-in with its layout
        return PixtralRowsProcessor(images, tok, **kw)


# ---- Idefics3: 16 px tiles of 4 px patches -> 16 patches -> pixel shuffle x2 -> 4 tokens; up to 2x2 tiles + global
def _idefics3_layout(config_class: Any, tok: Any) -> Any:
    """Idefics3's tiny layout under `config_class` (Idefics3Config or SmolVLMConfig, which share it)."""
    return config_class(text_config=dict(_text(tok, _vocab(tok)), model_type="llama"),
                        vision_config=_vision(image_size=16, patch_size=4),
                        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2)


def _idefics3_config(tok: Any) -> Any:
    import transformers as tf

    return _idefics3_layout(tf.Idefics3Config, tok)


def _idefics3_processor(tok: Any) -> Any:
    import transformers as tf
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    images = Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 16})
    return tf.Idefics3Processor(images, tok, image_seq_len=4, chat_template=tok.chat_template)


# ---- SmolVLM: Idefics3's layout (same tiles, patches and pixel shuffle) under its own classes; it also takes video
def _smolvlm_config(tok: Any) -> Any:
    import transformers as tf

    return _idefics3_layout(tf.SmolVLMConfig, tok)


def _smolvlm_processor(tok: Any) -> Any:
    import transformers as tf
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    images = SmolVLMImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 16})
    return image_only(tf.SmolVLMProcessor)(images, tok, image_seq_len=4, chat_template=tok.chat_template)


# ---- LLaVA-OneVision: 16 px views of 4 px patches -> 16 tokens a view; anyres grids up to 2x2 views + newlines ----
PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]


def _onevision_config(tok: Any) -> Any:
    import transformers as tf

    vision = _vision(image_size=16, patch_size=4, model_type="siglip_vision_model")
    return tf.LlavaOnevisionConfig(text_config=dict(_text(tok, _vocab(tok)), model_type="qwen2"),
                                   vision_config=vision, image_token_index=tok.convert_tokens_to_ids("<image>"),
                                   video_token_index=tok.convert_tokens_to_ids("<video>"),
                                   image_grid_pinpoints=PINPOINTS, vision_feature_select_strategy="full",
                                   vision_aspect_ratio="anyres_max_9")


def _onevision_processor(tok: Any) -> Any:
    import transformers as tf
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    images = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16}, crop_size={"height": 16, "width": 16},
                                             image_grid_pinpoints=PINPOINTS)
    return image_only(tf.LlavaOnevisionProcessor)(images, tok, num_image_tokens=16,
                                                  vision_feature_select_strategy="full",
                                                  vision_aspect_ratio="anyres_max_9", chat_template=tok.chat_template)


FAMILIES: dict[str, Family] = {
    "internvl": Family(CHATML_TOKENS + ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"], "<|im_end|>",
                       "<|endoftext|>", _chatml("<IMG_CONTEXT>\\n"), _internvl_config, _internvl_processor,
                       {"start_image_token": "<img>", "end_image_token": "</img>",
                        "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}),
    "mistral3": Family(["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]",
                        "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "<pad>"], "</s>", "<pad>", MISTRAL3_TEMPLATE,
                       _mistral3_config, _mistral3_processor),
    "idefics3": Family(["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                        "<global-img>"] + [f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)],
                       "<end_of_utterance>", "<|endoftext|>", IDEFICS3_TEMPLATE, _idefics3_config,
                       _idefics3_processor),
    "smolvlm": Family(["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                       "<global-img>", "<video>"] + [f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)],
                      "<end_of_utterance>", "<|endoftext|>", SMOLVLM_TEMPLATE, _smolvlm_config, _smolvlm_processor),
    "llava_onevision": Family(CHATML_TOKENS + ["<image>", "<video>"], "<|im_end|>", "<|endoftext|>",
                              _chatml("<image>\\n"), _onevision_config, _onevision_processor),
}
