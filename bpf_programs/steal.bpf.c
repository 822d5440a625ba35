/* steal.bpf.c — host run-queue delay of vCPU threads (what the guest sees as steal).
 *
 * A vCPU starts waiting when it becomes runnable (sched_wakeup, sched_wakeup_new)
 * or is switched out while still runnable (preempted); it stops waiting when
 * sched_switch puts it on a CPU.  The waited time goes into a per-vCPU histogram
 * and total, and is split between two culprits: the task that held the CPU when
 * the wait ended (prev of that sched_switch) gets the time it had been running
 * (at most the wait), and the task that held the CPU when the wait began (the
 * preemptor, or the task running on the wakeup's target CPU) gets the rest.
 * Exact when at most two tasks ran during the wait; time of tasks that ran in
 * between is charged to the first.  This needs one store per sched_switch of
 * any task (who runs on this CPU since when): the only work non-vCPU tasks cost
 * besides the two filter misses.
 *
 * Every id and state comes from tracepoint fields (never task_struct: the build
 * headers do not match this kernel).  Non-vCPU tasks stop at the traced_tids miss.
 *
 * Parameters: STATE_MASK — prev_state bits that mean "not runnable" (all the
 * task-state flags of the sched_switch print format); a preempted task reports
 * TASK_RUNNING or only the "preempted" bit above them.
 */
#include "kvmbpf.h"

#ifndef STATE_MASK
#define STATE_MASK 0xff
#endif
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
    u32 culprit;          /* tid of the task that held the CPU (0: idle) */
    char comm[16];
};

/* A task on a CPU since a time: the current one per CPU, or a vCPU's first culprit. */
struct holder {
    u64 since;
    u32 tid;
    char comm[16];
};

BPF_ARRAY(cpu_cur, struct holder, MAX_CPUS);               /* CPU -> who runs there since when */
BPF_HASH(runnable_at, u32, struct holder, MAX_VCPUS);     /* waiting vCPU -> wait start, first holder */
BPF_PERCPU_HASH(waits, struct wait_key, u64, MAX_VCPUS * 64);
BPF_PERCPU_HASH(wait_ns, struct vcpu_key, u64, MAX_VCPUS);
/* Switch-ins of a vCPU with no recorded start: its wakeup or preemption was not seen
 * (first wait after attach, or the kernel skipped this program: BPF recursion guard). */
BPF_PERCPU_ARRAY(unmatched, u64, 1);
BPF_PERCPU_HASH(culprit_ns, struct culprit_key, u64, MAX_CULPRITS);

static __always_inline void count_overflow(void)
{
    u32 zero = 0;
    u64 *n = overflow.lookup(&zero);
    if (n)
        (*n)++;
}

/* Add to a counter found or created by lookup_or_try_init (NULL: the map is full). */
static __always_inline void add_ns(u64 *c, u64 delta)
{
    if (c)
        *c += delta;
    else
        count_overflow();
}

/* Woken: the wait starts now, first culprit = whoever runs on the target CPU. */
static __always_inline void mark_runnable(u32 tid, u32 cpu)
{
    if (!traced_tids.lookup(&tid))
        return;
    struct holder w = {.since = bpf_ktime_get_ns()};
    struct holder *cur = cpu_cur.lookup(&cpu);
    if (cur) {
        w.tid = cur->tid;
        __builtin_memcpy(w.comm, cur->comm, sizeof(w.comm));
    }
    /* Already waiting (e.g. woken while preempted): the wait began earlier. */
    if (runnable_at.insert(&tid, &w) != 0 && !runnable_at.lookup(&tid))
        count_overflow();
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

static __always_inline void charge(u32 tgid, u32 tid, u32 culprit, const char *comm, u64 ns)
{
    if (!ns)
        return;
    u64 zero = 0;
    struct culprit_key ck = {.tgid = tgid, .tid = tid, .culprit = culprit};
    __builtin_memcpy(ck.comm, comm, sizeof(ck.comm));
    add_ns(culprit_ns.lookup_or_try_init(&ck, &zero), ns);
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    u32 prev = args->prev_pid, next = args->next_pid;
    u32 cpu = bpf_get_smp_processor_id();
    u64 now = bpf_ktime_get_ns();
    struct holder *cur = cpu_cur.lookup(&cpu);
    if (!cur)
        return 0;
    u64 prev_since = cur->since;
    cur->since = now;
    cur->tid = next;
    bpf_probe_read_kernel(cur->comm, sizeof(cur->comm), args->next_comm);

    if (traced_tids.lookup(&prev)) {
        if ((args->prev_state & STATE_MASK) == 0) {
            struct holder w = {.since = now, .tid = next};
            __builtin_memcpy(w.comm, cur->comm, sizeof(w.comm));
            if (runnable_at.update(&prev, &w) != 0)
                count_overflow();
        } else {
            runnable_at.delete(&prev);   /* went to sleep: a wakeup starts the next wait */
        }
    }

    u32 *tgid = traced_tids.lookup(&next);
    if (!tgid)
        return 0;
    struct holder *w = runnable_at.lookup(&next);
    if (!w) {
        u32 zero_idx = 0;
        u64 *n = unmatched.lookup(&zero_idx);
        if (n)
            (*n)++;
        return 0;
    }
    u64 delta = now - w->since;
    /* prev ran since it got this CPU or since the wait began, whichever is later */
    u64 last = now - (prev_since > w->since ? prev_since : w->since);
    if (last > delta)
        last = delta;
    u32 vm = *tgid;
    char prev_comm[16];
    bpf_probe_read_kernel(prev_comm, sizeof(prev_comm), args->prev_comm);
    charge(vm, next, prev, prev_comm, last);
    charge(vm, next, w->tid, w->comm, delta - last);
    runnable_at.delete(&next);

    u64 zero = 0;
    struct wait_key wk = {.tgid = vm, .tid = next, .slot = hist_slot(delta)};
    add_ns(waits.lookup_or_try_init(&wk, &zero), 1);   /* (HIST_ADD: bcc refuses map calls in macros) */
    struct vcpu_key vk = {.tgid = vm, .tid = next};
    add_ns(wait_ns.lookup_or_try_init(&vk, &zero), delta);
    return 0;
}
