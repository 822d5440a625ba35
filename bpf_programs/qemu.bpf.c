/* qemu.bpf.c — calls (and optionally latency) of chosen VMM functions, per VM thread.
 *
 * The functions are user choices, so they never appear in this file: Python
 * attaches the uprobe of function i to on_entry_<i> (and its uretprobe to
 * on_return_<i>), and the index i is the only identity the program sees.  The
 * handlers are generated below by a macro for i < NFUNCS (at most MAX_FUNCS).
 *
 * A uprobe fires for every process that maps the binary; the traced_tgids miss
 * is the first thing done for a process that is not a VM in scope.
 *
 * Parameters: NFUNCS — number of functions (1..MAX_FUNCS); LATENCY — 1 to time
 * each call (entry timestamp per (thread, function), histogram on return).
 * A recursive call of the same function on the same thread replaces the outer
 * call's start, so only the inner call is timed.
 */
#include "kvmbpf.h"

#ifndef NFUNCS
#define NFUNCS 1
#endif
#ifndef LATENCY
#define LATENCY 0
#endif
#define MAX_FUNCS 16
#define MAX_THREAD_FUNCS 16384

#if NFUNCS < 1 || NFUNCS > MAX_FUNCS
#error "NFUNCS must be between 1 and MAX_FUNCS"
#endif

KVMBPF_FILTER_MAPS
KVMBPF_OVERFLOW_MAP

struct call_key {
    u32 tgid;
    u32 tid;
    u32 func;
};

struct lat_key {
    u32 tgid;
    u32 tid;
    u32 func;
    u32 slot;
};

struct start_key {
    u32 tid;
    u32 func;
};

BPF_PERCPU_HASH(calls, struct call_key, u64, MAX_THREAD_FUNCS);
#if LATENCY
BPF_PERCPU_HASH(latency, struct lat_key, u64, MAX_THREAD_FUNCS * 32);
BPF_HASH(starts, struct start_key, u64, MAX_THREAD_FUNCS);   /* shared: return may run elsewhere */
#endif

static __always_inline void count_overflow(void)
{
    u32 zero = 0;
    u64 *n = overflow.lookup(&zero);
    if (n)
        (*n)++;
}

static __always_inline int on_entry(u32 func)
{
    u32 tgid = current_tgid();
    if (!traced_tgids.lookup(&tgid))
        return 0;
    u64 zero = 0;
    struct call_key k = {.tgid = tgid, .tid = current_tid(), .func = func};
    u64 *c = calls.lookup_or_try_init(&k, &zero);
    if (c)
        (*c)++;
    else
        count_overflow();
#if LATENCY
    struct start_key s = {.tid = k.tid, .func = func};
    u64 now = bpf_ktime_get_ns();
    if (starts.update(&s, &now) != 0)
        count_overflow();
#endif
    return 0;
}

static __always_inline int on_return(u32 func)
{
#if LATENCY
    u32 tgid = current_tgid();
    if (!traced_tgids.lookup(&tgid))
        return 0;
    struct start_key s = {.tid = current_tid(), .func = func};
    u64 *start = starts.lookup(&s);
    if (!start)
        return 0;                    /* entered before we attached */
    u64 delta = bpf_ktime_get_ns() - *start;
    starts.delete(&s);
    u64 zero = 0;
    struct lat_key k = {.tgid = tgid, .tid = s.tid, .func = func, .slot = hist_slot(delta)};
    u64 *c = latency.lookup_or_try_init(&k, &zero);
    if (c)
        (*c)++;
    else
        count_overflow();
#endif
    return 0;
}

#define PROBE_PAIR(i)                                                          \
    int on_entry_##i(struct pt_regs *ctx) { return on_entry(i); }              \
    int on_return_##i(struct pt_regs *ctx) { return on_return(i); }

PROBE_PAIR(0)
#if NFUNCS > 1
PROBE_PAIR(1)
#endif
#if NFUNCS > 2
PROBE_PAIR(2)
#endif
#if NFUNCS > 3
PROBE_PAIR(3)
#endif
#if NFUNCS > 4
PROBE_PAIR(4)
#endif
#if NFUNCS > 5
PROBE_PAIR(5)
#endif
#if NFUNCS > 6
PROBE_PAIR(6)
#endif
#if NFUNCS > 7
PROBE_PAIR(7)
#endif
#if NFUNCS > 8
PROBE_PAIR(8)
#endif
#if NFUNCS > 9
PROBE_PAIR(9)
#endif
#if NFUNCS > 10
PROBE_PAIR(10)
#endif
#if NFUNCS > 11
PROBE_PAIR(11)
#endif
#if NFUNCS > 12
PROBE_PAIR(12)
#endif
#if NFUNCS > 13
PROBE_PAIR(13)
#endif
#if NFUNCS > 14
PROBE_PAIR(14)
#endif
#if NFUNCS > 15
PROBE_PAIR(15)
#endif
