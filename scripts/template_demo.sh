#!/usr/bin/env bash
# The measured table of docs/templates.md: a tiny random Qwen2.5-VL trained with BD3 on one-object synthetic scenes
# (shape and colour questions), evaluated on 200 held-out scenes with no template, a bare slot and a JSON wrapper,
# each with block decoding (static, threshold) and the AR decoder on the same weights.
# Usage: bash scripts/template_demo.sh [OUT]   (default runs/templates; about 10 minutes on 2 CPU cores)
set -euo pipefail
OUT=${1:-runs/templates}
DVL=${DVL:-.venv/bin/diffusionvl}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
[ -f "$OUT/data/test.jsonl" ] || $DVL data --out "$OUT/data" --n-train 6000 --n-val 50 --n-test 200 --max-objects 1 \
    --no-real-images --text-only-fraction 0 --multi-turn-fraction 0 --task-mix shape=1,colour=1 --no-progress
[ -d "$OUT/tiny-vl" ] || $DVL convert --tiny qwen2_5_vl "$OUT/tiny-vl" --block-size 4
[ -d "$OUT/ft/final" ] || $DVL train --model "$OUT/tiny-vl" --data "$OUT/data/train.json" --output "$OUT/ft" \
    --max-steps 1500 --batch-size 16 --lr 2e-3 --log-every 50 --save-every 500 --eval-every 0

# per-line templates: each slot gets the reference answer's token count (the tiny tokenizer splits words)
$PY - "$OUT/ft/final" "$OUT/data" <<'EOF'
import json, sys
from transformers import AutoTokenizer
tok, data = AutoTokenizer.from_pretrained(sys.argv[1]), sys.argv[2]
rows = [json.loads(x) for x in open(f"{data}/test.jsonl")]
for name, form in {"slot": "<mask:{n}>", "json": '{{"answer": "<mask:{n}>"}}'}.items():
    with open(f"{data}/test_{name}.jsonl", "w") as out:
        for r in rows:
            n = len(tok(r["answers"][0], add_special_tokens=False)["input_ids"])
            out.write(json.dumps({**r, "template": form.format(n=n)}) + "\n")
EOF

ev() { [ -f "$1/results.json" ] || $DVL eval --model "$OUT/ft/final" --task synth-vqa --no-progress --out "$@" >/dev/null; }
for form in free slot json; do
  data="$OUT/data/test_$form.jsonl"; [ $form = free ] && data="$OUT/data"
  ev "$OUT/ev_${form}_static" --data "$data" --policy static
  ev "$OUT/ev_${form}_threshold" --data "$data" --policy threshold
  ev "$OUT/ev_${form}_ar" --data "$data" --decoder ar
done

$PY - "$OUT" <<'EOF'
import json, sys
from diffusionvl.decoding.template import parse
out = sys.argv[1]
print("| answer form | decoder | accuracy | colour | shape | tokens/forward | forwards/answer |")
print("|---|---|---|---|---|---|---|")
names = {"static": "block B=4, static S=4", "threshold": "block B=4, threshold 0.9", "ar": "AR (same weights)"}
forms = {"free": "free answer", "slot": "`<mask:n>`", "json": '`{"answer": "<mask:n>"}`'}
for form, label in forms.items():
    for dec, name in names.items():
        res = json.load(open(f"{out}/ev_{form}_{dec}/results.json"))
        recs = [json.loads(x) for x in open(f"{out}/ev_{form}_{dec}/samples.jsonl")]
        per = res["per_type"]
        fwd = sum((r["tokens"] + (r["finish_reason"] == "stop")) / r["tokens_per_forward"] for r in recs) / len(recs)
        print(f"| {label} | {name} | {100 * res['accuracy']:.1f}% | {100 * per['colour']['accuracy']:.1f}% | "
              f"{100 * per['shape']['accuracy']:.1f}% | {res['speed']['tokens_per_forward']:.2f} | {fwd:.1f} |")
    if form != "free":  # AR feeding each run of fixed tokens in one forward: one forward per slot token
        tpf = [(r["tokens"] + 1) / parse(r["template"]).slots for r in recs]
        print(f"| {label} | AR, fixed runs fed in one forward (bound, computed) | - | - | - | "
              f"{sum(tpf) / len(tpf):.2f} | {sum(parse(r['template']).slots for r in recs) / len(recs):.1f} |")
EOF
