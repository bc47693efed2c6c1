#!/bin/bash
# One lent-GPU session, run by the `device` tool from the repository root (docs/performance.md, "Full size on a
# GPU"): issue #19's suite, then optionally the full-size adapter step benchmarks and nano training stages
# (issues #14, #15). Results land in $OUT.
#   SUITE_BUDGET  seconds for the suite (default 360; 0: skipped); SUITE_ARGS  extra suite arguments, e.g. the order
#                 "--sections profile,pipelines_graph,unet_compiled,movq_compiled,budget16,text_encoder,unet_step,superres"
#   BENCHES       first, benchmarks at full size (1024², bf16), e.g. "ip_adapter_step controlnet_step movq_spatial_norm"
#   IP_BUDGET     minutes for configs/nano/ip_adapter_gpu_stage.yaml (default 0: skipped; carry the CLIP and the
#                 adapter its `Needs:` line names)
#   CN_BUDGET     minutes for configs/nano/controlnet_gpu_stage.yaml (default 0: skipped)
# Before the call (here): the wheels the device lacks go in .whl (diffusers, bitsandbytes reduced to its CUDA 13
# libraries, importlib_metadata; docs/performance.md), carried. The tracked tree is over the tool's 64 MiB, so take
# the weights the suite does not read out of the index for the call and put them back after it:
#   git rm -r -q --cached src/kandinsky3/weights/nano-flash src/kandinsky3/weights/nano-sr
#   printf '/src/kandinsky3/weights/nano-flash/\n/src/kandinsky3/weights/nano-sr/\n' >> .git/info/exclude
#   … run …;  git reset -q  (and drop the two exclude lines)
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, diffusers, transformers, bitsandbytes as b
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__,
      'transformers', transformers.__version__, 'bitsandbytes', b.__version__)"; } > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
# BENCHES: single-file benchmarks at full size on the GPU, first (each ≈ 30 s); ADAPTER_STEPS=1, the old spelling
[ "${ADAPTER_STEPS:-0}" = "1" ] && BENCHES="${BENCHES:-} ip_adapter_step controlnet_step"
for bench in ${BENCHES:-}; do
    case $bench in
        ip_adapter_step|controlnet_step) args="--full --size 1024 --dtype bf16 --device cuda --repeats 9" ;;
        movq_spatial_norm) args="--size 1024 --dtype bf16 --device cuda --repeats 9" ;;
        *) echo "unknown benchmark $bench"; continue ;;
    esac
    timeout 100 python3 "benchmarks/$bench.py" $args > "$OUT/$bench.log" 2>&1
    echo "$bench rc $?"; tail -n 3 "$OUT/$bench.log"
done
budget=${SUITE_BUDGET:-360}
if [ "$budget" != "0" ]; then
    timeout $((budget + 50)) python3 benchmarks/gpu_suite.py --out "$OUT/suite" --time-budget "$budget" \
        ${SUITE_ARGS:-} > "$OUT/suite.log" 2>&1
    echo "suite rc $?"; tail -n 60 "$OUT/suite.log"
fi
# stage RECIPE CONFIG MINUTES RUN_DIR: a nano training stage fitted to MINUTES; its export and log come back
stage() {
    timeout "$(python3 -c "print(int($3 * 60 + 40))")" python3 -m kandinsky3.cli train "$1" --config "$2" \
        --time-budget "$3" --no-progress > "$OUT/$(basename "$4").log" 2>&1
    echo "$1 stage rc $?"; tail -n 4 "$OUT/$(basename "$4").log"
    [ -d "$4/export" ] && tar -C "$4" -cf "$OUT/$(basename "$4").tar" export log.jsonl
}
ip=${IP_BUDGET:-0}
[ "$ip" != "0" ] && stage ip_adapter configs/nano/ip_adapter_gpu_stage.yaml "$ip" runs/nano-ip-adapter-gpu
cn=${CN_BUDGET:-0}
[ "$cn" != "0" ] && stage controlnet configs/nano/controlnet_gpu_stage.yaml "$cn" runs/nano-controlnet-gpu
ls -la "$OUT"
