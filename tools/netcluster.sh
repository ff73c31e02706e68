#!/usr/bin/env bash
# Thin wrapper: run tools/netcluster.py with the project's virtualenv if there is one.
# Usage: sudo tools/netcluster.sh --nodes 2 --rate 1gbit --torchrun train.py --steps 10
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
exec "$py" "$here/netcluster.py" "$@"
