#!/usr/bin/env bash
# Every GPU benchmark and correctness check of one GPU (≈ 25 min in all: split it over two device
# calls with the individual commands below if a call is limited to 10 min). The 2-GPU distributed
# Muon benchmark is separate (docs/benchmarks.md, "Distributed Muon"). Results: docs/benchmarks.md.
#   bash benchmarks/run_gpu_suite.sh            # writes logs and JSON under $OUT (or ./out)
# Peers (benchmark-only) come from wheels in .whl/ when present. Each script has its own
# time limit so that one slow compile cannot starve the others.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
date -u +%FT%TZ
run() {  # run NAME SECONDS CMD...: log to $OUT/NAME.log, keep the tail visible
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s)"
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1; echo "exit $? ($name)"
  grep -v "AUTOTUNE\|triton_\|SingleProcess\|strides:\|dtypes:\|Autotune\|E1123" "$OUT/$name.log" | tail -n "${TAIL:-40}"
}
if [ -f benchmarks/headline.py ]; then  # the headline cases of docs/benchmarks.md, one line each
  run headline 300 python3 benchmarks/headline.py
fi
run public_api 420 python3 benchmarks/public_api.py --rep 60 --json "$OUT/public_api.json"
run chunk_inverse 120 python3 benchmarks/gpu_chunk_inverse.py
run decay 300 python3 benchmarks/gpu_decay.py
run backward_host 100 python3 benchmarks/gpu_backward_host.py
run profile 100 python3 benchmarks/gpu_profile.py
run muon 90 python3 benchmarks/gpu_muon.py --json "$OUT/muon.json"
run max_logit 75 python3 benchmarks/gpu_max_logit.py
TAIL=60 run newton_schulz 420 python3 benchmarks/gpu_newton_schulz.py --json "$OUT/ns.json" \
  --sections "${NS_SECTIONS:-env,gram,time,graph,components}" --peers "${NS_PEERS:-torch.optim,emerging,gram-newton}" \
  --cases "${NS_CASES:-1024x1024,4096x4096,8192x8192,4096x16384,64x512x512,1294x929,128x768x2048}" \
  --peer-cases "${NS_PEER_CASES:-4096x4096,4096x16384,64x512x512}"
run tma 330 python3 benchmarks/gpu_newton_schulz.py --sections tma --json "$OUT/tma.json"
run tma_sweep 330 python3 benchmarks/gpu_tma_sweep.py --sections host,dispatch --json "$OUT/tma_sweep.json"
run triangular 280 python3 benchmarks/gpu_triangular.py --json "$OUT/tri.json"
run triangular_parts 120 python3 benchmarks/gpu_triangular_parts.py --sections chunk,group,state,solve --json "$OUT/tri_parts.json"
run derivatives 45 python3 benchmarks/gpu_derivatives.py --sizes 256 1024 2048 --reps 2
