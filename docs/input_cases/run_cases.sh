#!/usr/bin/env bash
# Run the cases of docs/data-formats.md: run_cases.sh IN OUT [PYTHON]
#   IN: the folder make_cases.py wrote; OUT: a new folder for the outputs; PYTHON: the interpreter
#   whose brainjepa is tested (default python3). Prints per case: name, exit code, first line of
#   stdout, first warning/error line of stderr.
set -u
IN=$1; out=$2; PY=${3:-python3}; rm -rf "$out"; mkdir -p "$out"
SMALL="--max-steps 2 --no-progress --set optim.batch_size=4 --set model.depth=1 --set model.embed_dim=32 --set model.num_heads=2 --set model.predictor_embed_dim=16 --set model.predictor_depth=1 --set model.predictor_num_heads=2 --set model.n_gradients=8"
bj() { $PY -m brainjepa "$@"; }
case_() { name=$1; shift; bj "$@" >"$out/$name.out" 2>"$out/$name.err"; rc=$?
  first=$(grep -v '^\s*$' "$out/$name.out" | head -1); warn=$(grep -E 'WARNING|error:|Error|Traceback|warn' "$out/$name.err" | head -1)
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$first" "$warn"; }
# a bundle to embed with (clean data)
bj pretrain tiny --data $IN/clean/manifest.csv --out $out/run_clean $SMALL >/dev/null 2>&1
case_ mixed_pretrain pretrain tiny --data $IN/mixed/manifest.csv --out $out/run_mixed $SMALL
grep -A0 target_tr $out/run_mixed/config.yaml | sed 's/^/  config: /'; python3 -c "import json;print('  bundle target_tr:', json.load(open('$out/run_mixed/bundle/config.json')).get('target_tr'))" 2>/dev/null
case_ raw_prepare prepare $IN/raw/manifest.csv --out $out/store_raw
case_ raw_pretrain pretrain tiny --data $IN/raw/manifest.csv --out $out/run_raw $SMALL --set data.normalization=robust
case_ raw_pretrain_none pretrain tiny --data $IN/raw/manifest.csv --out $out/run_raw_none $SMALL --set data.normalization=none
case_ raw_embed embed --model $out/run_clean --data $IN/raw/manifest.csv --out $out/raw_emb.npz
case_ huge_prepare prepare $IN/huge/manifest.csv --out $out/store_huge
case_ huge_embed embed --model $out/run_clean --data $IN/huge/manifest.csv --out $out/huge_emb.npz
python3 -c "import numpy as np;e=np.load('$out/huge_emb.npz')['embeddings'];print('  non-finite embedding rows:', int((~np.isfinite(e).all(1)).sum()))" 2>/dev/null
case_ huge_pretrain pretrain tiny --data $IN/huge/manifest.csv --out $out/run_huge $SMALL --max-steps 4 --set train.log_every=1
case_ trconflict_prepare prepare $IN/trconflict/manifest.csv --out $out/store_trc
case_ dupcols_prepare prepare $IN/dupcols/manifest.csv --out $out/store_dup
case_ latin1_prepare prepare $IN/latin1/manifest.csv --out $out/store_latin1
case_ latin1_embed embed --model $out/run_clean --data $IN/latin1/manifest.csv --out $out/latin1_emb.npz
case_ interrupted_embed embed --model $out/run_clean --data $IN/interrupted --out $out/int_emb.npz
case_ r16_pretrain pretrain tiny --data $IN/r16/manifest.csv --out $out/run_r16 --max-steps 1 --no-progress
case_ short_embed embed --model $out/run_clean --data $IN/short/manifest.csv --out $out/short_emb.npz
case_ twice_prepare prepare $IN/twice/manifest.csv --out $out/store_twice
# prepare killed (SIGKILL) while writing a 116 MB store, then embed on it and the same prepare again
$PY -m brainjepa -q prepare $IN/big/manifest.csv --out $out/store_big & pid=$!
for i in $(seq 1 600); do f=$(ls $out/store_big/data.bin $out/store_big.incomplete/data.bin 2>/dev/null | head -1)
  if [ -n "$f" ] && [ "$(stat -c %s "$f")" -gt 30000000 ]; then break; fi; sleep 0.1; done
kill -9 $pid; wait $pid 2>/dev/null
echo "killed_prepare left: $(cd $out && ls -d store_big* | tr '\n' ' ')containing: $(cd $out && ls store_big* | tr '\n' ' ')"
case_ killed_embed embed --model $out/run_clean --data $out/store_big --out $out/big.npz
case_ killed_rerun prepare $IN/big/manifest.csv --out $out/store_big
