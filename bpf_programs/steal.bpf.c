/* steal.bpf.c — host run-queue delay of vCPU threads (what the guest sees as steal).
 *
 * A vCPU starts waiting when it becomes runnable (sched_wakeup, sched_wakeup_new)
 * or is switched out while still runnable (preempted); it stops waiting when
 * sched_switch puts it on a CPU.  The waited time goes into a per-vCPU histogram
 * and total, and is attributed to the task the vCPU replaced on the CPU (prev of
 * that sched_switch): the last task to hold the CPU before the vCPU got it.
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

BPF_HASH(runnable_at, u32, u64, MAX_VCPUS);              /* vCPU tid -> start of its wait */
BPF_PERCPU_HASH(waits, struct wait_key, u64, MAX_VCPUS * 64);
BPF_PERCPU_HASH(wait_ns, struct vcpu_key, u64, MAX_VCPUS);
BPF_PERCPU_HASH(culprit_ns, struct culprit_key, u64, MAX_CULPRITS);

static __always_inline void count_overflow(void)
{
    u32 zero = 0;
    u64 *n = overflow.lookup(&zero);
    if (n)
        (*n)++;
}

static __always_inline void add_ns(void *map_lookup_or_try_init_result, u64 delta)
{
    u64 *c = map_lookup_or_try_init_result;
    if (c)
        *c += delta;
    else
        count_overflow();
}

static __always_inline void mark_runnable(u32 tid)
{
    if (!traced_tids.lookup(&tid))
        return;
    u64 now = bpf_ktime_get_ns();
    /* Already waiting (e.g. woken while preempted): the wait began earlier. */
    if (runnable_at.insert(&tid, &now) != 0 && !runnable_at.lookup(&tid))
        count_overflow();
}

TRACEPOINT_PROBE(sched, sched_wakeup)
{
    mark_runnable(args->pid);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup_new)
{
    mark_runnable(args->pid);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    u32 prev = args->prev_pid, next = args->next_pid;
    u64 now = 0;

    if (traced_tids.lookup(&prev)) {
        now = bpf_ktime_get_ns();
        if ((args->prev_state & STATE_MASK) == 0) {
            if (runnable_at.update(&prev, &now) != 0)
                count_overflow();
        } else {
            runnable_at.delete(&prev);   /* went to sleep: a wakeup starts the next wait */
        }
    }

    u32 *tgid = traced_tids.lookup(&next);
    if (!tgid)
        return 0;
    u64 *start = runnable_at.lookup(&next);
    if (!start)
        return 0;
    if (!now)
        now = bpf_ktime_get_ns();
    u64 delta = now - *start;
    runnable_at.delete(&next);

    struct wait_key wk = {.tgid = *tgid, .tid = next};
    HIST_ADD(waits, wk, delta);
    u64 zero = 0;
    struct vcpu_key vk = {.tgid = *tgid, .tid = next};
    add_ns(wait_ns.lookup_or_try_init(&vk, &zero), delta);

    struct culprit_key ck = {.tgid = *tgid, .tid = next, .culprit = prev};
    bpf_probe_read_kernel(&ck.comm, sizeof(ck.comm), args->prev_comm);
    add_ns(culprit_ns.lookup_or_try_init(&ck, &zero), delta);
    return 0;
}
