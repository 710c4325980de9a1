#!/usr/bin/env bash
# The README's test command: set up .venv (with the test extras) and run the whole suite on CPU,
# emulating 8 devices so the sharded code paths run.
set -euo pipefail
. "$(dirname "$0")/venv.sh" test
cd "$ROOT"  # the suite's paths (tests/, pyproject.toml's pytest settings) are the repo's
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
export JAX_PLATFORMS=cpu
exec python -m pytest -q "$@"
