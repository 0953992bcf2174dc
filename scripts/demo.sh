#!/usr/bin/env bash
# The demo: a tiny random Llama (tokenizer trained locally), converted with tp=2, built, and run
# under `mpirun -n 2` on the CPU with the gloo backend. Prints the generated text.
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
OUT="${1:-$ROOT/demo_out}"
rm -rf "$OUT" && mkdir -p "$OUT"
python -m dist_llm.testing.tiny_model --output_dir "$OUT/hf" --arch llama
python -m dist_llm.convert --model_dir "$OUT/hf" --output_dir "$OUT/ckpt_tp2" --tp_size 2 --dtype float32
python -m dist_llm.build --checkpoint_dir "$OUT/ckpt_tp2" --output_dir "$OUT/engine_tp2" \
    --max_batch_size 8 --max_input_len 128 --max_seq_len 256 --tokens_per_block 16
MPI_FLAGS=(--oversubscribe --bind-to none)
[ "$(id -u)" = 0 ] && MPI_FLAGS+=(--allow-run-as-root)
mpirun -n 2 "${MPI_FLAGS[@]}" python -m dist_llm.run --engine_dir "$OUT/engine_tp2" --device cpu \
    --input_text "Explain quantum computing:" "The quick brown fox" --max_new_tokens 24 \
    --output_json "$OUT/outputs.json"
echo "demo finished: outputs in $OUT/outputs.json (random weights, so the text is gibberish)"
