# Device-only: CUDA check of the gpu-gpt2-large preset (random full-size weights).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.dev/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
DEV=${DEV:-cuda}; EXTRA=${EXTRA:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee $OUT/gpu.txt
python3 -c "import torch,transformers,peft,lightning;print(torch.__version__,transformers.__version__,peft.__version__,lightning.__version__,torch.cuda.is_available())" 2>&1 | tee -a $OUT/gpu.txt
W=/tmp/weights
timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_sampler.py -k draw_tokens 2>&1 | tail -n 3
timeout 140 python3 .dev/gpu_check.py --device $DEV --weights-dir $W $EXTRA --json $OUT/small.json > $OUT/small.log 2>&1; echo "small rc=$?"; tail -n 14 $OUT/small.log
timeout ${PT:-160} python3 .dev/gpu_check.py --device $DEV --weights-dir $W $EXTRA --facts 4 --samples 16 --max-len 20 --answer-tokens 30 --skip-bf16 --json $OUT/preset.json > $OUT/preset.log 2>&1; echo "preset rc=$?"; tail -n 12 $OUT/preset.log
LM=$(ls -d $W/lm-*); NLI=$(ls -d $W/nli-*)
TR="experiment=gpu-gpt2-large model.name_or_path=$LM nli.path=$NLI name=gpucheck train.max_steps=4 eval.every_n_steps=2 eval.n_facts=2 +eval.diversity=false ${TRAIN_EXTRA:-}"
timeout 110 python3 -m contraq.cli train $TR > $OUT/train.log 2>&1; echo "train rc=$?"; tail -n 15 $OUT/train.log
timeout 50 python3 -m contraq.cli train $TR train.max_steps=5 > $OUT/resume.log 2>&1; echo "resume rc=$?"; tail -n 6 $OUT/resume.log
ls outputs/gpucheck; cp outputs/gpucheck/train_summary.json $OUT/ 2>/dev/null; cat outputs/gpucheck/logs/*/metrics.csv 2>/dev/null | head -3 | cut -c1-300
