/* exits.bpf.c — VM exits per VM/vCPU: hardware exit reasons with handling latency
 * (kvm_exit -> kvm_entry), exits to the VMM with the time the VMM took before
 * re-entering KVM_RUN, the PIO ports / MMIO addresses the guest touched, and the
 * instructions KVM emulated (kvm_emulate_insn: on hosts where real-mode code and
 * CR writes never reach kvm_exit, e.g. PVM, this is where they show).
 *
 * Every event fires in a vCPU thread, whose tgid is the VMM: the VM filter is
 * checked first, and it is an array, not a hash (kvm_pio and kvm_emulate_insn fire
 * millions of times a second; a hash lookup costs more than the rest of the program):
 * vm_slots[tgid % VM_SLOTS] holds the traced tgid that owns the slot, or SLOT_SHARED
 * when two traced tgids share it (then traced_tgids, the hash, decides).  With
 * FILTER_TIDS=1 (--vcpu) the thread must also be in traced_tids.  Start timestamps
 * live in shared hashes keyed by tid (a vCPU thread may migrate between the exit and
 * the next entry).  EMULATED=0 leaves kvm_emulate_insn unattached.
 *
 * Map operations are spelled out here rather than through kvmbpf.h's HIST_ADD /
 * COUNT_ADD: bcc 0.26 (Debian 12) rejects map methods inside macros.
 */
#include "kvmbpf.h"

#ifndef FILTER_TIDS
#define FILTER_TIDS 0
#endif

#ifndef EMULATED
#define EMULATED 1
#endif

#ifndef VM_SLOTS
#define VM_SLOTS 32768          /* kvmbpf/collectors/exits.py: VM_SLOTS, SLOT_SHARED */
#endif
#define SLOT_SHARED 0xffffffff

#ifndef NCPUS
#define NCPUS 1                 /* possible CPUs, from Python */
#endif
#ifndef PIO_SLOTS
#define PIO_SLOTS 256           /* per CPU, a power of two; kvmbpf/collectors/exits.py: PIO_SLOTS */
#endif

#ifndef TID_SLOTS
#define TID_SLOTS 4096          /* kvmbpf/collectors/exits.py: TID_SLOTS */
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
struct uexit_hkey {
    u32 tgid;
    u32 tid;
    s32 code;
    u32 slot;
};

/* In uexit_slots (tid 0: free) or, when another thread holds the slot, in uexit_start. */
struct uexit_start_t {
    u64 ts;                  /* 0: consumed by the thread's next KVM_RUN */
    u32 tid;
    u32 tgid;
    s32 code;
    u32 _pad;
};

struct pio_key {
    u32 tgid;
    u32 port;
    u32 rw;
};

/* A PIO counter in pio_slots: CPU c owns entries [c * PIO_SLOTS, (c + 1) * PIO_SLOTS) and is
 * the only writer there (a CPU never runs two of these programs at once), so a plain array —
 * its lookup is inlined, unlike a hash's or a per-CPU array's — serves as per-CPU counters.
 * tgid 0: the entry is free.  Entries are never freed (counts are cumulative). */
struct pio_slot {
    u32 tgid;
    u32 port_rw;             /* port | rw << 16 */
    u64 count;
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
BPF_PERCPU_HASH(vmm_lat, struct uexit_hkey, u64, 32768);
BPF_HASH(uexit_start, u32, struct uexit_start_t, 16384);
BPF_ARRAY(uexit_slots, struct uexit_start_t, TID_SLOTS);
BPF_ARRAY(uexit_spilled, u32, 1);      /* [0] = 1 once a start went to uexit_start */
BPF_PERCPU_HASH(pio_counts, struct pio_key, u64, 8192);
BPF_ARRAY(pio_slots, struct pio_slot, NCPUS * PIO_SLOTS);
BPF_PERCPU_HASH(mmio_counts, struct mmio_key, u64, 8192);
#if EMULATED
BPF_PERCPU_HASH(emul_counts, struct emul_key, u64, 16384);
#endif
BPF_ARRAY(vm_slots, u32, VM_SLOTS);

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
    u32 slot = tgid % VM_SLOTS;
    u32 *owner = vm_slots.lookup(&slot);
    if (!owner || (*owner != tgid && (*owner != SLOT_SHARED || !traced_tgids.lookup(&tgid))))
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

/* Counted when the VMM is done (the thread's next KVM_RUN), from the VMM-time histogram: an
 * exit the VMM never returns from (the VM stopped) is not counted.  The start goes to the
 * thread's direct-mapped slot in uexit_slots (an array: its lookup is inlined), claimed when
 * free; only a thread whose slot another thread holds uses the uexit_start hash.  Entries stay
 * while the thread is traced (Python frees them).  Two threads claiming one free slot at the
 * same instant can mix one start: both must be new, traced, and equal modulo TID_SLOTS. */
TRACEPOINT_PROBE(kvm, kvm_userspace_exit)
{
    u32 tgid = traced_vm();
    if (!tgid)
        return 0;
    u32 tid = current_tid();
    u32 idx = tid % TID_SLOTS;
    struct uexit_start_t *s = uexit_slots.lookup(&idx);
    if (!s || (s->tid != tid && s->tid))
        s = uexit_start.lookup(&tid);
    s32 code = args->errno < 0 ? args->errno : (s32)args->reason;
    if (s) {
        s->tid = tid;
        s->tgid = tgid;
        s->code = code;
        s->ts = bpf_ktime_get_ns();
        return 0;
    }
    struct uexit_start_t n = {.ts = bpf_ktime_get_ns(), .tid = tid, .tgid = tgid, .code = code};
    if (uexit_start.update(&tid, &n)) {
        count_overflow();
        return 0;
    }
    u32 zero = 0;
    u32 *spilled = uexit_spilled.lookup(&zero);
    if (spilled)
        *spilled = 1;
    return 0;
}

/* The VMM is done with the exit when its vCPU thread calls ioctl(KVM_RUN) again.  Runs for
 * every syscall on the host: two compares on the event first, then the thread's slot; the
 * hash only once some start has gone there (every VMM's KVM_RUN comes here, traced or not). */
TRACEPOINT_PROBE(raw_syscalls, sys_enter)
{
    if (args->id != NR_IOCTL || args->args[1] != KVM_RUN_CMD)
        return 0;
    u32 tid = current_tid();
    u32 idx = tid % TID_SLOTS;
    struct uexit_start_t *s = uexit_slots.lookup(&idx);
    if (!s || s->tid != tid) {          /* untraced, or its start spilled to the hash */
        u32 zero = 0;
        u32 *spilled = uexit_spilled.lookup(&zero);
        if (!spilled || !*spilled)
            return 0;
        s = uexit_start.lookup(&tid);
    }
    if (!s || !s->ts)
        return 0;
    u64 delta = bpf_ktime_get_ns() - s->ts;
    s->ts = 0;
    struct uexit_hkey k = {.tgid = s->tgid, .tid = tid, .code = s->code, .slot = hist_slot(delta)};
    u64 zero = 0;
    bump(vmm_lat.lookup_or_try_init(&k, &zero));
    return 0;
}

TRACEPOINT_PROBE(kvm, kvm_pio)
{
    u32 tgid = traced_vm();
    if (!tgid)
        return 0;
    u32 port = args->port, rw = args->rw;
    u32 port_rw = port | rw << 16;
    u32 idx = bpf_get_smp_processor_id() * PIO_SLOTS +
              ((port ^ port >> 8 ^ rw << 7 ^ tgid) & (PIO_SLOTS - 1));
    struct pio_slot *e = pio_slots.lookup(&idx);
    if (e && e->tgid == tgid && e->port_rw == port_rw) {
        e->count++;
        return 0;
    }
    if (e && !e->tgid) {
        e->port_rw = port_rw;
        e->count = 1;
        e->tgid = tgid;
        return 0;
    }
    struct pio_key k = {.tgid = tgid, .port = port, .rw = rw};
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

#if EMULATED
/* Hot on real-mode guests (one event per instruction): the filter, one per-CPU hash update. */
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
#endif
