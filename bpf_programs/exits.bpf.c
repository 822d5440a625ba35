/* exits.bpf.c — VM exits per VM/vCPU: hardware exit reasons with handling latency
 * (kvm_exit -> kvm_entry), exits to the VMM with the time the VMM took before
 * re-entering KVM_RUN, the PIO ports / MMIO addresses the guest touched, and the
 * instructions KVM emulated (kvm_emulate_insn: on hosts where real-mode code and
 * CR writes never reach kvm_exit, e.g. PVM, this is where they show).
 *
 * Every event fires in a vCPU thread, whose tgid is the VMM: traced_tgids is
 * checked first.  With FILTER_TIDS=1 (--vcpu) the thread must also be in
 * traced_tids.  Start timestamps live in shared hashes keyed by tid (a vCPU
 * thread may migrate between the exit and the next entry).
 *
 * Map operations are spelled out here rather than through kvmbpf.h's HIST_ADD /
 * COUNT_ADD: bcc 0.26 (Debian 12) rejects map methods inside macros.
 */
#include "kvmbpf.h"

#ifndef FILTER_TIDS
#define FILTER_TIDS 0
#endif

#define NR_IOCTL 16             /* x86-64 */
#define KVM_RUN_CMD 0xae80

KVMBPF_FILTER_MAPS
KVMBPF_OVERFLOW_MAP

struct exit_key {
    u32 tgid;
    u32 vcpu;
    u32 isa;
    u32 reason;
};

struct exit_hkey {
    u32 tgid;
    u32 vcpu;
    u32 isa;
    u32 reason;
    u32 slot;
};

struct exit_start_t {
    u64 ts;
    u32 tgid;
    u32 vcpu;
    u32 isa;
    u32 reason;
};

/* code: the KVM_EXIT_* reason, or the negative errno KVM_RUN returned. */
struct uexit_key {
    u32 tgid;
    u32 tid;
    s32 code;
};

struct uexit_hkey {
    u32 tgid;
    u32 tid;
    s32 code;
    u32 slot;
};

struct uexit_start_t {
    u64 ts;
    u32 tgid;
    s32 code;
};

struct pio_key {
    u32 tgid;
    u32 port;
    u32 rw;
};

struct mmio_key {
    u32 tgid;
    u32 type;
    u64 gpa;
};

/* insn: the instruction's first bytes, byte 0 in the low 8 bits, bytes past len zeroed
 * (the tracepoint copies the whole fetch buffer).  mode: the event's flags (real, prot16...).
 * failed: 1 for the extra event KVM emits when it could not emulate the instruction. */
struct emul_key {
    u32 tgid;
    u32 tid;
    u32 insn;
    u32 len;
    u32 mode;
    u32 failed;
};

BPF_PERCPU_HASH(exit_counts, struct exit_key, u64, 8192);
BPF_PERCPU_HASH(exit_lat, struct exit_hkey, u64, 32768);
BPF_HASH(exit_start, u32, struct exit_start_t, 16384);
BPF_PERCPU_HASH(uexit_counts, struct uexit_key, u64, 8192);
BPF_PERCPU_HASH(vmm_lat, struct uexit_hkey, u64, 32768);
BPF_HASH(uexit_start, u32, struct uexit_start_t, 16384);
BPF_PERCPU_HASH(pio_counts, struct pio_key, u64, 8192);
BPF_PERCPU_HASH(mmio_counts, struct mmio_key, u64, 8192);
BPF_PERCPU_HASH(emul_counts, struct emul_key, u64, 16384);

static __always_inline void count_overflow(void)
{
    int idx = 0;
    u64 *o = overflow.lookup(&idx);
    if (o)
        (*o)++;
}

/* Add one to a counter found or created by lookup_or_try_init (NULL: the map is full). */
static __always_inline void bump(u64 *c)
{
    if (c)
        (*c)++;
    else
        count_overflow();
}

/* The VM (tgid) of the current thread if it is traced, else 0. */
static __always_inline u32 traced_vm(void)
{
    u32 tgid = current_tgid();
    if (!traced_tgids.lookup(&tgid))
        return 0;
#if FILTER_TIDS
    u32 tid = current_tid();
    if (!traced_tids.lookup(&tid))
        return 0;
#endif
    return tgid;
}

TRACEPOINT_PROBE(kvm, kvm_exit)
{
    u32 tgid = traced_vm();
    if (!tgid)
        return 0;
    struct exit_key k = {.tgid = tgid, .vcpu = args->vcpu_id, .isa = args->isa,
                         .reason = args->exit_reason};
    u64 zero = 0;
    bump(exit_counts.lookup_or_try_init(&k, &zero));
    u32 tid = current_tid();
    struct exit_start_t s = {.ts = bpf_ktime_get_ns(), .tgid = tgid, .vcpu = k.vcpu,
                             .isa = k.isa, .reason = k.reason};
    if (exit_start.update(&tid, &s))
        count_overflow();
    return 0;
}

TRACEPOINT_PROBE(kvm, kvm_entry)
{
    u32 tid = current_tid();
    struct exit_start_t *s = exit_start.lookup(&tid);
    if (!s)
        return 0;
    u64 delta = bpf_ktime_get_ns() - s->ts;
    struct exit_hkey k = {.tgid = s->tgid, .vcpu = s->vcpu, .isa = s->isa, .reason = s->reason};
    exit_start.delete(&tid);
    k.slot = hist_slot(delta);
    u64 zero = 0;
    bump(exit_lat.lookup_or_try_init(&k, &zero));
    return 0;
}

TRACEPOINT_PROBE(kvm, kvm_userspace_exit)
{
    u32 tgid = traced_vm();
    if (!tgid)
        return 0;
    u32 tid = current_tid();
    struct uexit_key k = {.tgid = tgid, .tid = tid,
                          .code = args->errno < 0 ? args->errno : (s32)args->reason};
    u64 zero = 0;
    bump(uexit_counts.lookup_or_try_init(&k, &zero));
    struct uexit_start_t s = {.ts = bpf_ktime_get_ns(), .tgid = tgid, .code = k.code};
    if (uexit_start.update(&tid, &s))
        count_overflow();
    return 0;
}

/* The VMM is done with the exit when its vCPU thread calls ioctl(KVM_RUN) again. */
TRACEPOINT_PROBE(raw_syscalls, sys_enter)
{
    if (args->id != NR_IOCTL || args->args[1] != KVM_RUN_CMD)
        return 0;
    u32 tid = current_tid();
    struct uexit_start_t *s = uexit_start.lookup(&tid);
    if (!s)
        return 0;
    u64 delta = bpf_ktime_get_ns() - s->ts;
    struct uexit_hkey k = {.tgid = s->tgid, .tid = tid, .code = s->code};
    uexit_start.delete(&tid);
    k.slot = hist_slot(delta);
    u64 zero = 0;
    bump(vmm_lat.lookup_or_try_init(&k, &zero));
    return 0;
}

TRACEPOINT_PROBE(kvm, kvm_pio)
{
    u32 tgid = traced_vm();
    if (!tgid)
        return 0;
    struct pio_key k = {.tgid = tgid, .port = args->port, .rw = args->rw};
    u64 zero = 0;
    bump(pio_counts.lookup_or_try_init(&k, &zero));
    return 0;
}

TRACEPOINT_PROBE(kvm, kvm_mmio)
{
    u32 tgid = traced_vm();
    if (!tgid)
        return 0;
    struct mmio_key k = {.tgid = tgid, .type = args->type, .gpa = args->gpa};
    u64 zero = 0;
    bump(mmio_counts.lookup_or_try_init(&k, &zero));
    return 0;
}

/* Hot on real-mode guests (one event per instruction): one filter lookup, one per-CPU update. */
TRACEPOINT_PROBE(kvm, kvm_emulate_insn)
{
    u32 tgid = traced_vm();
    if (!tgid)
        return 0;
    u32 len = args->len;
    u32 insn = args->insn[0] | (u32)args->insn[1] << 8 | (u32)args->insn[2] << 16 |
               (u32)args->insn[3] << 24;
    if (len < 4)
        insn &= (1U << (len * 8)) - 1;
    struct emul_key k = {.tgid = tgid, .tid = current_tid(), .insn = insn, .len = len,
                         .mode = args->flags, .failed = args->failed};
    u64 zero = 0;
    bump(emul_counts.lookup_or_try_init(&k, &zero));
    return 0;
}
