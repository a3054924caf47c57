#!/usr/bin/env bash
# CMUdict G2P end to end: data, training (resumes if interrupted), test-set report.
set -euo pipefail
cd "$(dirname "$0")/../.."
python recipes/g2p/prepare.py --out data/g2p
encdec train recipes/g2p/config.yaml --run runs/g2p
python recipes/g2p/report.py --model runs/g2p/best --run runs/g2p --data data/g2p
