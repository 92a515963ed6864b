#!/usr/bin/env bash
# Start/stop a local Ray head and the local S3 server (moto on 127.0.0.1:9010).
#   cluster/local.sh up      # then: eval "$(cluster/local.sh env)"
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.score ...
#   cluster/local.sh down
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
case "${1:-}" in
  up)     exec "$PY" -m twostream.cli cluster up ;;
  down)   exec "$PY" -m twostream.cli cluster down ;;
  status) exec "$PY" -m twostream.cli cluster status ;;
  env)    "$PY" -c 'from twostream.storage.local_s3 import env_for, DEFAULT_PORT; [print(f"export {k}={v}") for k, v in env_for(f"http://127.0.0.1:{DEFAULT_PORT}").items()]' ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
