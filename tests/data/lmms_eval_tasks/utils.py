"""Prompt and image functions of the local lmms-eval tasks in this folder (`!function utils.NAME` in the yamls).

Images are read relative to this folder, so the tasks find them from any working directory; the jsonl files (the
yamls' `data_files`) are read relative to the directory lmms-eval runs in: run it from this folder.
"""

from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    with Image.open(HERE / doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_choice(doc):
    return doc["choices"]
