#!/usr/bin/env bash
# One workstation: preflight, a local Ray head, then `dist-engine serve` (flags after -- go to serve).
set -euo pipefail
exec dist-engine launch "$@"
