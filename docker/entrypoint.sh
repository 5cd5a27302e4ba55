#!/bin/sh
# Container entry point: refuse to start without the secrets production needs, then exec the
# command (tini is PID 1 and forwards signals, so `docker stop` lets jobs shut down cleanly).
set -eu

if [ "${CXR_ENVIRONMENT:-production}" = "production" ] && [ -z "${CXR_SECRET_KEY:-}" ]; then
    echo "CXR_SECRET_KEY is not set: production refuses to start without it." >&2
    echo "Generate one with: python -c 'import secrets; print(secrets.token_urlsafe(48))'" >&2
    exit 64
fi

mkdir -p "${CXR_DATA_DIR:-/data}" 2>/dev/null || true
if [ ! -w "${CXR_DATA_DIR:-/data}" ]; then
    echo "CXR_DATA_DIR=${CXR_DATA_DIR:-/data} is not writable by uid $(id -u):" >&2
    echo "chown the volume to 10001:10001 or mount it with the right owner." >&2
    exit 73
fi

exec "$@"
