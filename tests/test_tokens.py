"""One token lookup and one incremental detokenizer (backbone/tokens.py), used by decoding and the server."""

from __future__ import annotations

from conftest import tiny_ar
from diffusionvl.backbone.tokens import Detokenizer, find_token_id


def test_find_token_id_is_exact():
    _, tok = tiny_ar("llama")
    eos = tok.eos_token
    assert find_token_id(tok, eos) == tok.eos_token_id
    assert find_token_id(tok, "no-such-token-zz") is None  # never the unknown-token id


def test_streamed_deltas_concatenate_to_the_final_text_and_never_show_half_characters():
    _, tok = tiny_ar("llama")
    text = "héllo wörld ✓ 日本"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    det = Detokenizer(tok)
    pieces = []
    for n in range(1, len(ids) + 1):
        delta = det.delta(det.text(ids[:n]), final=n == len(ids))
        assert "\ufffd" not in delta
        pieces.append(delta)
    assert "".join(pieces) == det.text(ids)
    held = Detokenizer(tok)
    assert held.delta("abc", final=False, hold=2) == "a" and held.delta("abcd", final=True) == "bcd"
