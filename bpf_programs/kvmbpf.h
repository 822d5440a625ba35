/* kvmbpf.h — shared by every kvmbpf BPF program.
 *
 * Histogram layout (mirrored in kvmbpf/hist.py, checked by a unit test):
 * log-linear buckets.  Values below 2^HIST_SUB_BITS get one bucket each;
 * above that, each power-of-two range [2^e, 2^(e+1)) is split into
 * 2^HIST_SUB_BITS equal sub-buckets.  Bucket width / lower bound <= 2^-HIST_SUB_BITS,
 * so with HIST_SUB_BITS = 4 a value is known to within 6.25 % (3.2 % from the midpoint).
 * No loops: bpf_log2l() from bcc's helpers is straight-line code.
 */
#ifndef KVMBPF_H
#define KVMBPF_H

#define HIST_SUB_BITS 4
#define HIST_SUB (1ULL << HIST_SUB_BITS)
#define HIST_MAX_EXP 47            /* values >= 2^48 (ns: ~78 h) share the last bucket */
#define HIST_SLOTS ((HIST_MAX_EXP - HIST_SUB_BITS + 2) * HIST_SUB)

static __always_inline u32 hist_slot(u64 v)
{
    if (v < HIST_SUB)
        return v;
    u32 e = bpf_log2l(v) - 1;       /* bcc's bpf_log2l is floor(log2(v)) + 1; e >= HIST_SUB_BITS */
    if (e > HIST_MAX_EXP)
        return HIST_SLOTS - 1;
    u32 sub = (v >> (e - HIST_SUB_BITS)) & (HIST_SUB - 1);
    return ((e - HIST_SUB_BITS + 1) << HIST_SUB_BITS) + sub;
}

/* Filter maps, filled from the inventory: a miss is the first and only work
 * a program does for a task or device that is not traced.  Value = VM tgid. */
#define KVMBPF_FILTER_MAPS                        \
    BPF_HASH(traced_tgids, u32, u32, 4096);       \
    BPF_HASH(traced_tids, u32, u32, 16384);

/* Count of events that could not be recorded because a bounded map was full. */
#define KVMBPF_OVERFLOW_MAP BPF_PERCPU_ARRAY(overflow, u64, 8);

static __always_inline u32 current_tgid(void)
{
    return bpf_get_current_pid_tgid() >> 32;
}

static __always_inline u32 current_tid(void)
{
    return (u32)bpf_get_current_pid_tgid();
}

/* No map-method helpers here: bcc rewrites `map.lookup(...)` only in the program's own
 * file, never inside a macro or an included header, so each program spells out its
 * few map calls (and its overflow counting) itself. */

#endif
