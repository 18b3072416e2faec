#!/usr/bin/env bash
# Add this machine to a running Ray cluster: join.sh --address HEAD:6379 [--num-gpus N] [--block]
set -euo pipefail
exec dist-engine join "$@"
