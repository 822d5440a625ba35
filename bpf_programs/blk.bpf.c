/* blk.bpf.c — block request latency, size, depth, merges, errors per VM and device.
 *
 * A VM's I/O is submitted by VMM threads (QEMU's `worker` pool, main loop or
 * iou-wrk-*), all in the VM's tgid, but issued by kworkers and completed in
 * softirq: so attribute at block_bio_queue (submitter's context) and carry the
 * VM in a shared in-flight table keyed by (dev, sector) — the only request identity
 * the tracepoints give — that the completion finds on whatever CPU it runs.
 * Not every bio of a VM is queued by one of its threads: blk-throttle (a cgroup I/O
 * limit) holds bios back and a kworker queues them later, so a device that exactly one
 * VM has open (`devs` value = that VM, from the inventory) is attributed by device,
 * whoever queues.
 * block_bio_queue fires after blk-throttle released the bio: the time a cgroup limit
 * held it is in neither latency (no tracepoint sees the bio before that).
 *
 * Cost: a hash map operation is ~20-45 ns here (an insert ~150), an array lookup
 * (inlined) a few, so no hash map is touched per request in the common case.  Requests
 * in flight live in `reqs`, a WAYS-way set-associative table in an array: a request's
 * (dev, sector) hashes to a bucket, is claimed with a cmpxchg on the way's tag (free ->
 * busy -> tag, so a reader never sees a half-written entry) and freed at completion by
 * clearing the tag.  A full bucket evicts an entry older than 30 s (a request that never
 * completed: counted in `expired`), else the request is counted in overflow.  `rows`
 * gives a (vm, dev, op) its index in `stats`, a per-CPU array of one struct per row
 * holding every counter and histogram; the index and the device's in-flight slot ride
 * in the request's entry, so issue and completion update plain array memory.  Rows and
 * device slots are handed out here on first use (never freed: cumulative).  At queue, the
 * whole attribution (filters, owner, row) of (task's tgid, dev, op) is remembered in a
 * small per-CPU direct-mapped cache, valid while `filter_gen` (bumped by Python after
 * it changes a filter map) is unchanged: a hit replaces three hash lookups.  Per-CPU, so
 * no torn entries: the kernel never nests two tracepoint programs on one CPU.
 *
 * Parameters (-D, integers):
 *   ALL_IO      1: every process's I/O (VMs labelled, the rest as tgid 0)
 *   FILTER_DEV  1: only devices in `devs`
 *   MAX_REQS    requests tracked in flight (a power of two, >= WAYS)
 *   WAYS        entries per bucket of the in-flight table (a power of two)
 *   MAX_ROWS    stats rows: (vm, device, op) combinations
 *   MAX_DEVS    devices with an in-flight count
 */
#include "kvmbpf.h"

#ifndef ALL_IO
#define ALL_IO 0
#endif
#ifndef FILTER_DEV
#define FILTER_DEV 0
#endif
#ifndef MAX_REQS
#define MAX_REQS 4096
#endif
#ifndef MAX_ROWS
#define MAX_ROWS 64
#endif
#ifndef MAX_DEVS
#define MAX_DEVS 256
#endif
#define CACHE_BITS 8

/* The in-flight table: MAX_REQS entries in buckets of WAYS (8 tags: one cache line). */
#ifndef WAYS
#define WAYS 8
#endif
#define NBUCKETS (MAX_REQS / WAYS)
#define TAG_FREE 0
#define TAG_BUSY 1             /* being written: no reader matches it */
#define STALE_NS (30ULL * 1000000000ULL)

/* Operations (names in kvmbpf/collectors/blk.py OPS). */
#define OP_READ 0
#define OP_WRITE 1
#define OP_FLUSH 2
#define OP_DISCARD 3
#define OP_OTHER 4

/* `devs` values: a device no single VM owns (attribute by the queueing thread); a device
 * whose bios never become requests (zram, brd: no completion event would free them). */
#define NO_OWNER 0xffffffff
#define NO_REQUESTS 0xfffffffe

/* Overflow slots. */
#define OVF_START 0    /* a request not tracked: its bucket of the in-flight table full */
#define OVF_ROWS 1     /* an event not counted: stats rows or device slots all taken */

/* Histogram slots kept per row: hist_slot() of values below 2^E lies below
 * (E - HIST_SUB_BITS + 1) * HIST_SUB; larger values share the last slot. */
#define SLOTS_BELOW(e) (((e) - HIST_SUB_BITS + 1) * HIST_SUB)
#define LAT_SLOTS SLOTS_BELOW(44)     /* ns: 4.9 h (requests expire after 30 s) */
#define SIZE_SLOTS SLOTS_BELOW(41)    /* bytes: nr_sector (u32) << 9 is always below */
#define DEPTH_SLOTS SLOTS_BELOW(20)

/* Data-less requests (flushes) carry sector 0 on queue/issue and ~0 on the flush
 * request's completion; one key for all of them keeps them apart from data at sector 0. */
#define FLUSH_SECTOR (~0ULL - 1)

struct req_key {
    u32 dev;
    u32 __pad0;
    u64 sector;
};

struct req_val {
    u64 sector;        /* identity, with dev (the tag only narrows the search) */
    u64 queue_ts;      /* 0: queued before tracing or not seen (ALL_IO, issue only) */
    u64 issue_ts;
    u32 dev;
    u32 tgid;          /* VM pid; 0 = not a VM (ALL_IO) */
    u32 row;           /* index in stats */
    u16 devslot;       /* index in inflight */
    u8 op;
    u8 issued;         /* counted in inflight (undone by complete/requeue) */
};

/* One bucket of the in-flight table; tag[i] says whether val[i] is in use. */
struct req_bucket {
    u64 tag[WAYS];
    struct req_val val[WAYS];
};

struct row_key {
    u32 tgid;
    u32 dev;
    u32 op;
};

struct row_ref {
    u32 row;
    u32 devslot;
};

/* A remembered attribution: vm < 0 means drop. */
struct attr_entry {
    u32 tgid;
    u32 dev;
    u32 gen;
    u32 row;
    s32 vm;
    u16 devslot;
    u8 op;
    u8 used;
};

/* A device's in-flight count, alone on its cache line: issue and completion on different
 * CPUs move the line between them, and other devices' counts should not move with it. */
struct inflight_count {
    s64 n;
    u64 __pad[7];
};

/* Everything counted for one (vm, dev, op); requests = the size histogram's count.
 * Field names are read by kvmbpf/collectors/blk.py. */
struct row_stats {
    u64 bytes;
    u64 errors;
    u64 backmerges;
    u64 frontmerges;
    u64 rq_merges;
    u64 requeues;
    u64 queue[LAT_SLOTS];     /* block_bio_queue -> block_rq_complete, ns */
    u64 issue[LAT_SLOTS];     /* block_rq_issue  -> block_rq_complete, ns */
    u64 size[SIZE_SLOTS];     /* completed bytes */
    u64 depth[DEPTH_SLOTS];   /* traced requests in flight on the device at issue, incl. this one */
};

KVMBPF_FILTER_MAPS
KVMBPF_OVERFLOW_MAP
BPF_HASH(devs, u32, u32, 1024);          /* dev_t -> owning VM's pid or NO_OWNER */
BPF_ARRAY(reqs, struct req_bucket, NBUCKETS);
BPF_ARRAY(expired, u64, 1);             /* entries evicted after STALE_NS without completion */
BPF_HASH(rows, struct row_key, struct row_ref, MAX_ROWS);
BPF_HASH(devslots, u32, u32, MAX_DEVS);
BPF_ARRAY(allocated, u64, 2);            /* [0] rows, [1] device slots handed out */
BPF_ARRAY(inflight, struct inflight_count, MAX_DEVS);
BPF_PERCPU_ARRAY(stats, struct row_stats, MAX_ROWS);
BPF_ARRAY(filter_gen, u32, 1);
BPF_PERCPU_ARRAY(attr_cache, struct attr_entry, 1 << CACHE_BITS);

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

static __always_inline void overflowed(u32 slot)
{
    u64 *n = overflow.lookup(&slot);
    if (n)
        (*n)++;
}

/* The VM a task belongs to: its tgid, 0 for other tasks in ALL_IO mode,
 * -1 (drop) otherwise. */
static __always_inline s64 submitter_vm(u32 tgid)
{
    u32 *vm = traced_tgids.lookup(&tgid);
    if (vm)
        return *vm;
    return ALL_IO ? 0 : -1;
}

/* The VM a bio queued on `dev` belongs to: the device's VM if one VM owns it, else the
 * queueing thread's (submitter_vm); -1 (drop) for an untraced device.  One lookup
 * decides both the device filter and the owner. */
static __always_inline s64 bio_vm(u32 tgid, u32 dev)
{
    u32 *owner = devs.lookup(&dev);
    if (owner && *owner == NO_REQUESTS)
        return -1;
    if (owner && *owner != NO_OWNER)
        return *owner;
    if (FILTER_DEV && !owner)
        return -1;
    return submitter_vm(tgid);
}

/* The next free index below `bound` of counter `which` in `allocated`, or -1. */
static __always_inline s64 allocate(u32 which, u32 bound)
{
    u64 *next = allocated.lookup(&which);
    if (!next || *next >= bound)
        return -1;
    u64 got = __sync_fetch_and_add(next, 1);
    return got < bound ? got : -1;
}

static __always_inline s64 devslot_of(u32 dev)
{
    u32 *slot = devslots.lookup(&dev);
    if (slot)
        return *slot;
    s64 fresh = allocate(1, MAX_DEVS);
    if (fresh < 0)
        return -1;
    u32 val = fresh;
    devslots.insert(&dev, &val);        /* another CPU may have won: use its slot */
    slot = devslots.lookup(&dev);
    return slot ? *slot : -1;
}

/* First use of (vm, dev, op): hand out a row (an index lost to a race is only unused). */
static __always_inline int new_row(struct row_key *k)
{
    s64 devslot = devslot_of(k->dev);
    s64 row = allocate(0, MAX_ROWS);
    if (devslot < 0 || row < 0)
        return -1;
    struct row_ref ref = {};
    ref.row = row;
    ref.devslot = devslot;
    rows.insert(k, &ref);
    return 0;
}

static __always_inline struct row_ref *row_of(u32 tgid, u32 dev, u8 op)
{
    struct row_key k = {};
    k.tgid = tgid;
    k.dev = dev;
    k.op = op;
    struct row_ref *ref = rows.lookup(&k);
    if (ref)
        return ref;
    if (new_row(&k) == 0)
        ref = rows.lookup(&k);
    if (!ref)
        overflowed(OVF_ROWS);
    return ref;
}

static __always_inline struct row_stats *stats_of(u32 row)
{
    return stats.lookup(&row);
}

/* Fill a request entry's attribution for (vm, dev, op); 0 if it has no row. */
static __always_inline int attribute(struct req_val *v, u32 tgid, u32 dev, u8 op)
{
    struct row_ref *ref = row_of(tgid, dev, op);
    if (!ref)
        return 0;
    v->tgid = tgid;
    v->op = op;
    v->row = ref->row;
    v->devslot = ref->devslot;
    return 1;
}

/* Attribute a bio the current task queues on `dev` (bio_vm, row_of), through the cache;
 * 0: drop it. */
static __always_inline int attribute_bio(struct req_val *v, u32 dev, u8 op)
{
    u32 tgid = current_tgid(), zero = 0;
    u32 idx = ((tgid * 0x9E3779B1u) ^ dev ^ ((u32)op << 24)) * 0x9E3779B1u >> (32 - CACHE_BITS);
    u32 *genp = filter_gen.lookup(&zero);
    struct attr_entry *e = attr_cache.lookup(&idx);
    if (!genp || !e)
        return 0;
    u32 gen = *genp;            /* read before the filters: a later change invalidates */
    if (!e->used || e->tgid != tgid || e->dev != dev || e->op != op || e->gen != gen) {
        struct attr_entry fresh = {};
        s64 vm = bio_vm(tgid, dev);
        if (vm >= 0) {
            struct row_ref *ref = row_of(vm, dev, op);
            if (!ref)
                return 0;       /* counted; not remembered, so retried */
            fresh.row = ref->row;
            fresh.devslot = ref->devslot;
        }
        fresh.tgid = tgid;
        fresh.dev = dev;
        fresh.gen = gen;
        fresh.vm = vm < 0 ? -1 : vm;
        fresh.op = op;
        fresh.used = 1;
        *e = fresh;
    }
    if (e->vm < 0)
        return 0;
    v->tgid = e->vm;
    v->op = op;
    v->row = e->row;
    v->devslot = e->devslot;
    return 1;
}

/* Where a request's entry lies. */
struct req_ref {
    struct req_bucket *b;
    u32 way;
};

/* The request's bucket, and its tag: a mix of (dev, sector) that is never TAG_FREE/BUSY. */
static __always_inline struct req_bucket *bucket_of(struct req_key *k, u64 *tag)
{
    u64 h = k->sector * 0x9E3779B97F4A7C15ULL ^ (u64)k->dev * 0xC2B2AE3D27D4EB4FULL;
    h ^= h >> 29;
    *tag = h | 2;
    u32 idx = (h >> 2) & (NBUCKETS - 1);
    return reqs.lookup(&idx);
}

/* The way holding request k in bucket b, or -1. */
static __always_inline int way_of(struct req_bucket *b, u64 tag, struct req_key *k)
{
#pragma unroll
    for (int i = 0; i < WAYS; i++)
        if (b->tag[i] == tag && b->val[i].dev == k->dev && b->val[i].sector == k->sector)
            return i;
    return -1;
}

/* Request k's entry, or NULL; `ref` (if not NULL) gets where it lies, to free it. */
static __always_inline struct req_val *req_find(struct req_key *k, struct req_ref *ref)
{
    u64 tag;
    struct req_bucket *b = bucket_of(k, &tag);
    if (!b)
        return NULL;
    int way = way_of(b, tag, k);
    if (way < 0)
        return NULL;
    u32 i = way & (WAYS - 1);
    if (ref) {
        ref->b = b;
        ref->way = i;
    }
    return &b->val[i];
}

static __always_inline void req_free(struct req_ref *ref)
{
    *(volatile u64 *)&ref->b->tag[ref->way & (WAYS - 1)] = TAG_FREE;
}

/* Copy request k's entry to *out and free it; 0 if k is not tracked. */
static __always_inline int req_take(struct req_key *k, struct req_val *out)
{
    struct req_ref ref = {};
    struct req_val *v = req_find(k, &ref);
    if (!v)
        return 0;
    *out = *v;
    req_free(&ref);
    return 1;
}

/* A way of b made busy for a new entry: a free one, else one whose request has not
 * completed in STALE_NS (counted in `expired`); -1 if none. */
static __always_inline int claim(struct req_bucket *b)
{
#pragma unroll
    for (int i = 0; i < WAYS; i++)
        if (b->tag[i] == TAG_FREE && __sync_val_compare_and_swap(&b->tag[i], TAG_FREE, TAG_BUSY) == TAG_FREE)
            return i;
    u64 now = bpf_ktime_get_ns();
#pragma unroll
    for (int i = 0; i < WAYS; i++) {
        u64 tag = b->tag[i];
        u64 last = b->val[i].issue_ts > b->val[i].queue_ts ? b->val[i].issue_ts : b->val[i].queue_ts;
        if (tag > TAG_BUSY && now - last > STALE_NS &&
            __sync_val_compare_and_swap(&b->tag[i], tag, TAG_BUSY) == tag) {
            u32 zero = 0;
            u64 *n = expired.lookup(&zero);
            if (n)
                __sync_fetch_and_add(n, 1);
            return i;
        }
    }
    return -1;
}

/* Track request k; an entry for the same (dev, sector) is replaced, as a map update would.
 * A request that finds its bucket full is counted in overflow, unless `retry` says it is a
 * second try (issue_only: the miss at queue, if any, was counted then). */
static __always_inline int track(struct req_key *k, struct req_val *v, int retry)
{
    u64 tag;
    struct req_bucket *b = bucket_of(k, &tag);
    if (!b)
        return 0;
    v->dev = k->dev;
    v->sector = k->sector;
    int way = way_of(b, tag, k);
    if (way < 0)
        way = claim(b);
    if (way < 0) {
        if (!retry)
            overflowed(OVF_START);
        return 0;
    }
    u32 i = way & (WAYS - 1);
    b->val[i] = *v;
    asm volatile("" ::: "memory");      /* the entry before its tag (x86 keeps store order) */
    *(volatile u64 *)&b->tag[i] = tag;
    return 1;
}

static __always_inline s64 inflight_add(u32 devslot, s64 delta)
{
    struct inflight_count *c = inflight.lookup(&devslot);
    if (!c)
        return 0;
    return __sync_fetch_and_add(&c->n, delta) + delta;
}

/* A histogram slot that is below `slots`; the empty asm keeps the compiler from dropping
 * the bound check where it knows better than the verifier (e.g. small sizes). */
static __always_inline u64 clamp_slot(u64 v, u64 slots)
{
    u64 s = hist_slot(v);
    asm volatile("" : "+r"(s));
    return s < slots ? s : slots - 1;
}

TRACEPOINT_PROBE(block, block_bio_queue)
{
    struct req_val v = {};
    if (!attribute_bio(&v, args->dev, op_of(args->rwbs, args->nr_sector)))
        return 0;
    struct req_key k = req_key_of(args->dev, args->sector, args->nr_sector);
    v.queue_ts = bpf_ktime_get_ns();
    track(&k, &v, 0);
    return 0;
}

/* Count a merge of a bio queued on `dev` for its VM. */
static __always_inline void count_merge(struct req_val *v, int front)
{
    struct row_stats *s = stats_of(v->row);
    if (!s)
        return;
    if (front)
        s->frontmerges++;
    else
        s->backmerges++;
}

/* A bio appended to a request already queued: it completes as part of that request. */
TRACEPOINT_PROBE(block, block_bio_backmerge)
{
    struct req_val mine = {};
    if (!attribute_bio(&mine, args->dev, op_of(args->rwbs, args->nr_sector)))
        return 0;
    struct req_key k = req_key_of(args->dev, args->sector, args->nr_sector);
    struct req_val gone;
    req_take(&k, &gone);
    count_merge(&mine, 0);
    return 0;
}

/* A bio prepended to a request: the request now starts (and completes) at the bio's
 * sector; it keeps the older request's start time. */
TRACEPOINT_PROBE(block, block_bio_frontmerge)
{
    struct req_val mine = {};
    if (!attribute_bio(&mine, args->dev, op_of(args->rwbs, args->nr_sector)))
        return 0;
    struct req_key old = req_key_of(args->dev, args->sector + args->nr_sector, args->nr_sector);
    struct req_val keep;
    if (req_take(&old, &keep)) {
        struct req_key k = req_key_of(args->dev, args->sector, args->nr_sector);
        track(&k, &keep, 0);
    }
    count_merge(&mine, 1);
    return 0;
}

/* A request merged into another one in the scheduler: it never completes itself. */
TRACEPOINT_PROBE(block, block_rq_merge)
{
    struct req_key k = req_key_of(args->dev, args->sector, args->nr_sector);
    struct req_val v;
    if (!req_take(&k, &v))
        return 0;
    struct row_stats *s = stats_of(v.row);
    if (s)
        s->rq_merges++;
    return 0;
}

/* Stacked devices (dm) move a bio to another device and sector without a new queue
 * event: from there on it counts under the new device. */
TRACEPOINT_PROBE(block, block_bio_remap)
{
    struct req_key old = req_key_of(args->old_dev, args->old_sector, args->nr_sector);
    struct req_val moved;
    if (!req_take(&old, &moved))
        return 0;
    struct req_key k = req_key_of(args->dev, args->sector, args->nr_sector);
    if (attribute(&moved, moved.tgid, args->dev, moved.op))
        track(&k, &moved, 0);
    return 0;
}

/* ALL_IO: a request not queued while we traced (or a flush machinery request) is
 * tracked from its issue, as not a VM's. */
static __always_inline struct req_val *issue_only(struct req_key *k, u32 dev, u8 op)
{
#if ALL_IO
    if (FILTER_DEV && !devs.lookup(&dev))
        return NULL;
    struct req_val fresh = {};
    if (!attribute(&fresh, 0, dev, op))
        return NULL;
    if (!track(k, &fresh, 1))
        return NULL;
    return req_find(k, NULL);
#else
    return NULL;
#endif
}

TRACEPOINT_PROBE(block, block_rq_issue)
{
    struct req_key k = req_key_of(args->dev, args->sector, args->nr_sector);
    struct req_val *v = req_find(&k, NULL);
    if (!v) {
        v = issue_only(&k, args->dev, op_of(args->rwbs, args->nr_sector));
        if (!v)
            return 0;
    }
    v->issue_ts = bpf_ktime_get_ns();
    if (v->issued)
        return 0;
    v->issued = 1;
    s64 depth = inflight_add(v->devslot, 1);
    struct row_stats *s = stats_of(v->row);
    if (s)
        s->depth[clamp_slot(depth > 0 ? depth : 0, DEPTH_SLOTS)]++;
    return 0;
}

/* The driver gives a request back; it will be issued again. */
TRACEPOINT_PROBE(block, block_rq_requeue)
{
    struct req_key k = req_key_of(args->dev, args->sector, args->nr_sector);
    struct req_val *v = req_find(&k, NULL);
    if (!v)
        return 0;
    if (v->issued) {
        v->issued = 0;
        inflight_add(v->devslot, -1);
    }
    struct row_stats *s = stats_of(v->row);
    if (s)
        s->requeues++;
    return 0;
}

TRACEPOINT_PROBE(block, block_rq_complete)
{
    struct req_key k = req_key_of(args->dev, args->sector, args->nr_sector);
    struct req_val v;
    if (!req_take(&k, &v))
        return 0;
    u64 now = bpf_ktime_get_ns();
    if (v.issued)
        inflight_add(v.devslot, -1);
    struct row_stats *s = stats_of(v.row);
    if (!s)
        return 0;
    if (v.queue_ts)
        s->queue[clamp_slot(now - v.queue_ts, LAT_SLOTS)]++;
    if (v.issued)
        s->issue[clamp_slot(now - v.issue_ts, LAT_SLOTS)]++;
    u64 bytes = (u64)args->nr_sector << 9;
    s->size[clamp_slot(bytes, SIZE_SLOTS)]++;
    s->bytes += bytes;
    if (args->error)
        s->errors++;
    return 0;
}
