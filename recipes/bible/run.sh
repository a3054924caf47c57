#!/usr/bin/env bash
# Bible style transfer for one pair of editions: data, training (resumes if interrupted), report.
#   bash recipes/bible/run.sh ylt bbe        (editions: python recipes/bible/prepare.py --list)
#   bash recipes/bible/run.sh ylt bbe --set train.threads=1    (extra arguments go to `encdec train`)
#   bash recipes/bible/run.sh ylt+kjv+asv+web bbe   (KJV, ASV, WEB verses as extra training sources of BBE)
set -euo pipefail
cd "$(dirname "$0")/../.."
src=${1:?source edition, e.g. ylt}; tgt=${2:?target edition, e.g. bbe}
source recipes/tcmalloc.sh      # steadier memory and steps in long trainings
data=data/bible/$src-$tgt
python recipes/bible/prepare.py --src "$src" --tgt "$tgt" --out "$data"
encdec train recipes/bible/config.yaml --run "runs/bible-$src-$tgt" \
  --set "data.train=[$data/train.src, $data/train.tgt]" --set "data.dev=[$data/dev.src, $data/dev.tgt]" "${@:3}"
# SECONDS: wall time of this invocation so far (data preparation, training, validations)
python recipes/bible/report.py --src "$src" --tgt "$tgt" --data "$data" --run "runs/bible-$src-$tgt" \
  --wall-seconds "$SECONDS" --extra "${*:3}"
