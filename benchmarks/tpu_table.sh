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
print("| config | slice | params | per-chip peak: train / eval step | fits | step >= | MFU <= | steps | time >= |")
print("|---|---|---|---|---|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*", "compile_*.json"))):
  r = json.load(open(path))
  train, evaluate, roof = r["train_step"], r["eval_step"], r["roofline"] or {}
  peaks = " / ".join("-" if "peak_bytes" not in s else f"{s['peak_bytes'] / 1e9:.2f} GB" for s in (train, evaluate))
  fits = "yes" if train["fits"] and evaluate["fits"] else "no"
  step = f"{1e3 * roof['step_seconds']:.1f} ms" if roof else "-"
  mfu = f"{100 * roof['mfu']:.0f}%" if roof else "-"
  hours = f"{roof['seconds_to_num_steps'] / 3600:.1f} h" if roof else "-"
  print(f"| {os.path.basename(os.path.dirname(path))} | {names.get(r['topology'], r['topology'])} "
        f"({r['num_devices']} chips) | {r['num_params'] / 1e6:.0f}M | {peaks} | {fits} | {step} | {mfu} "
        f"| {roof.get('num_steps', 0):,} | {hours} |")
PY
