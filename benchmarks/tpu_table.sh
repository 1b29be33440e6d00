#!/usr/bin/env bash
# docs/tpu.md's table: --mode=compile for each paper config on v4-8, v5e-8, v5p-8 and a v5p-32
# slice, then one markdown row per result. Needs libtpu (pip install 'chartx[tpu]'), no TPU.
#   benchmarks/tpu_table.sh [OUT_DIR]      (40 compilations: about an hour on 2 loaded cores)
# CONFIGS="enwik8_64l" TOPOLOGIES="v4:2x2x1" benchmarks/tpu_table.sh: a subset; a rerun adds rows.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/chartx_tpu_table}
# enwik8_xl_12l's batch of 22 and eval batch of 10 do not split over 4, 8 or 16 chips.
declare -A extra=([enwik8_xl_12l]="--config.train.batch_size=32 --config.eval.batch_size=16")
for config in ${CONFIGS:-enwik8_12l enwik8_64l text8_64l enwik8_xl_12l enwik8_xl_24l}; do
  for topology in ${TOPOLOGIES:-v4:2x2x1 v5e:2x4 v5p:2x2x1 v5p:2x2x4}; do
    python -m chartx.main --config="configs/$config.py" --workdir="$out/$config" --mode=compile \
      --config.compile.topology="$topology" ${extra[$config]:-} | grep -v '^compile: wrote'
  done
done
python - "$out" <<'PY'
import glob, json, os, sys
names = {"v4:2x2x1": "v4-8", "v5e:2x4": "v5e-8", "v5p:2x2x1": "v5p-8", "v5p:2x2x4": "v5p-32"}
print("| config | slice | chips | per-chip peak, train step (GB) | fits | step >= (s) | MFU <= | steps | time >= |")
print("|---|---|---|---|---|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*", "compile_*.json"))):
  r = json.load(open(path))
  t, roof = r["train_step"], r["roofline"] or {}
  days = roof.get("seconds_to_num_steps", float("nan")) / 86400
  peak = t.get("peak_bytes")
  print(f"| {os.path.basename(os.path.dirname(path))} | {names.get(r['topology'], r['topology'])} "
        f"| {r['num_devices']} | {'-' if peak is None else f'{peak / 1e9:.2f}'} | {'yes' if t['fits'] else 'no'} "
        f"| {roof.get('step_seconds', float('nan')):.3f} | {100 * roof.get('mfu', float('nan')):.0f}% "
        f"| {roof.get('num_steps', 0):,} | {days:.1f} days |")
PY
