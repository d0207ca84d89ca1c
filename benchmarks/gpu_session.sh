#!/usr/bin/env bash
# Issue 25's GPU records from one lease of the `device` tool (read /work/.library/device/README.md first). A lease has
# 15 minutes of device time in all, the machine's start (1-2 minutes) and idle waits included, and one command runs
# 10 minutes at most: so everything is one command under one deadline (GPU_SESSION_BUDGET seconds, default 300), the
# issue's goals first. Every step runs under `timeout` with the smaller of its own cap and the time left; a step
# that fails or runs out is logged and the next one runs; steps that no longer fit are skipped by name, and a rerun
# names them.
#
#   make gpu-carry      # here, first: the wheels the GPU image lacks -> .devcarry/wheels (gitignored, ~45 MB)
#   device run: carry [".devcarry"], timeout_s 600, command "GPU_SESSION_BUDGET=540 bash benchmarks/gpu_session.sh all"
#   device run: ..., command "bash benchmarks/gpu_session.sh attack-compile torchrun"     # a rerun of named steps
#
# Steps, in order (`1` = the first five, `2` = the rest, `all` = both):
#   eval            clean zero-shot eval, ViT-B-32 bf16, batch searched upward, profiled; CLIP_benchmark beside it
#   attack          PGD-10 8/255 fp32 (TF32 matmuls), every image attacked, batch searched upward, profiled
#   finetune        LoRA-TeCoA with a 10-step inner PGD: peft's LoRA on the attention, then on the MLPs (finetune-mlp)
#   eval-compile    eval with --compile
#   prepared        10,000 JPEGs -> `clipguard prepare` at 224 -> clean eval streamed from that cache
#   tests           the gpu-marked tests (nvJPEG against PIL)
#   autoattack      clipguard's PGD-10, APGD-100, AutoAttack standard and FARE's subset; pyautoattack called directly
#   decode          the 10,000 JPEGs end to end (eval + PGD-10): --decode pil against --decode device
#   torchrun        one process against torchrun on every GPU there (one GPU: the launcher's cost alone)
#   attack-compile  attack with --compile; attack-cudagraphs: with --compile-mode reduce-overhead
#   finetune-compile  LoRA on the MLPs and VPT, compiled
#
# What comes back (the tool returns at most 8 files): $OUT/gpu-<steps>-<gpu>.log and $OUT/records-<steps>-<gpu>.tgz,
# every record and steps.tsv (step, exit status, seconds), written again after each step. Unpack into benchmarks/results/ here and update README's
# Speed table from the records. Nothing in this script is a measurement: the records are.
#
# GPU_SESSION_SMOKE=1 runs the same steps on this machine's CPU with the toy model and tiny sizes, to catch a broken
# command line before device time is spent on it (its records measure nothing).
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: gpu_session.sh 1|2|all|STEP..." >&2; exit 2; }
part1="eval attack finetune eval-compile prepared"
part2="tests autoattack decode torchrun attack-compile attack-cudagraphs finetune-compile"
case $1 in
1) steps=$part1 ;;
2) steps=$part2 ;;
all) steps="$part1 $part2" ;;
*) steps="$*" ;;
esac
known=" $part1 $part2 "
for s in $steps; do
    [[ $known == *" $s "* ]] || { echo "unknown step $s: use 1, 2, all or some of:$known" >&2; exit 2; }
done
tag=$(echo "$*" | tr ' ' '+')
OUT=${OUT:-/tmp/clipguard-gpu-out}
mkdir -p "$OUT"
root=$PWD
smoke=${GPU_SESSION_SMOKE:-0}
budget=${GPU_SESSION_BUDGET:-300}
deadline=$(( $(date +%s) + budget ))
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export CLIPGUARD_CACHE=${CLIPGUARD_CACHE:-/tmp/clipguard-cache}
if [ "$smoke" = 1 ]; then
    PY=${PY:-$root/.venv/bin/python}
    model=toy; gpu=smoke-cpu
else
    PY=python3
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .devcarry/wheels/*.whl || { echo "wheels did not install: run make gpu-carry here first" >&2; exit 1; }
    export PYTHONPATH=/tmp/site
    model=ViT-B-32:none
    gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")  # h100, h200
fi
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
rec=$(mktemp -d /tmp/clipguard-records-XXXX)
log="$OUT/gpu-$tag-$gpu.log"
exec > >(tee -a "$log") 2>&1
echo "# gpu_session.sh $* on $(hostname) at $(date -u +%FT%TZ), budget ${budget}s, smoke=$smoke"
[ "$smoke" = 1 ] || nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision',
torchvision.__version__)"
printf "step\texit\tseconds\n" >"$rec/steps.tsv"

# step NAME CAP_SECONDS COMMAND...: run under the smaller of CAP and the time left (skipped under 20 s left).
step() {
    local name=$1 cap=$2; shift 2
    local left=$(( deadline - $(date +%s) ))
    if [ "$left" -lt 20 ]; then
        echo "## $name: skipped, ${left}s left of the budget"; printf "%s\tskipped\t0\n" "$name" >>"$rec/steps.tsv"
        return
    fi
    local t=$(( cap < left ? cap : left )) t0 rc
    echo "## $name (at most ${t}s): $*"
    t0=$(date +%s)
    (cd "$root/benchmarks" && timeout -k 10 -s INT "$t" "$@")
    rc=$?
    echo "## $name: exit $rc after $(( $(date +%s) - t0 ))s"
    printf "%s\t%s\t%s\n" "$name" "$rc" "$(( $(date +%s) - t0 ))" >>"$rec/steps.tsv"
    tar czf "$OUT/records-$tag-$gpu.tgz" -C "$rec" .  # after every step: a call cut short keeps what was done
}

# Sizes: a GPU run is long enough to time; the smoke run only has to pass every option through.
if [ "$smoke" = 1 ]; then
    eval_n="--n 200 --repeat 2"; attack_n=64; ft="--batch-size 16 --steps 2"; jpegs=200; aa_n=40; dist_n=64
else
    eval_n="--n 1000 --repeat 40"; attack_n=4096; ft="--batch-size 256 --steps 20"; jpegs=10000; aa_n=1000
    dist_n=2048
fi
jpeg_root=/tmp/clipguard-perf-decode$([ "$smoke" = 1 ] && echo -smoke)  # prepared and decode share the JPEGs

for s in $steps; do
    case $s in
    eval)  # clean zero-shot eval, bf16, batch searched upward; beside CLIP_benchmark's loop (8 PIL workers)
        step eval 100 $PY perf_eval.py --model $model $eval_n --batch-size auto --workers 8 --profile \
            --out "$rec/perf_eval-vit-b-32-random-$gpu.json" ;;
    attack)  # PGD-10 8/255 fp32 (TF32 matmuls), every image attacked, batch searched upward
        step attack 110 $PY perf_attack.py --cases $([ "$smoke" = 1 ] && echo toy || echo vit-b-32-random) \
            --attack-all --n $attack_n --batch-size auto --profile --out "$rec/perf_attack-$gpu.json" ;;
    finetune)  # LoRA-TeCoA with a 10-step inner PGD: LoRA on the attention (peft) and on the MLPs
        step finetune 90 $PY perf_finetune.py --model $model --methods lora --attack-steps 10 $ft --profile \
            --out "$rec/perf_finetune-vit-b-32-random-$gpu.json"
        step finetune-mlp 60 $PY perf_finetune.py --model $model --methods lora --lora-targets c_fc,c_proj \
            --attack-steps 10 $ft --profile --out "$rec/perf_finetune-vit-b-32-random-mlp-lora-$gpu.json" ;;
    eval-compile)
        step eval-compile 150 $PY perf_eval.py --model $model $eval_n --batch-size auto --workers 8 --compile \
            --profile --out "$rec/perf_eval-vit-b-32-random-compile-$gpu.json" ;;
    prepared)  # JPEGs -> `clipguard prepare` at the model's geometry -> clean eval read from that cache
        step prepared 150 bash -c "$PY -c 'from pathlib import Path; from perf_data import generate; \
generate(Path(\"$jpeg_root/generated\"), $jpegs, 1000, 16)' && $PY -m clipguard.cli.app prepare --model $model \
--dataset imagefolder:$jpeg_root/generated --split train --json >/dev/null && $PY perf_eval.py --model $model \
--dataset imagefolder:$jpeg_root/generated --split train --n 0 --data-mode stream --batch-size auto --workers 8 --profile \
--out $rec/perf_eval-prepared-vit-b-32-random-$gpu.json" ;;
    autoattack)  # clipguard's PGD-10, APGD-100, AutoAttack standard and FARE's subset; pyautoattack directly
        step autoattack 150 $PY perf_autoattack.py --model $model --n $aa_n --batch-size 500 \
            --out "$rec/autoattack-vit-b-32-random-$gpu.json" ;;
    decode)  # 10,000 JPEGs end to end (eval + PGD-10): --decode pil vs --decode device
        step decode 150 $PY perf_decode.py --model $model --n $jpegs --repeats 1 --root $jpeg_root \
            --out "$rec/perf_decode-$gpu.json" ;;
    attack-compile)
        step attack-compile 130 $PY perf_attack.py --cases $([ "$smoke" = 1 ] && echo toy || echo vit-b-32-random) \
            --attack-all --n $attack_n --batch-size auto --compile --profile \
            --out "$rec/perf_attack-compile-$gpu.json" ;;
    attack-cudagraphs)
        step attack-cudagraphs 130 $PY perf_attack.py --cases $([ "$smoke" = 1 ] && echo toy || echo vit-b-32-random) \
            --attack-all --n $attack_n --batch-size auto --compile --compile-mode reduce-overhead \
            --out "$rec/perf_attack-cudagraphs-$gpu.json" ;;
    torchrun)  # one process against torchrun on every GPU there (1 GPU: the launcher's overhead alone)
        step torchrun 90 $PY perf_distributed.py --model $model --limit $dist_n --batch-size 256 --repeats 1 \
            --nproc "$([ "$smoke" = 1 ] && echo 2 || nvidia-smi -L | wc -l)" \
            --out "$rec/perf_distributed-vit-b-32-random-$gpu.json" ;;
    tests)
        step tests 60 $PY -m pytest -q -m gpu -p no:cacheprovider ../tests/test_device_decode.py ;;
    finetune-compile)
        step finetune-compile 120 $PY perf_finetune.py --model $model --methods lora,vpt --lora-targets c_fc,c_proj \
            --attack-steps 10 $ft --compile --out "$rec/perf_finetune-vit-b-32-random-compile-$gpu.json" ;;
    esac
done
cat "$rec/steps.tsv"
tar czf "$OUT/records-$tag-$gpu.tgz" -C "$rec" .
echo "# records: $OUT/records-$tag-$gpu.tgz ($(ls "$rec" | wc -l) files)"
