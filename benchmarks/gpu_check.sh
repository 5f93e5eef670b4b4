#!/usr/bin/env bash
# The speed benchmark on a GPU machine (within about 5 minutes on one modern card): refinement of the three
# volume sizes with the shipped model next to SwinUNETR inference, on CUDA. Run from the repository root,
# with torch for CUDA installed (pip install torch -e .). Writes ${OUT:-benchmarks}/speed.json.
set -euo pipefail
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 300 python benchmarks/speed.py --device cuda --out "${OUT:-benchmarks}"
