#!/usr/bin/env bash
# Gradient profiling on one GPU, then data-parallel over NGPU GPUs with torchrun (NCCL), same model,
# calibration data and seeds; prints both wall times and how far the two profiles differ.
#
#   bash benchmarks/bench_profile_dp.sh OUTDIR [SAMPLES_PER_LENGTH] [NGPU] [LENGTHS]
#
# ANSWERS=reference profiles on the reference answers instead of the dense model's greedy answers
# (on random weights greedy decoding flips between runs on near-tied logits, which changes samples).
#
# Needs `headplan` importable (pip install -e . or PYTHONPATH) and NGPU CUDA devices. The model is a
# randomly initialised Llama-3-8B shape (benchmarks/llama3-8b-shape.json): speed does not depend on
# the weights, and every rank builds the same weights from the same seed on its own GPU.
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$(mkdir -p "${1:?output folder}" && cd "$1" && pwd)"
S="${2:-8}"; N="${3:-2}"; LENS="${4:-2048,4096,8192}"
ARGS=(profile "random:$HERE/benchmarks/llama3-8b-shape.json" --method gradient --lengths "$LENS"
      --samples "$S" --dtype bfloat16 --device cuda)
if [ "${ANSWERS:-model}" = reference ]; then
    sed 's/^answers: model/answers: reference/' "$HERE/calibration_data/gradient.yaml" > "$OUT/gradient-reference.yaml"
    ARGS+=(--data "$OUT/gradient-reference.yaml")
fi
cd /tmp  # so `-m headplan.cli` imports the installed package, not the source folder
run1() {  # one GPU: $1 = device index, $2 = output name
    CUDA_VISIBLE_DEVICES=$1 python3 -m headplan.cli "${ARGS[@]}" --out "$OUT/$2" 2>&1 | grep -v "━" || true
}
t0=$(date +%s.%N); run1 0 gpu0.safetensors
t1=$(date +%s.%N); run1 1 gpu1.safetensors
t2=$(date +%s.%N)
python3 -m torch.distributed.run --standalone --nproc_per_node "$N" -m headplan.cli "${ARGS[@]}" \
    --out "$OUT/dp.safetensors" 2>&1 | grep -v "━" || true
t3=$(date +%s.%N)
python3 - "$OUT" "$t0" "$t1" "$t2" "$t3" "$N" <<'PY'
import sys
from headplan.profile import load_profile
out, n = sys.argv[1], sys.argv[6]
t = list(map(float, sys.argv[2:6]))
p = {k: load_profile(f"{out}/{k}.safetensors") for k in ("gpu0", "gpu1", "dp")}
a = p["gpu0"]
print(f"{a.samples} samples x lengths {list(a.lengths)}")
print("| run | wall s (process start to file written) |")
print(f"| 1 GPU (cuda:0) | {t[1] - t[0]:.1f} |")
print(f"| 1 GPU (cuda:1) | {t[2] - t[1]:.1f} |")
print(f"| {n} GPUs (torchrun, NCCL) | {t[3] - t[2]:.1f} |")
scale = a.loss.double().abs().max().item()
for k in ("gpu1", "dp"):
    b = p[k]
    d = (a.loss.double() - b.loss.double()).abs()
    per = [f"{n}: {d[..., i].max().item():.2e}" for i, n in enumerate(a.lengths)]
    sa, sb = a.data["samples"], b.data["samples"]
    same_ans = sum(x.get("model_answer_ids") == y.get("model_answer_ids") for x, y in zip(sa, sb))
    same_nll = sum(x["nll"] == y["nll"] for x, y in zip(sa, sb))
    print(f"gpu0 vs {k}: max |loss diff| {d.max().item():.3e} of max loss {scale:.3e} ({', '.join(per)}); "
          f"same model answers {same_ans}/{len(sa)}, identical sample loss {same_nll}/{len(sa)}")
PY
