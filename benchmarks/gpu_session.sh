#!/usr/bin/env bash
# Issue 14's GPU records in one lease of the `device` tool (read /work/.library/device/README.md first).
#
#   make gpu-carry                      # here: wheels the GPU image lacks -> .devcarry/wheels (gitignored)
#   device run, carry [".devcarry"], command "bash benchmarks/gpu_session.sh 1"   # then part 2, then 3
#
# The GPU image has Python 3.12 with torch, torchvision, peft, typer, rich, safetensors and matplotlib; the rest
# comes from the carried wheels (no network there). clipguard runs from this checkout (PYTHONPATH). Each part fits
# one 10-minute call and leaves its records (and a log) in $OUT, named for the GPU; copy them to
# benchmarks/results/ and update README's Speed table from them. Nothing here is timed by this script itself.
set -euo pipefail
part=${1:?usage: gpu_session.sh 1|2|3}
OUT=${OUT:-/tmp/clipguard-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps .devcarry/wheels/*.whl
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 CLIPGUARD_CACHE=/tmp/clipguard-cache
gpu=$(python3 -c "import torch; n = torch.cuda.get_device_name(); print(n.split()[1].lower())")  # h100, h200
log="$OUT/gpu-part$part-$gpu.log"
exec > >(tee -a "$log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
cd benchmarks
case $part in
1)  # the gpu-marked tests (nvJPEG against PIL), clean eval and PGD-10 throughput with their roofline lines
    python3 -m pytest -q -m gpu -p no:cacheprovider ../tests/test_device_decode.py
    python3 perf_eval.py --model ViT-B-32:none --n 1000 --repeat 20 --batch-size 1000 \
        --out "$OUT/perf_eval-vit-b-32-random-$gpu.json"
    python3 perf_eval.py --model ViT-B-32:none --n 1000 --repeat 20 --batch-size 1000 --compile \
        --out "$OUT/perf_eval-vit-b-32-random-compile-$gpu.json"
    python3 perf_eval.py --model ViT-L-14:none --n 512 --repeat 4 --batch-size 256 \
        --out "$OUT/perf_eval-vit-l-14-random-$gpu.json"
    python3 perf_attack.py --attack-all --out "$OUT/perf_attack-$gpu.json"
    python3 perf_attack.py --attack-all --compile --out "$OUT/perf_attack-compile-$gpu.json"
    python3 perf_attack.py --attack-all --compile --compile-mode reduce-overhead \
        --out "$OUT/perf_attack-cudagraphs-$gpu.json"
    ;;
2)  # 10,000 JPEGs end to end (eval + PGD-10), PIL workers vs nvJPEG; LoRA-TeCoA with a 10-step inner attack
    python3 perf_decode.py --model ViT-B-32:none --n 10000 --batch-size 500 --out "$OUT/perf_decode-$gpu.json"
    python3 perf_finetune.py --model ViT-B-32:none --methods lora --attack-steps 10 --batch-size 256 --steps 20 \
        --out "$OUT/perf_finetune-vit-b-32-random-$gpu.json"
    ;;
3)  # AutoAttack standard on 1,000 images: clipguard's runs against the reference package called directly;
    # compiled fine-tuning (LoRA on the MLPs: peft's attention LoRA does not compile; VPT; full)
    python3 perf_autoattack.py --model ViT-B-32:none --n 1000 --batch-size 500 \
        --out "$OUT/autoattack-vit-b-32-random-$gpu.json"
    python3 perf_finetune.py --model ViT-B-32:none --methods lora --lora-targets c_fc,c_proj --attack-steps 10 \
        --batch-size 256 --steps 20 --out "$OUT/perf_finetune-vit-b-32-random-mlp-lora-$gpu.json"
    python3 perf_finetune.py --model ViT-B-32:none --methods lora,vpt,full --lora-targets c_fc,c_proj \
        --attack-steps 10 --batch-size 256 --steps 20 --compile \
        --out "$OUT/perf_finetune-vit-b-32-random-compile-$gpu.json"
    ;;
*)  echo "unknown part $part: 1, 2 or 3" >&2; exit 2 ;;
esac
