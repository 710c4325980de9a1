#!/usr/bin/env bash
# The README's main command: set up .venv and run the poison-then-defend study on the built-in data.
set -euo pipefail
. "$(dirname "$0")/venv.sh" core
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec python -m cleanclip_jax.demo "$@"
