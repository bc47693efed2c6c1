#!/bin/bash
# One lent-GPU session, run by the `device` tool from the repository root (docs/performance.md, "Full size on a
# GPU"): issue #19's suite, then optionally a ControlNet stage (issue #15). Results land in $OUT.
#   SUITE_BUDGET  seconds for the suite (default 360); SUITE_ARGS  extra suite arguments, e.g. the section order
#                 "--sections profile,pipelines_graph,unet_compiled,movq_compiled,budget16,text_encoder,unet_step,superres"
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
budget=${SUITE_BUDGET:-360}
timeout $((budget + 50)) python3 benchmarks/gpu_suite.py --out "$OUT/suite" --time-budget "$budget" \
    ${SUITE_ARGS:-} > "$OUT/suite.log" 2>&1
echo "suite rc $?"; tail -n 60 "$OUT/suite.log"
cn=${CN_BUDGET:-0}
if [ "$cn" != "0" ]; then
    timeout "$(python3 -c "print(int($cn * 60 + 25))")" python3 -m kandinsky3.cli train controlnet \
        --config configs/nano/controlnet_gpu_stage.yaml --time-budget "$cn" 2>&1 | tr '\r' '\n' \
        | grep -v -E "rendering|latents|Loading weights" > "$OUT/controlnet_stage.log"
    tail -n 8 "$OUT/controlnet_stage.log"
    [ -d runs/nano-controlnet-gpu/export ] && tar -C runs/nano-controlnet-gpu -cf "$OUT/controlnet_export.tar" export
fi
ls -la "$OUT"
