set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.dev/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
W=/tmp/weights
timeout 170 python3 .dev/gpu_check.py --device cuda --weights-dir $W --facts 4 --samples 16 --max-len 20 --answer-tokens 30 --skip-bf16 --json $OUT/preset_ckpt.json > $OUT/preset_ckpt.log 2>&1; echo "preset rc=$?"; tail -n 9 $OUT/preset_ckpt.log
LM=$(ls -d $W/lm-*); NLI=$(ls -d $W/nli-*)
timeout 90 python3 -m contraq.cli train experiment=gpu-gpt2-large model.name_or_path=$LM nli.path=$NLI name=gpuckpt train.max_steps=3 eval.every_n_steps=3 eval.n_facts=2 +eval.diversity=false > $OUT/train_ckpt.log 2>&1; echo "train rc=$?"; grep -E "fresh samples|stopped|Error" $OUT/train_ckpt.log | tail -n 4; cp outputs/gpuckpt/train_summary.json $OUT/train_ckpt_summary.json
