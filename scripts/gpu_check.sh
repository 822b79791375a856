#!/usr/bin/env bash
# The GPU checks, on a machine with a CUDA (or Metal) build of llama-cpp-python:
# the engine tests with the model offloaded, the ingestion ratio at 32k (the seq_div fix: native division),
# then the GPU part of docs/RESULTS.md (division probe, ingestion benchmark at 32k tokens, perplexity at 32k,
# pass-key at 16k and 32k).
#
#   CMAKE_ARGS="-DGGML_CUDA=on" python -m selfextend_local.llama_build     # our build, native division
#   bash scripts/gpu_check.sh [LOG_DIR]
set -uo pipefail
logs=${1:-gpu-check}
mkdir -p "$logs"
python3 - <<'EOF' || exit 1
import sys
import llama_cpp
if not llama_cpp.llama_supports_gpu_offload():
    sys.exit("this llama-cpp-python build cannot offload to a GPU; rebuild it with CMAKE_ARGS=-DGGML_CUDA=on")
EOF
SELFEXTEND_TEST_GPU_LAYERS=99 python3 -m pytest -q -p no:cacheprovider \
    tests/test_schedules.py tests/test_engine.py tests/test_long_context.py 2>&1 | tee "$logs/tests.log"
python3 scripts/bench_ingest.py --tokens 32768 --group 8 --window 1024 --gpu-layers 99 --mode whole --repeats 3 \
    2>&1 | tee "$logs/ingest.log"
python3 scripts/bench_edits.py --gpu-layers 99 2>&1 | tee "$logs/edits.log"
python3 scripts/make_results.py --gpu-layers 99 --sections probe,bench,ppl,passkey \
    --group 8 --window 1024 --bench-tokens 32768 --ppl-tokens 32768 --ppl-bucket 4096 \
    --passkey-lengths 16384,32768 --passkey-depths 0.2,0.5,0.8 --passkey-seeds 2 --passkey-kinds digits,word \
    2>&1 | tee "$logs/results.log"
