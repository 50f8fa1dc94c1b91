#!/bin/bash
# One GPU round for issue 17 items 2 and 4 (run from the worktree root on the device; $OUT collects results).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv,noheader
python3 -c "import torch,triton;print(torch.__version__,triton.__version__)"
timeout ${T_SWEEP:-160} python3 benchmarks/bench_hopper_sweep.py --json $OUT/sweep.json --best $OUT/best_cfg.txt 2>&1 | grep -v Warning | tee $OUT/sweep.log
BEST=$(cat $OUT/best_cfg.txt 2>/dev/null || echo 1,128,64,8,2)
echo "best cfg $BEST"
timeout ${T_TEST:-80} python3 -m pytest -q -x tests/test_kernel_prefill_hopper.py 2>&1 | tail -4
export HEADPLAN_PREFILL_HCFG=$BEST
timeout ${T_PREFILL:-150} python3 benchmarks/bench_prefill.py --sizes 8192,32768 --plans all_full,all_stream,full25_stream75,strided_all,elastic_all --no-flex-gen --json $OUT/prefill.json 2>&1 | grep -v Warning | tee $OUT/prefill.log | tail -14
timeout ${T_E2E:-120} python3 benchmarks/bench_e2e.py --sections prefill --json $OUT/e2e.json 2>&1 | grep "prefill:" | tee $OUT/e2e.log
