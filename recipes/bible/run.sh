#!/usr/bin/env bash
# Bible style transfer for one pair of editions: data, training (resumes if interrupted), report.
#   bash recipes/bible/run.sh ylt bbe        (editions: python recipes/bible/prepare.py --list)
#   bash recipes/bible/run.sh ylt bbe --set train.threads=1    (extra arguments go to `encdec train`)
#   bash recipes/bible/run.sh ylt+kjv+asv+web bbe   (KJV, ASV, WEB verses as extra training sources of BBE)
#   bash recipes/bible/run.sh bbe+ylt+kjv+web asv --tag-sources   (each source line starts with <edition>)
#   bash recipes/bible/run.sh bbe+ylt+kjv+web asv --ensemble 2   (2 models, seeds 1 and 2, trained side by side
#                                    on one core each with the same tokenizers, decoded as an ensemble)
set -euo pipefail
cd "$(dirname "$0")/../.."
src=${1:?source edition, e.g. ylt}; tgt=${2:?target edition, e.g. bbe}; shift 2
name=$src-$tgt; tag=(); flags=(); ensemble=1
while [[ ${1:-} == --tag-sources || ${1:-} == --ensemble ]]; do
  if [[ $1 == --tag-sources ]]; then name=$name-tagged; tag=(--tag-sources); flags+=(--tag-sources); shift
  else ensemble=${2:?--ensemble needs a number of models}; flags+=(--ensemble "$ensemble"); shift 2; fi
done
[[ $ensemble =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --ensemble takes a number of models >= 1, got $ensemble" >&2; exit 2; }
source recipes/tcmalloc.sh      # steadier memory and steps in long trainings
data=data/bible/$name
python recipes/bible/prepare.py --src "$src" --tgt "$tgt" --out "$data" "${tag[@]}"
train() {  # train RUN_FOLDER [encdec train arguments]
  local run=$1; shift
  encdec train recipes/bible/config.yaml --run "$run" \
    --set "data.train=[$data/train.src, $data/train.tgt]" --set "data.dev=[$data/dev.src, $data/dev.tgt]" "$@"
}
if (( ensemble == 1 )); then
  runs=("runs/bible-$name")
  train "${runs[0]}" "$@"
else
  # One process per model, the cores shared out; the models must share tokenizers, so the first
  # run trains them and the others start from copies.
  name=$name-ensemble$ensemble; runs=(); pids=(); mkdir -p "runs/bible-$name"
  threads=$(( $(nproc) / ensemble )); (( threads >= 1 )) || threads=1
  for k in $(seq 1 "$ensemble"); do
    run=runs/bible-$name/seed$k; runs+=("$run")
    if (( k > 1 )); then
      until [[ -e ${runs[0]}/tgt.tokenizer ]]; do
        kill -0 "${pids[0]}" 2>/dev/null || { wait "${pids[0]}"; exit 1; }  # the first run failed: say so, stop
        sleep 1
      done
      mkdir -p "$run"; cp -n "${runs[0]}/src.tokenizer" "${runs[0]}/tgt.tokenizer" "$run/"
    fi
    train "$run" --set "train.threads=$threads" --set "train.seed=$k" "$@" > "$run.log" 2>&1 &
    pids+=($!)
    echo "training $run (seed $k, $threads thread(s)); log: $run.log"
  done
  failed=0; for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  (( failed == 0 )) || { echo "run.sh: a training failed; its log says why" >&2; exit 1; }
fi
# SECONDS: wall time of this invocation so far (data preparation, training, validations)
python recipes/bible/report.py --src "$src" --tgt "$tgt" --data "$data" --run "${runs[@]}" --name "$name" \
  --wall-seconds "$SECONDS" --run-flags "${flags[*]:+ ${flags[*]}}" --extra "$*"
