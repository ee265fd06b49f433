#!/usr/bin/env bash
# The GPU check of fast generation: the decode-engine tests, then `calofm bench generate` on the
# GPU (paper preset, batch 1024 and 4096, eager KV cache against CUDA graph replay, and graph
# replay in bf16; the shipped model's showers with and without continuous batching); the table
# comes last. About 4 minutes on one H200. Installs nothing: it runs calofm from src/ with the
# torch it finds (and packages in ./.site, where present). Geant4 cannot run where geant4-pybind
# is missing, so its showers/s per core are read from
# benchmarks/results/generation_speed_2threads.json (measured on an idle CPU; said so in the
# output). Without a GPU the same steps run on the CPU path at a small size.
#
#   bash benchmarks/gpu_check.sh            # results in $OUT (or benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/.site${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-benchmarks/results}"
mkdir -p "$out"

python3 - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

python3 -m pytest -q -p no:cacheprovider tests/test_static_decode.py tests/test_kv_cache.py

rate=$(python3 - <<'EOF'
import json, pathlib
p = pathlib.Path("benchmarks/results/generation_speed_2threads.json")
rate = json.loads(p.read_text()).get("geant4_showers_per_s_per_core") if p.exists() else None
print(rate or "")
EOF
)
geant4=(--geant4-showers 2)  # measured where geant4-pybind is installed, else the rate read above
[ -n "$rate" ] && geant4+=(--geant4-rate "$rate")

if python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    args=(--device cuda --batch 1024 --batch 4096 --mode eager --mode graphs --model small-w-ta
          --showers 2048)
    file="$out/gpu_generation.json"
else
    echo "no GPU: the CPU path at a small size; the GPU numbers are still to be taken"
    args=(--device cpu --batch 4 --steps 16 --mode eager --mode packed --threads 1)
    file="$out/gpu_check_cpu.json"
fi
if python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    # bf16 matrix products (RoPE, attention scores, KV cache, sampling in fp32): the speed here,
    # what it does to showers in docs/results.md (benchmarks/bench_precision.py)
    python3 -m calofm bench generate --random-weights --preset paper --device cuda --batch 1024 \
        --batch 4096 --mode graphs --precision bf16 --geant4-showers 0 \
        --out "$out/gpu_generation_bf16.json" --overwrite
fi
python3 -m calofm bench generate --random-weights --preset paper "${args[@]}" "${geant4[@]}" \
    --out "$file" --overwrite
