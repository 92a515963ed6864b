#!/bin/sh
# Ray Serve's HAProxy executable (RAY_SERVE_HAPROXY_BINARY_PATH, set by jobs.ray_cluster.serve_cluster_env):
# hardens the configuration file Ray wrote, then runs the real HAProxy with Ray's arguments.
# See twostream/online/ingress.py and docs/serve.md.
exec "${TWOSTREAM_HAPROXY_PYTHON:-python3}" -I "$(dirname "$0")/../twostream/online/ingress.py" "$@"
