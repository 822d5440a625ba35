#!/usr/bin/env bash
# The main job: `kvmbpf exits` for a few seconds, against the host's VMs, or against the
# built-in lab VM when the host runs none (the lab is then stopped again).
set -euo pipefail
cd "$(dirname "$0")/.."
kvmbpf=.venv/bin/kvmbpf
if [ "$($kvmbpf vms --json)" = "[]" ]; then
  $kvmbpf lab up --id demo

  trap '$kvmbpf lab down --id demo' EXIT
fi
$kvmbpf vms
$kvmbpf exits 2 3 "$@"
