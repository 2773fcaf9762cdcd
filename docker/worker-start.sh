#!/bin/sh
# The worker container: make sure the pool and the deployments exist, then take flow runs.
set -eu
prefect work-pool create llmops --type process --overwrite
prefect --no-prompt deploy --all
exec prefect worker start --pool llmops
