#!/bin/bash
# Prepare the nested KVM lab: a Debian kernel booted under QEMU TCG with an
# emulated AMD CPU, whose KVM-AMD gives a /dev/kvm with real kvm_exit events.
#
# Idempotent; run as root on Debian 12.  Everything lands in $KVMBPF_NESTED_CACHE
# (default /var/cache/kvmbpf-nested):
#   linux-image-<kver>_*.deb   the Debian kernel package (apt-get download)
#   vmlinuz                    its kernel
#   initramfs.cpio.gz          busybox + the needed modules + guest-init.sh
#   lab.env                    written last: KVER=..., consumed by nestedlab.py
#
# Environment knobs:
#   KVMBPF_NESTED_CACHE        cache dir (default /var/cache/kvmbpf-nested)
#   KVMBPF_NESTED_KVER         guest kernel release (default: the one
#                              linux-headers-amd64 depends on)
#   KVMBPF_NESTED_MODULES      extra module names to load at boot
#   KVMBPF_NESTED_SKIP_APT=1   do not run apt-get install
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${KVMBPF_NESTED_CACHE:-/var/cache/kvmbpf-nested}

# Modules loaded by /init, in this order (dependencies are resolved by
# busybox modprobe from a modules.dep generated below).
#   virtio_pci, 9pnet_virtio, 9p : to mount the host shares (modules in Debian)
#   irqbypass, kvm, ccp, kvm-amd : nested /dev/kvm (kvm-amd needs ccp for SEV)
#   tun, bridge, stp, llc, veth  : for network tests
#   loop, fuse                   : block devices (one of steady latency) for the blk comparison
MODULES="virtio_pci 9pnet_virtio 9p irqbypass kvm ccp kvm-amd tun llc stp bridge veth loop fuse ${KVMBPF_NESTED_MODULES:-}"

log() { echo "setup.sh: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "must run as root"; exit 1
fi

if [ "${KVMBPF_NESTED_SKIP_APT:-0}" != 1 ]; then
    need=()
    for p in busybox-static qemu-system-x86 kmod cpio gzip linux-headers-amd64 python3-bpfcc; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
    done
    if [ ${#need[@]} -gt 0 ]; then
        log "installing: ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    fi
fi

# The guest kernel must match the headers the host has in /usr/src, since the
# guest uses the host's /usr (and so its headers) for bcc.
if [ -n "${KVMBPF_NESTED_KVER:-}" ]; then
    KVER=$KVMBPF_NESTED_KVER
else
    # e.g. "linux-headers-6.1.0-56-amd64 (= 6.1.192-2)" -> 6.1.0-56-amd64
    KVER=$(dpkg-query -W -f='${Depends}' linux-headers-amd64 | sed -n 's/^linux-headers-\([^ ,]*\).*/\1/p')
fi
[ -n "$KVER" ] || { log "cannot derive the kernel release from linux-headers-amd64"; exit 1; }
[ -d "/usr/src/linux-headers-$KVER" ] || log "warning: /usr/src/linux-headers-$KVER missing; bcc will not work in the guest"
log "guest kernel $KVER, cache $CACHE"

mkdir -p "$CACHE"
cd "$CACHE"
rm -f lab.env   # marks the lab incomplete until the end of this script

DEB=$(ls linux-image-"$KVER"_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$DEB" ]; then
    log "downloading linux-image-$KVER"
    # apt's _apt user may not be able to write the cache dir; download as root
    # into a scratch dir it can write, then move.
    tmpd=$(mktemp -d)
    chmod 777 "$tmpd"
    (cd "$tmpd" && apt-get download "linux-image-$KVER" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
    mv "$tmpd"/linux-image-"$KVER"_*.deb . 
    rmdir "$tmpd"
    DEB=$(ls linux-image-"$KVER"_*.deb | head -n1)
fi

if [ ! -f "kernel-$KVER/.extracted" ]; then
    log "extracting $DEB"
    rm -rf "kernel-$KVER"
    dpkg-deb -x "$DEB" "kernel-$KVER"
    touch "kernel-$KVER/.extracted"
fi
MODSRC=kernel-$KVER/lib/modules/$KVER
cp -f "kernel-$KVER/boot/vmlinuz-$KVER" vmlinuz.new && mv -f vmlinuz.new vmlinuz

# ---- initramfs ---------------------------------------------------------
STAGE=$(mktemp -d "$CACHE/stage.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE"/{bin,dev,proc,sys,etc,lib/modules/"$KVER"}
cp /bin/busybox "$STAGE/bin/busybox"
for a in $("$STAGE/bin/busybox" --list); do
    [ "$a" = busybox ] || ln -sf busybox "$STAGE/bin/$a"
done
install -m 0755 "$HERE/guest-init.sh" "$STAGE/init"

# Resolve module dependencies with a full modules.dep, copy the closure.
depmod -b "$PWD/kernel-$KVER" "$KVER"
declare -A seen=()
add_mod() {  # $1: path relative to $MODSRC
    local rel=$1 line dep
    [ -n "${seen[$rel]:-}" ] && return 0
    seen[$rel]=1
    mkdir -p "$STAGE/lib/modules/$KVER/$(dirname "$rel")"
    cp "$MODSRC/$rel" "$STAGE/lib/modules/$KVER/$rel"
    line=$(grep "^$rel:" "$MODSRC/modules.dep")
    for dep in ${line#*:}; do add_mod "$dep"; done
}
for m in $MODULES; do
    # module file names use '-' or '_' inconsistently; try both spellings
    rel=$(grep -E "/(${m}|${m//-/_}|${m//_/-})\.ko(\.xz|\.zst|\.gz)?:" "$MODSRC/modules.dep" | head -n1 | cut -d: -f1)
    [ -n "$rel" ] || { log "module $m not found in $KVER"; exit 1; }
    add_mod "$rel"
done
cp "$MODSRC"/modules.builtin "$MODSRC"/modules.builtin.modinfo "$MODSRC"/modules.order "$STAGE/lib/modules/$KVER/"
depmod -b "$STAGE" "$KVER"
echo "$MODULES" > "$STAGE/etc/nested-modules"
echo "$KVER" > "$STAGE/etc/nested-kver"

# Skeleton of the chroot the test script runs in; /usr comes from the host
# over 9p (Debian 12 is merged-/usr, so these symlinks give a whole system).
R=$STAGE/newroot
mkdir -p "$R"/{usr,proc,sys,dev,tmp,run,root,project,nested,pysite,mnt,var/tmp,etc}
for d in bin lib lib64 sbin; do ln -s "usr/$d" "$R/$d"; done
cp -a /etc/ld.so.cache /etc/alternatives "$R/etc/"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' > "$R/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$R/etc/group"
printf '127.0.0.1 localhost\n::1 localhost\n' > "$R/etc/hosts"
echo nested > "$R/etc/hostname"
ln -s /proc/self/mounts "$R/etc/mtab"

(cd "$STAGE" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -1) > initramfs.cpio.gz.new
mv -f initramfs.cpio.gz.new initramfs.cpio.gz

cat > lab.env <<EOF
KVER=$KVER
DEB=$DEB
MODULES="$MODULES"
EOF
log "ready: $CACHE/vmlinuz $CACHE/initramfs.cpio.gz ($(du -h initramfs.cpio.gz | cut -f1))"
