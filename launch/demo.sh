#!/usr/bin/env bash
# The main job: set up (first run only), then compare AdamW, Lookahead(AdamW) and the distributed
# modes on a small transformer language model trained on Python's own documentation text.
# Extra arguments go to `lookahead-dist compare` (see `--help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/setup.sh"
exec "$ROOT/.venv/bin/lookahead-dist" compare "$@"
