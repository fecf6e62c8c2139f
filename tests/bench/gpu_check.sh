#!/usr/bin/env bash
# GPU check on one GPU (an H200): the study's base strategy at full size, then sampling; no Ray, no
# MLflow. Under 8 minutes on a bare GPU machine. See tests/bench/gpu_check.py for what it measures.
#
#   bash tests/bench/gpu_check.sh                      # sweeps/paper.yaml: SDXL, 1024 px, bf16, 50 steps
#   bash tests/bench/gpu_check.sh --steps 20 --samples 8
#   bash tests/bench/gpu_check.sh --wheels             # here (with pip access): fill .whl/ for the GPU machine
#
# A GPU machine whose python3 has torch (+ torchvision, numpy, pillow) but not the rest: carry the
# wheels in .whl/ at the repo root (not committed: add `/.whl/` to .git/info/exclude). This script
# installs them into /tmp/site and puts them and the repo on PYTHONPATH (no install of the repo).
# Without .whl/ it assumes the packages are installed.
#
# What the imports need (sar_ray.models / strategies / diffusion / sample / config / plan, and
# open_clip for the CLIP BPE vocabulary that models.clip_tokenizer reads; sample imports
# sar_ray.data, i.e. numpy, PIL, tifffile). The wheels that travel, for python 3.12 on x86-64,
# at the versions of this repo's .venv (`--wheels` reads them from the python3 that runs it):
#   diffusers 0.42.1 (6.1 MiB), transformers 5.23.0 (12.7), peft 0.21.2 (0.8), tokenizers 0.23.3 (3.2),
#   regex 2026.11.19 (0.8), pydantic 2.14.4 (0.5), pydantic_core 2.50.5 (2.2), annotated-types 0.8.0,
#   typing-inspection 0.4.5, typing_extensions 4.16.0, open_clip_torch 3.3.0 (1.5), ftfy 6.3.1,
#   wcwidth 0.9.4 (0.8): 28.6 MiB in all.
# The H200 image already has the rest at versions these accept (huggingface_hub 1.33 >= 1.32,
# safetensors 0.8.0, pyyaml, numpy, pillow, tifffile, tqdm, requests, psutil, accelerate, timm,
# torchvision matching its torch). A machine with torch alone also needs: huggingface_hub httpx2
# httpcore2 hf-xet truststore click anyio h11 idna certifi safetensors pyyaml tifffile tqdm requests
# urllib3 charset_normalizer filelock fsspec packaging psutil accelerate timm importlib_metadata zipp
# (11.5 MiB) plus numpy (15.9) and pillow (6.8): 63 MiB with the above, over the 64 MiB a device call
# carries with the repo; such a machine has numpy and pillow almost always, and torchvision must
# come with its torch (open_clip imports it). The download (what --wheels runs):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 transformers==5.23.0 peft==0.21.2 tokenizers==0.23.3 regex==2026.11.19 \
#     pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     typing_extensions==4.16.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

WHEELS=(diffusers transformers peft tokenizers regex pydantic pydantic_core annotated-types typing-inspection
        typing_extensions open_clip_torch ftfy wcwidth)

if [[ "${1:-}" == "--wheels" ]]; then
  pins=()
  for name in "${WHEELS[@]}"; do
    pins+=("$name==$(python3 -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")")
  done
  rm -rf .whl  # one version of each: two of one package stop the install
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${pins[@]}"
  du -sh .whl
  exit 0
fi

export PYTHONUNBUFFERED=1
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
missing=$(python3 - <<'EOF'
import importlib.util
mods = ["torch", "torchvision", "numpy", "PIL", "tifffile", "yaml", "pydantic", "diffusers", "transformers",
        "peft", "tokenizers", "safetensors", "huggingface_hub", "open_clip", "ftfy", "regex"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
EOF
)
if [[ -n "$missing" ]]; then
  echo "gpu_check: missing python packages: $missing; carry their wheels in .whl/ (see the top of $0)" >&2
  exit 2
fi
exec timeout 480 python3 tests/bench/gpu_check.py "$@"
