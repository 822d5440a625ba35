#!/bin/sh
# /init of the nested lab's initramfs (busybox).  Installed by setup.sh.
#
# 1. load the modules listed in /etc/nested-modules (9p transport, KVM, net)
# 2. mount the read-write 9p share "nestedwork" (the host's per-run temp dir)
#    at /newroot/nested and source its config.sh (written by nestedlab.py),
#    which names the other 9p shares to mount (NESTED_MOUNTS)
# 3. build the chroot: /usr from the host (9p, read-only), proc, sysfs,
#    tracefs, debugfs, devtmpfs, tmpfs for /tmp and /run
# 4. run /nested/run.sh in the chroot; stdout, stderr and the exit code go
#    to /nested/{stdout,stderr,rc}; a few uptime stamps go to /nested/timing
# 5. poweroff -f (QEMU exits)
export PATH=/bin
R=/newroot

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
t0=$(cut -d' ' -f1 /proc/uptime)
echo "nested-init: starting at uptime $t0"

fail() {
    echo "nested-init: FATAL: $*"
    poweroff -f
    sleep 10
}

for m in $(cat /etc/nested-modules); do
    modprobe "$m" || echo "nested-init: modprobe $m failed"
done

P9="trans=virtio,version=9p2000.L,msize=262144"
mount -t 9p -o "$P9" nestedwork $R/nested || fail "cannot mount the nestedwork share"
[ -f $R/nested/config.sh ] || fail "no config.sh in the nestedwork share"
. $R/nested/config.sh

# /usr is read-only and does not change under us: let the guest cache it.
mount -t 9p -o "$P9,ro,cache=loose" hostusr $R/usr || fail "cannot mount hostusr"
for spec in $NESTED_MOUNTS; do
    tag=${spec%%:*}; rest=${spec#*:}; point=${rest%%:*}; mode=${rest#*:}
    mkdir -p "$R$point" 2>/dev/null
    if [ "$mode" = ro ]; then opts="$P9,ro,cache=loose"; else opts="$P9"; fi
    mount -t 9p -o "$opts" "$tag" "$R$point" || fail "cannot mount share $tag at $point"
done

mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t debugfs debugfs $R/sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs $R/sys/kernel/tracing 2>/dev/null
mount -t bpf bpf $R/sys/fs/bpf 2>/dev/null
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
mount -t tmpfs -o mode=0755 tmpfs $R/run
hostname nested

t1=$(cut -d' ' -f1 /proc/uptime)
echo "nested-init: running script at uptime $t1"
chroot $R /usr/bin/env -i /bin/sh /nested/run.sh \
    </dev/null >$R/nested/stdout 2>$R/nested/stderr
rc=$?
t2=$(cut -d' ' -f1 /proc/uptime)
printf 'init_start %s\nscript_start %s\nscript_end %s\n' "$t0" "$t1" "$t2" > $R/nested/timing
echo $rc > $R/nested/rc.tmp && mv $R/nested/rc.tmp $R/nested/rc
echo "nested-init: script exited $rc at uptime $t2"
sync
poweroff -f
