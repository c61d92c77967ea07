#!/usr/bin/env bash
# Every GPU check of ovis-batch in one run, for a session lent a GPU machine (one H200, ~15 minutes in all).
#
#     bash benchmarks/gpu_session.sh            # on the device machine, from the repository root
#
# It installs the project into a fresh venv with the machine's own torch (CUDA build) without touching a
# registry (the device machine reaches none): dependencies the image lacks come as wheels under ./wheels
# (transformers>=5.19, pydantic, ray, faiss-cpu; flash-attn for the varlen kernel; vLLM with its own
# torch for the engines step), installed with --no-deps. It runs the GPU-marked tests, then the benchmarks on
# random weights of the real 2B and 9B sizes, and prints each table. Each step has its own time limit and
# a failure does not stop the next one: the figures that could be measured are always printed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | grep -v -E "INFO|WARNING|core_worker" | tail -40
    echo "=== $name: exit ${PIPESTATUS[0]}"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m venv .venv-gpu --system-site-packages
. .venv-gpu/bin/activate
pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
ls wheels/*.whl >/dev/null 2>&1 && pip install -q --no-deps wheels/*.whl
python -c "import torch, transformers, importlib.util as u; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'flash_attn', u.find_spec('flash_attn') is not None, 'vllm', u.find_spec('vllm') is not None)"

# the real-vLLM tests too (marked vllm; the CUDA build gives each replica a GPU)
step gpu-tests 300 python -m pytest -q -m "gpu or vllm" tests/model/test_attention.py tests/model/test_vllm_real_engine.py tests/pipeline/test_vllm_job.py
# hf vs vllm vs the one-at-a-time floor, 2B then 9B (vLLM rows are skipped, and said so, without vLLM)
step engines 420 python benchmarks/bench_engines.py --sizes 2b,9b --images 32 --floor-images 2 --new-tokens 256,1024 --thinking off,on
step model-2b-9b 300 python benchmarks/bench_gpu_model.py --sizes 2b,9b --batch 8 --new-tokens 128 --repeats 2
step finetune-2b 180 python benchmarks/bench_finetune.py --size 2b --device cuda --steps 5 --warmup 2
step end-to-end-2b 240 python benchmarks/bench_gpu_model.py --sizes 2b --batch 8 --new-tokens 64 --repeats 1 --end-to-end --e2e-rows 64
