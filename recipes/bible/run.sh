#!/usr/bin/env bash
# Bible style transfer for one pair of editions: data, training (resumes if interrupted), report.
#   bash recipes/bible/run.sh ylt bbe        (editions: python recipes/bible/prepare.py --list)
#   bash recipes/bible/run.sh ylt bbe --set train.threads=1    (extra arguments go to `encdec train`)
#   bash recipes/bible/run.sh ylt+kjv+asv+web bbe   (KJV, ASV, WEB verses as extra training sources of BBE)
#   bash recipes/bible/run.sh bbe+ylt+kjv+web asv --tag-sources   (each source line starts with <edition>)
set -euo pipefail
cd "$(dirname "$0")/../.."
src=${1:?source edition, e.g. ylt}; tgt=${2:?target edition, e.g. bbe}; shift 2
name=$src-$tgt; tag=()
if [[ ${1:-} == --tag-sources ]]; then name=$name-tagged; tag=(--tag-sources); shift; fi
source recipes/tcmalloc.sh      # steadier memory and steps in long trainings
data=data/bible/$name
python recipes/bible/prepare.py --src "$src" --tgt "$tgt" --out "$data" "${tag[@]}"
encdec train recipes/bible/config.yaml --run "runs/bible-$name" \
  --set "data.train=[$data/train.src, $data/train.tgt]" --set "data.dev=[$data/dev.src, $data/dev.tgt]" "$@"
# SECONDS: wall time of this invocation so far (data preparation, training, validations)
python recipes/bible/report.py --src "$src" --tgt "$tgt" --data "$data" --run "runs/bible-$name" --name "$name" \
  --wall-seconds "$SECONDS" --run-flags "${tag[*]:+ ${tag[*]}}" --extra "$*"
