#!/usr/bin/env bash
# One-time set-up of a Debian/Ubuntu KVM host for kvmbpf (and its tests): system packages,
# kernel headers for bcc, tracefs, and a Python venv that sees the distro's bcc.
# Idempotent; run as root.
set -euo pipefail
cd "$(dirname "$0")"
[ "$(id -u)" = 0 ] || { echo "setup.sh: run as root" >&2; exit 2; }
export DEBIAN_FRONTEND=noninteractive

pkgs=(python3 python3-venv python3-pip python3-bpfcc bpfcc-tools bpftool iproute2 kmod
      qemu-system-x86 nasm dnsmasq-base fio bpftrace tmux nftables busybox-static util-linux
      prometheus python3-fusepy)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
release=$(uname -r)
if [ ! -e "/lib/modules/$release/build" ]; then
  apt-get update -q
  # The exact headers when the distribution has them; else its default headers, linked below.
  if apt-cache show "linux-headers-$release" >/dev/null 2>&1; then missing+=("linux-headers-$release")
  else missing+=(linux-headers-amd64); fi
fi
if [ ${#missing[@]} -gt 0 ]; then
  [ -e "/lib/modules/$release/build" ] && apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# No exact headers: link the distro's default ones (build and source are both needed).
# kvmbpf detects the mismatch and then reads tracepoint fields only, never kernel structs.
if [ ! -e "/lib/modules/$release/build" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  [ -n "$hdr" ] || { echo "setup.sh: no kernel headers found under /usr/src" >&2; exit 1; }
  mkdir -p "/lib/modules/$release"
  ln -sfn "$hdr" "/lib/modules/$release/build"
  [ -n "$common" ] && ln -sfn "$common" "/lib/modules/$release/source"
  echo "setup.sh: linked $hdr as headers for $release (they do not match this kernel)"
fi

mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing || true
mountpoint -q /sys/kernel/debug || mount -t debugfs nodev /sys/kernel/debug || true

# A venv on the distro's python3 with system site-packages, so `import bcc` works.
[ -x .venv/bin/python ] || /usr/bin/python3 -m venv --system-site-packages .venv
.venv/bin/python -c 'import bcc' 2>/dev/null || { echo "setup.sh: the venv cannot import bcc" >&2; exit 1; }
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
echo "setup.sh: ready (.venv/bin/kvmbpf)"
