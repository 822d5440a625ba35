/* steal.bpf.c — host run-queue delay of vCPU threads (what the guest sees as steal),
 * and every task that ran on the CPU a vCPU waited for, charged for the time it ran.
 *
 * A vCPU starts waiting when it becomes runnable (sched_wakeup, sched_wakeup_new: on
 * target_cpu) or is switched out while still runnable (preempted: on this CPU); it stops
 * waiting when sched_switch puts it on a CPU.  The waited time goes into a per-vCPU
 * histogram and total (at the end of each wait).
 *
 * Culprits: each CPU keeps NSLOTS slots naming the vCPUs waiting there, a count of the
 * vCPUs waiting there (slots in use plus waits that found no slot) and, while that count
 * is not zero, the time its current task got it.  At every sched_switch on a CPU with
 * waiters, prev is charged, per waiting vCPU, the time it ran since max(its switch-in,
 * the vCPU's wait start on this CPU): so every task that ran during the wait is charged
 * what it ran, and the charges of one wait add up to the wait.
 * A switch-in on a CPU where nothing waited is not recorded: it came before any wait
 * there that task can be charged for, so the max() is that wait's start either way (the
 * recorded time is older, never newer).
 * A vCPU that migrates while waiting (sched_migrate_task) moves its slot; the time
 * between the old CPU's last switch and the migration is charged to UNATTRIBUTED.  A
 * vCPU that finds no free slot (more waiting vCPUs on one CPU than NSLOTS: counted in
 * no_slot) falls back: the task it replaces is charged its running time, the rest of
 * the wait is UNATTRIBUTED.
 * Cost of a switch of unrelated tasks on a CPU where no traced vCPU waits: one array
 * lookup and the two traced_tids misses; where one waits: a clock read and a store more.
 *
 * Slots are written from other CPUs (wakeups, migrations): claimed and freed with
 * cmpxchg (bpf_spin_lock is not allowed in tracing programs).  The wait record
 * (runnable_at) is the truth: a slot whose owner has no record is freed by the next
 * switch on that CPU (records of untraced threads are removed by the collector; one
 * removed while it held no slot stays counted in its CPU's waiters: a lost fast path
 * there, not a wrong charge).
 *
 * Every id and state comes from tracepoint fields (never task_struct: the build
 * headers do not match this kernel).
 *
 * Parameters: STATE_MASK — prev_state bits that mean "not runnable" (all the task-state
 * flags of the sched_switch print format); a preempted task reports TASK_RUNNING or
 * only the "preempted" bit above them.  NSLOTS — waiting vCPUs tracked per CPU.
 */
#include "kvmbpf.h"

#ifndef STATE_MASK
#define STATE_MASK 0xff
#endif
#ifndef NSLOTS
#define NSLOTS 8
#endif
#define NO_SLOT 0xffffffff
#define UNATTRIBUTED 0xffffffff     /* culprit tid of wait time no task could be named for */
#define MAX_VCPUS 4096
#define MAX_CULPRITS 16384
#define MAX_CPUS 1024

KVMBPF_FILTER_MAPS
KVMBPF_OVERFLOW_MAP

struct vcpu_key {
    u32 tgid;
    u32 tid;
};

struct wait_key {
    u32 tgid;
    u32 tid;
    u32 slot;
};

struct culprit_key {
    u32 tgid;
    u32 tid;
    u32 culprit;          /* tid of the task that held the CPU (0: idle; UNATTRIBUTED) */
    char comm[16];
};

/* A waiting vCPU. */
struct wait {
    u64 since;            /* the wait began */
    u64 here;             /* it began waiting on cpu (later than since after a migration) */
    u64 spilled;          /* cpu + 1: counted in its waiters without a slot (u64: cmpxchg) */
    u32 tgid;
    u32 cpu;
    u32 slot;             /* its slot on cpu, NO_SLOT: none (fallback attribution) */
};

struct cpu_state {
    u64 since;            /* the current task got this CPU (recorded while waiters) */
    u64 waiters;          /* vCPUs waiting here: slots in use + spilled waits */
    u64 owner[NSLOTS];    /* tid of a vCPU waiting here, 0: free (u64: cmpxchg) */
};

BPF_ARRAY(cpus, struct cpu_state, MAX_CPUS);
BPF_HASH(runnable_at, u32, struct wait, MAX_VCPUS);
BPF_PERCPU_HASH(waits, struct wait_key, u64, MAX_VCPUS * 64);
BPF_PERCPU_HASH(wait_ns, struct vcpu_key, u64, MAX_VCPUS);
/* Switch-ins of a vCPU with no recorded start: its wakeup or preemption was not seen
 * (first wait after attach, or the kernel skipped this program: BPF recursion guard). */
BPF_PERCPU_ARRAY(unmatched, u64, 1);
/* Waits that found every slot of their CPU taken (fallback attribution). */
BPF_PERCPU_ARRAY(no_slot, u64, 1);
BPF_PERCPU_HASH(culprit_ns, struct culprit_key, u64, MAX_CULPRITS);

static __always_inline void bump(u64 *n)
{
    if (n)
        (*n)++;
}

static __always_inline void count_overflow(void)
{
    u32 zero = 0;
    bump(overflow.lookup(&zero));
}

static __always_inline void charge(u32 tgid, u32 tid, u32 culprit, const char *comm, u64 ns)
{
    if (!ns)
        return;
    u64 zero = 0;
    struct culprit_key ck = {.tgid = tgid, .tid = tid, .culprit = culprit};
    if (comm)
        __builtin_memcpy(ck.comm, comm, sizeof(ck.comm));
    u64 *c = culprit_ns.lookup_or_try_init(&ck, &zero);
    if (c)
        *c += ns;
    else
        count_overflow();
}

static __always_inline u64 later(u64 a, u64 b)
{
    return a > b ? a : b;
}

/* Counted in cpu's waiters first (its switches record times from then on), then a
 * slot; with none free the count stays with the wait (spilled). */
static __always_inline u32 claim_slot(struct cpu_state *c, struct wait *w, u32 cpu, u32 tid)
{
    __sync_fetch_and_add(&c->waiters, 1);
#pragma unroll
    for (u32 i = 0; i < NSLOTS; i++) {
        if (c->owner[i] == 0 && __sync_val_compare_and_swap(&c->owner[i], 0, (u64)tid) == 0)
            return i;
    }
    w->spilled = cpu + 1;
    u32 zero = 0;
    bump(no_slot.lookup(&zero));
    return NO_SLOT;
}

static __always_inline void unspill(struct wait *w)
{
    u64 spilled = w->spilled;
    if (!spilled || __sync_val_compare_and_swap(&w->spilled, spilled, 0) != spilled)
        return;
    u32 cpu = spilled - 1;
    struct cpu_state *c = cpus.lookup(&cpu);
    if (c)
        __sync_fetch_and_add(&c->waiters, -1);
}

static __always_inline void free_slot(struct cpu_state *c, u32 slot, u32 tid)
{
    if (slot >= NSLOTS)
        return;
    if (__sync_val_compare_and_swap(&c->owner[slot], (u64)tid, 0) == tid)
        __sync_fetch_and_add(&c->waiters, -1);
}

static __always_inline void free_slot_on(u32 cpu, u32 slot, u32 tid)
{
    struct cpu_state *c = cpus.lookup(&cpu);
    if (c)
        free_slot(c, slot, tid);
}

/* tid starts waiting on cpu: the record first, so a concurrent switch there never
 * sees the slot without its record (and frees it as stale). */
static __always_inline void start_wait(struct cpu_state *c, u32 tid, u32 tgid, u32 cpu, u64 now)
{
    struct wait nw = {.since = now, .here = now, .tgid = tgid, .cpu = cpu, .slot = NO_SLOT};
    if (runnable_at.update(&tid, &nw) != 0) {
        count_overflow();
        return;
    }
    struct wait *w = runnable_at.lookup(&tid);
    if (w)
        w->slot = claim_slot(c, w, cpu, tid);
}

/* Woken: the wait starts now on the target CPU. */
static __always_inline void mark_runnable(u32 tid, u32 cpu)
{
    u32 *tgid = traced_tids.lookup(&tid);
    if (!tgid)
        return;
    /* Already waiting (e.g. woken while preempted): the wait began earlier. */
    if (runnable_at.lookup(&tid))
        return;
    struct cpu_state *c = cpus.lookup(&cpu);
    if (c)
        start_wait(c, tid, *tgid, cpu, bpf_ktime_get_ns());
}

TRACEPOINT_PROBE(sched, sched_wakeup)
{
    mark_runnable(args->pid, args->target_cpu);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup_new)
{
    mark_runnable(args->pid, args->target_cpu);
    return 0;
}

/* A waiting vCPU moved to another CPU's run queue: move its slot. */
TRACEPOINT_PROBE(sched, sched_migrate_task)
{
    u32 tid = args->pid;
    if (!traced_tids.lookup(&tid))
        return 0;
    struct wait *w = runnable_at.lookup(&tid);
    if (!w)
        return 0;                          /* a sleeper being woken: its wakeup follows */
    u32 from = w->cpu, to = args->dest_cpu, slot = w->slot;
    u64 now = bpf_ktime_get_ns(), here = w->here;
    w->cpu = to;
    w->here = now;
    struct cpu_state *c = cpus.lookup(&to);
    if (slot == NO_SLOT) {                 /* fallback attribution stays: move the count */
        if (c && w->spilled) {
            __sync_fetch_and_add(&c->waiters, 1);
            unspill(w);
            w->spilled = to + 1;
        }
        return 0;
    }
    w->slot = NO_SLOT;
    u32 moved = c ? claim_slot(c, w, to, tid) : NO_SLOT;
    c = cpus.lookup(&from);
    if (c) {
        /* from's current task ran since its last switch: not known here */
        u64 start = later(c->since, here);
        if (now > start)
            charge(w->tgid, tid, UNATTRIBUTED, 0, now - start);
        free_slot(c, slot, tid);
    }
    w->slot = moved;
    return 0;
}

/* prev leaves this CPU: charge it, per vCPU waiting here, the time it ran during the wait. */
static __always_inline void charge_waiters(struct cpu_state *c, u32 cpu, u32 prev,
                                           const char *prev_comm_src, u64 prev_since, u64 now)
{
    char comm[16];
    bpf_probe_read_kernel(comm, sizeof(comm), prev_comm_src);
#pragma unroll
    for (u32 i = 0; i < NSLOTS; i++) {
        u32 tid = c->owner[i];
        if (!tid || tid == prev)
            continue;
        struct wait *w = runnable_at.lookup(&tid);
        if (!w) {
            free_slot(c, i, tid);          /* stale: its wait ended unseen or is untraced */
            continue;
        }
        if (w->cpu != cpu || w->slot != i)
            continue;                      /* being set up or moved right now */
        u64 start = later(prev_since, w->here);
        if (now > start)
            charge(w->tgid, tid, prev, comm, now - start);
    }
}

/* A vCPU got this CPU: its wait ends (prev's share was charged by charge_waiters). */
static __always_inline void end_wait(struct cpu_state *c, u32 cpu, u32 next, u32 prev,
                                     const char *prev_comm_src, u64 prev_since, u64 now)
{
    struct wait *w = runnable_at.lookup(&next);
    if (!w) {
        u32 zero_idx = 0;
        bump(unmatched.lookup(&zero_idx));
        return;
    }
    u64 delta = now > w->since ? now - w->since : 0;
    u32 tgid = w->tgid;
    if (w->slot != NO_SLOT && w->cpu == cpu) {
        free_slot(c, w->slot, next);
    } else {
        /* fallback (no slot) or a migration not seen (the old CPU's switches charged
         * up to its last one): of the time not charged yet, prev's share, the rest unnamed */
        u64 from = w->here;
        struct cpu_state *old = w->slot != NO_SLOT ? cpus.lookup(&w->cpu) : 0;
        if (old) {
            from = later(from, old->since);
            free_slot(old, w->slot, next);
        }
        u64 span = from < now ? now - from : 0;
        u64 last = now - later(prev_since, from);
        if (last > span)
            last = span;
        char comm[16];
        bpf_probe_read_kernel(comm, sizeof(comm), prev_comm_src);
        charge(tgid, next, prev, comm, last);
        charge(tgid, next, UNATTRIBUTED, 0, span - last);
    }
    unspill(w);
    runnable_at.delete(&next);

    u64 zero = 0;
    struct wait_key wk = {.tgid = tgid, .tid = next, .slot = hist_slot(delta)};
    /* (not HIST_ADD: bcc refuses map calls in macros) */
    u64 *n = waits.lookup_or_try_init(&wk, &zero);
    if (n)
        (*n)++;
    else
        count_overflow();
    struct vcpu_key vk = {.tgid = tgid, .tid = next};
    u64 *total = wait_ns.lookup_or_try_init(&vk, &zero);
    if (total)
        *total += delta;
    else
        count_overflow();
}

/* Order: this CPU's record (does a vCPU wait here?), then the filter; an unrelated
 * switch on a CPU with no waiter stops after one array lookup and two filter misses. */
TRACEPOINT_PROBE(sched, sched_switch)
{
    u32 cpu = bpf_get_smp_processor_id();
    struct cpu_state *c = cpus.lookup(&cpu);
    if (!c)
        return 0;
    u32 prev = args->prev_pid, next = args->next_pid;
    u64 now = 0, prev_since = 0;       /* 0: before any wait here (see the header) */
    if (c->waiters) {
        now = bpf_ktime_get_ns();
        prev_since = c->since;
        c->since = now;
        charge_waiters(c, cpu, prev, args->prev_comm, prev_since, now);
    }

    u32 *prev_tgid = traced_tids.lookup(&prev);
    if (!prev_tgid && !traced_tids.lookup(&next))
        return 0;
    if (!now)
        now = bpf_ktime_get_ns();
    if (prev_tgid) {
        struct wait *w = runnable_at.lookup(&prev);
        if (w) {                           /* a wakeup seen while it still ran */
            if (w->slot != NO_SLOT)
                free_slot_on(w->cpu, w->slot, prev);
            unspill(w);
        }
        if ((args->prev_state & STATE_MASK) == 0)
            start_wait(c, prev, *prev_tgid, cpu, now);
        else if (w)
            runnable_at.delete(&prev);     /* went to sleep: a wakeup starts the next wait */
    }

    if (traced_tids.lookup(&next))
        end_wait(c, cpu, next, prev, args->prev_comm, prev_since, now);
    return 0;
}
