#!/usr/bin/env bash
# Train on several processes (and nodes) with torchrun: docs/DESIGN.md section 5.
#
#   scripts/run_ddp.sh [--nproc N] [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT]
#                      [--name RUN] [hydra overrides ...]
#
#   --nproc N            processes on this node (default: all visible GPUs, else 2 CPU processes)
#   --nnodes M           number of nodes (default 1); with M > 1 run the same command on every
#   --node-rank R        node with its own R (0..M-1) and node 0's HOST:PORT as --rdzv-endpoint
#   --rdzv-endpoint H:P  (a free TCP port on node 0; static rendezvous, so node 0 is rank 0)
#   --name RUN           the run's name: outputs/RUN; relaunching the same name resumes from
#                        outputs/RUN/checkpoints/last.ckpt (resume=auto)
#
# Defaults added before your overrides (yours win): trainer=ddp buffer=redis, and
# trainer.accelerator / devices / num_nodes matching the launch. With buffer=redis a local
# redis-server is started if none answers (`contraq redis start`); it outlives this script.
# Everything the launch prints also goes to <output_dir>/launch.log.
#
# Examples:
#   scripts/run_ddp.sh --name smoke_ddp experiment=smoke_ddp
#   scripts/run_ddp.sh --nproc 4 --name cf train.sampling=rank0 experiment=counterfact
#   # two nodes, 8 GPUs each (on node 1: --node-rank 1)
#   scripts/run_ddp.sh --nnodes 2 --node-rank 0 --rdzv-endpoint 10.0.0.1:29400 --name big ...
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() {
	echo "run_ddp.sh: $*" >&2
	exit 2
}

nproc="" nnodes=1 node_rank=0 endpoint="" name=""
while (($#)); do
	case "$1" in
	--nproc) nproc=${2:?--nproc needs a value} && shift 2 ;;
	--nproc=*) nproc=${1#*=} && shift ;;
	--nnodes) nnodes=${2:?--nnodes needs a value} && shift 2 ;;
	--nnodes=*) nnodes=${1#*=} && shift ;;
	--node-rank) node_rank=${2:?--node-rank needs a value} && shift 2 ;;
	--node-rank=*) node_rank=${1#*=} && shift ;;
	--rdzv-endpoint) endpoint=${2:?--rdzv-endpoint needs a value} && shift 2 ;;
	--rdzv-endpoint=*) endpoint=${1#*=} && shift ;;
	--name) name=${2:?--name needs a value} && shift 2 ;;
	--name=*) name=${1#*=} && shift ;;
	-h | --help) usage && exit 0 ;;
	--) shift && break ;;
	--*) die "unknown option $1 (see --help)" ;;
	*) break ;;
	esac
done
user_overrides=("$@")

for v in "$nnodes" "$node_rank" ${nproc:+"$nproc"}; do
	[[ $v =~ ^[0-9]+$ ]] || die "expected a whole number, got '$v'"
done
((nnodes >= 1)) || die "--nnodes must be >= 1"
((node_rank < nnodes)) || die "--node-rank $node_rank must be below --nnodes $nnodes"
if ((nnodes > 1)) && [[ -z $endpoint ]]; then
	die "--nnodes $nnodes needs --rdzv-endpoint HOST:PORT (node 0's address and a free port)"
fi

# The interpreter of the active environment (a venv's bin/ comes first on PATH).
PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null || die "no '$PYTHON' on PATH: activate the project's venv"
"$PYTHON" -c "import contraq" 2>/dev/null || die "'$PYTHON' cannot import contraq: activate the venv"

has_override() { # has_override KEY: the user set KEY=... (or +KEY=... / ++KEY=...)
	local o
	for o in "${user_overrides[@]}"; do
		o=${o#++} && o=${o#+}
		[[ $o == "$1="* ]] && return 0
	done
	return 1
}

# GPUs visible to torch (CUDA_VISIBLE_DEVICES respected) and CPU cores available to us.
read -r n_gpus n_cores < <("$PYTHON" -c 'import os, torch
print(torch.cuda.device_count(), len(os.sched_getaffinity(0)))')
if [[ -z $nproc ]]; then
	if ((n_gpus > 0)); then nproc=$n_gpus; else nproc=2; fi
fi
((nproc >= 1)) || die "--nproc must be >= 1"
if ((n_gpus > 0)); then accelerator=gpu; else accelerator=cpu; fi

overrides=()
has_override trainer || overrides+=(trainer=ddp)
has_override buffer || overrides+=(buffer=redis)
[[ -n $name ]] && overrides+=("name=$name")
has_override trainer.accelerator || overrides+=("trainer.accelerator=$accelerator")
has_override trainer.devices || overrides+=("trainer.devices=$nproc")
has_override trainer.num_nodes || overrides+=("trainer.num_nodes=$nnodes")
overrides+=("${user_overrides[@]}")

# Resolve the composed config once: where the run lives and which Redis it uses.
IFS=$'\t' read -r output_dir backend host port data_dir < <(
	"$PYTHON" - "${overrides[@]}" <<'PY'
import sys
from contraq.cli import config_dir
from contraq.config.schema import compose_run
cfg = compose_run(config_dir(), sys.argv[1:])
b = cfg.buffer
redis = b.backend == "redis"
fields = [cfg.output_dir, b.backend] + ([b.host, b.port, b.data_dir] if redis else ["-"] * 3)
print("\t".join(str(f) for f in fields))
PY
)
mkdir -p "$output_dir"
launch_log="$output_dir/launch.log"

# The contradiction reward's offline judge is trained here, once per node, never by the ranks
# (reward loading does not train): a no-op when it is cached or nli.path is set.
"$PYTHON" - "${overrides[@]}" <<'PY' 2>&1 | tee -a "$launch_log"
import sys
from contraq.cli import config_dir
from contraq.config.schema import compose_run
cfg = compose_run(config_dir(), sys.argv[1:])
if cfg.reward.name == "contradiction":
    from contraq.judge.training import ensure_judge

    print(f"== NLI judge: {ensure_judge(cfg.nli)}")
PY

if [[ $backend == redis ]]; then
	if "$PYTHON" -m contraq.cli redis status --port "$port" --dir "$data_dir" >/dev/null 2>&1; then
		echo "== using the Redis on $host:$port" | tee -a "$launch_log"
	elif [[ $host == 127.0.0.1 || $host == localhost || $host == ::1 ]]; then
		"$PYTHON" -m contraq.cli redis start --port "$port" --dir "$data_dir" 2>&1 | tee -a "$launch_log"
	else
		die "no Redis answers on $host:$port; start it there (contraq redis start --port $port)"
	fi
fi

export TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((n_cores / nproc > 0 ? n_cores / nproc : 1))}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

if ((nnodes == 1)) && [[ -z $endpoint ]]; then
	rdzv=(--standalone)
else
	rdzv=(--nnodes "$nnodes" --node-rank "$node_rank" --rdzv-backend static --rdzv-endpoint "$endpoint")
fi
cmd=("$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node "$nproc"
	-m contraq.cli train "${overrides[@]}")

{
	echo "== $(date '+%F %T') node $node_rank/$nnodes, $nproc process(es), OMP_NUM_THREADS=$OMP_NUM_THREADS"
	if [[ -f $output_dir/checkpoints/last.ckpt ]] && ! has_override resume; then
		echo "== resuming from $output_dir/checkpoints/last.ckpt"
	fi
	echo "== $(printf '%q ' "${cmd[@]}")"
} | tee -a "$launch_log"
"${cmd[@]}" 2>&1 | tee -a "$launch_log"
