/* blk.bpf.c — block request latency, size, depth, merges, errors per VM and device.
 *
 * A VM's I/O is submitted by VMM threads (QEMU's `worker` pool, main loop or
 * iou-wrk-*), all in the VM's tgid, but issued by kworkers and completed in
 * softirq: so attribute at block_bio_queue (submitter's context) and carry the
 * VM in a shared start map keyed by (dev, sector) — the only request identity
 * the tracepoints give — that the completion finds on whatever CPU it runs.
 * Not every bio of a VM is queued by one of its threads: blk-throttle (a cgroup I/O
 * limit) holds bios back and a kworker queues them later, so a device that exactly one
 * VM has open (vm_devs, from the inventory) is attributed by device, whoever queues.
 * block_bio_queue fires after blk-throttle released the bio: the time a cgroup limit
 * held it is in neither latency (no tracepoint sees the bio before that).
 *
 * Parameters (-D, integers):
 *   ALL_IO      1: every process's I/O (VMs labelled, the rest as tgid 0)
 *   FILTER_DEV  1: only devices in traced_devs
 *   MAX_REQS    start-map bound (requests in flight)
 */
#include "kvmbpf.h"

#ifndef ALL_IO
#define ALL_IO 0
#endif
#ifndef FILTER_DEV
#define FILTER_DEV 0
#endif
#ifndef MAX_REQS
#define MAX_REQS 16384
#endif

/* Operations (names in kvmbpf/collectors/blk.py OPS). */
#define OP_READ 0
#define OP_WRITE 1
#define OP_FLUSH 2
#define OP_DISCARD 3
#define OP_OTHER 4

/* Histogram kinds. */
#define K_QUEUE 0      /* block_bio_queue -> block_rq_complete, ns */
#define K_ISSUE 1      /* block_rq_issue  -> block_rq_complete, ns */
#define K_SIZE 2       /* completed bytes */
#define K_DEPTH 3      /* traced requests in flight on the device at issue, incl. this one */

/* Counters. */
#define C_REQUESTS 0
#define C_BYTES 1
#define C_ERRORS 2
#define C_BACKMERGE 3
#define C_FRONTMERGE 4
#define C_RQMERGE 5
#define C_REQUEUE 6

/* Overflow slots. */
#define OVF_START 0    /* a request not tracked: start map full */

/* Data-less requests (flushes) carry sector 0 on queue/issue and ~0 on the flush
 * request's completion; one key for all of them keeps them apart from data at sector 0. */
#define FLUSH_SECTOR (~0ULL - 1)

struct req_key {
    u32 dev;
    u32 __pad0;
    u64 sector;
};

struct req_val {
    u64 queue_ts;      /* 0: queued before tracing or not seen (ALL_IO, issue only) */
    u64 issue_ts;
    u32 tgid;          /* VM pid; 0 = not a VM (ALL_IO) */
    u8 op;
    u8 issued;         /* counted in inflight (undone by complete/requeue) */
    u16 __pad1;
};

struct hist_key {
    u32 tgid;
    u32 dev;
    u8 op;
    u8 kind;
    u16 __pad0;
    u32 slot;
};

struct count_key {
    u32 tgid;
    u32 dev;
    u8 op;
    u8 what;
    u16 __pad0;
};

KVMBPF_FILTER_MAPS
KVMBPF_OVERFLOW_MAP
BPF_HASH(traced_devs, u32, u32, 1024);
BPF_HASH(vm_devs, u32, u32, 1024);      /* dev_t -> pid of the one VM that has it open */
BPF_HASH(start, struct req_key, struct req_val, MAX_REQS);
BPF_HASH(inflight, u32, s64, 1024);
BPF_PERCPU_HASH(hists, struct hist_key, u64, 32768);
BPF_PERCPU_HASH(counts, struct count_key, u64, 4096);

static __always_inline struct req_key req_key_of(u32 dev, u64 sector, u32 nr_sector)
{
    struct req_key k = {};
    k.dev = dev;
    k.sector = nr_sector ? sector : FLUSH_SECTOR;
    return k;
}

/* The operation from the tracepoint's rwbs string: an optional leading 'F'
 * (preflush) then the op letter; a data-less write is a flush (blkdev_issue_flush). */
static __always_inline u8 op_of(const char *rwbs, u32 nr_sector)
{
    char c = rwbs[0];
    if (c == 'F') {
        char n = rwbs[1];
        if (n == 'W' || n == 'R' || n == 'D' || n == 'F' || n == 'N')
            c = n;
        else
            return OP_FLUSH;
    }
    if (c == 'R')
        return OP_READ;
    if (c == 'W')
        return nr_sector ? OP_WRITE : OP_FLUSH;
    if (c == 'F')
        return OP_FLUSH;
    if (c == 'D')
        return OP_DISCARD;
    return OP_OTHER;
}

static __always_inline int dev_traced(u32 dev)
{
#if FILTER_DEV
    return traced_devs.lookup(&dev) != NULL;
#else
    return 1;
#endif
}

/* The VM the current task belongs to: its tgid, 0 for other tasks in ALL_IO mode,
 * -1 (drop) otherwise. */
static __always_inline s64 submitter_vm(void)
{
    u32 tgid = current_tgid();
    u32 *vm = traced_tgids.lookup(&tgid);
    if (vm)
        return *vm;
    return ALL_IO ? 0 : -1;
}

/* The VM a bio queued on `dev` belongs to: the device's VM if one VM owns it, else the
 * queueing thread's (submitter_vm); -1 (drop) for an untraced device. */
static __always_inline s64 bio_vm(u32 dev)
{
    if (!dev_traced(dev))
        return -1;
    u32 *owner = vm_devs.lookup(&dev);
    if (owner)
        return *owner;
    return submitter_vm();
}

static __always_inline void count(u32 tgid, u32 dev, u8 op, u8 what, u64 n)
{
    struct count_key k = {};
    k.tgid = tgid;
    k.dev = dev;
    k.op = op;
    k.what = what;
    u64 zero = 0, *c = counts.lookup_or_try_init(&k, &zero);   /* not COUNT_ADD: bcc refuses */
    if (c)                                                      /* map calls inside macros */
        *c += n;
}

static __always_inline void hist(u32 tgid, u32 dev, u8 op, u8 kind, u64 v)
{
    struct hist_key k = {};
    k.tgid = tgid;
    k.dev = dev;
    k.op = op;
    k.kind = kind;
    k.slot = hist_slot(v);
    u64 zero = 0, *c = hists.lookup_or_try_init(&k, &zero);
    if (c)
        (*c)++;
}

static __always_inline void track(struct req_key *k, struct req_val *v)
{
    if (start.update(k, v) != 0) {
        u32 slot = OVF_START;
        u64 *n = overflow.lookup(&slot);
        if (n)
            (*n)++;
    }
}

static __always_inline void inflight_add(u32 dev, s64 delta, s64 *after)
{
    s64 zero = 0, *n = inflight.lookup_or_try_init(&dev, &zero);
    if (!n)
        return;
    s64 before = __sync_fetch_and_add(n, delta);
    if (after)
        *after = before + delta;
}

TRACEPOINT_PROBE(block, block_bio_queue)
{
    s64 vm = bio_vm(args->dev);
    if (vm < 0)
        return 0;
    struct req_key k = req_key_of(args->dev, args->sector, args->nr_sector);
    struct req_val v = {};
    v.queue_ts = bpf_ktime_get_ns();
    v.tgid = vm;
    v.op = op_of(args->rwbs, args->nr_sector);
    track(&k, &v);
    return 0;
}

/* A bio appended to a request already queued: it completes as part of that request. */
TRACEPOINT_PROBE(block, block_bio_backmerge)
{
    s64 vm = bio_vm(args->dev);
    if (vm < 0)
        return 0;
    struct req_key k = req_key_of(args->dev, args->sector, args->nr_sector);
    start.delete(&k);
    count(vm, args->dev, op_of(args->rwbs, args->nr_sector), C_BACKMERGE, 1);
    return 0;
}

/* A bio prepended to a request: the request now starts (and completes) at the bio's
 * sector; it keeps the older request's start time. */
TRACEPOINT_PROBE(block, block_bio_frontmerge)
{
    s64 vm = bio_vm(args->dev);
    if (vm < 0)
        return 0;
    struct req_key old = req_key_of(args->dev, args->sector + args->nr_sector, args->nr_sector);
    struct req_val *v = start.lookup(&old);
    if (v) {
        struct req_val keep = *v;
        struct req_key k = req_key_of(args->dev, args->sector, args->nr_sector);
        start.delete(&old);
        track(&k, &keep);
    }
    count(vm, args->dev, op_of(args->rwbs, args->nr_sector), C_FRONTMERGE, 1);
    return 0;
}

/* A request merged into another one in the scheduler: it never completes itself. */
TRACEPOINT_PROBE(block, block_rq_merge)
{
    struct req_key k = req_key_of(args->dev, args->sector, args->nr_sector);
    struct req_val *v = start.lookup(&k);
    if (!v)
        return 0;
    count(v->tgid, args->dev, v->op, C_RQMERGE, 1);
    start.delete(&k);
    return 0;
}

/* Stacked devices (dm) move a bio to another device and sector without a new queue event. */
TRACEPOINT_PROBE(block, block_bio_remap)
{
    struct req_key old = req_key_of(args->old_dev, args->old_sector, args->nr_sector);
    struct req_val *v = start.lookup(&old);
    if (!v)
        return 0;
    struct req_val moved = *v;
    struct req_key k = req_key_of(args->dev, args->sector, args->nr_sector);
    start.delete(&old);
    track(&k, &moved);
    return 0;
}

TRACEPOINT_PROBE(block, block_rq_issue)
{
    struct req_key k = req_key_of(args->dev, args->sector, args->nr_sector);
    struct req_val *v = start.lookup(&k);
    if (!v) {
#if ALL_IO
        /* Not queued while we traced (or a flush machinery request): issue time only. */
        if (!dev_traced(args->dev))
            return 0;
        struct req_val fresh = {};
        fresh.op = op_of(args->rwbs, args->nr_sector);
        track(&k, &fresh);
        v = start.lookup(&k);
        if (!v)
            return 0;
#else
        return 0;
#endif
    }
    v->issue_ts = bpf_ktime_get_ns();
    if (v->issued)
        return 0;
    v->issued = 1;
    s64 depth = 0;
    inflight_add(args->dev, 1, &depth);
    hist(v->tgid, args->dev, v->op, K_DEPTH, depth > 0 ? depth : 0);
    return 0;
}

/* The driver gives a request back; it will be issued again. */
TRACEPOINT_PROBE(block, block_rq_requeue)
{
    struct req_key k = req_key_of(args->dev, args->sector, args->nr_sector);
    struct req_val *v = start.lookup(&k);
    if (!v)
        return 0;
    if (v->issued) {
        v->issued = 0;
        inflight_add(args->dev, -1, NULL);
    }
    count(v->tgid, args->dev, v->op, C_REQUEUE, 1);
    return 0;
}

TRACEPOINT_PROBE(block, block_rq_complete)
{
    struct req_key k = req_key_of(args->dev, args->sector, args->nr_sector);
    struct req_val *found = start.lookup(&k);
    if (!found)
        return 0;
    u64 now = bpf_ktime_get_ns();
    struct req_val v = *found;
    start.delete(&k);
    u32 dev = args->dev;
    if (v.queue_ts)
        hist(v.tgid, dev, v.op, K_QUEUE, now - v.queue_ts);
    if (v.issued) {
        hist(v.tgid, dev, v.op, K_ISSUE, now - v.issue_ts);
        inflight_add(dev, -1, NULL);
    }
    u64 bytes = (u64)args->nr_sector << 9;
    hist(v.tgid, dev, v.op, K_SIZE, bytes);
    count(v.tgid, dev, v.op, C_REQUESTS, 1);
    count(v.tgid, dev, v.op, C_BYTES, bytes);
    if (args->error)
        count(v.tgid, dev, v.op, C_ERRORS, 1);
    return 0;
}
