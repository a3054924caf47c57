#!/usr/bin/env bash
# CMUdict G2P end to end: data, training (resumes if interrupted), test-set report.
#   bash recipes/g2p/run.sh                       (extra arguments go to `encdec train`)
#   bash recipes/g2p/run.sh --set train.threads=1
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/tcmalloc.sh      # steadier memory and steps in long trainings
python recipes/g2p/prepare.py --out data/g2p
encdec train recipes/g2p/config.yaml --run runs/g2p "$@"
# SECONDS: wall time of this invocation so far (data preparation, training, validations)
python recipes/g2p/report.py --run runs/g2p --data data/g2p \
  --wall-seconds "$SECONDS" --extra "$*"
