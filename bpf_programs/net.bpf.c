/* net.bpf.c — per-device packets/bytes, bridge forwards and skb drops for VM taps and bridges.
 *
 * Attach method: tracepoints only (net:netif_receive_skb, net:net_dev_queue, net:net_dev_xmit,
 * skb:kfree_skb, skb:consume_skb).  Device names (tracepoint `__data_loc char[] name`) are read
 * into a fixed 16-byte key and looked up in `traced_devs` (name -> small id, filled from the
 * inventory): a miss is the only work done for other devices.  Names are per network
 * namespace, so two namespaces' devices with one name are counted together.
 *
 * An skb seen on a traced device is remembered in `seen` (bounded LRU, keyed by skbaddr) until
 * it is freed: a transmit on another traced device of an skb received on a traced one is a
 * bridge forward, and a kfree_skb of a remembered skb is a drop on a VM's path (reason and
 * code location kept).
 *
 * Map methods are written out in functions: bcc 0.26 refuses them inside macros (COUNT_ADD).
 */
#include "kvmbpf.h"

#ifndef SEEN_MAX
#define SEEN_MAX 16384
#endif
#define ETH_HLEN 14
#define IFNAMSIZ 16

/* skb:kfree_skb's `reason` field has this type; no header is included for it (the headers do
 * not match the kernel), so complete it here: only its size (an int) matters. */
enum skb_drop_reason { KVMBPF_DROP_REASON_INT };

/* counter kinds of `traffic` (mirrored in kvmbpf/collectors/net.py) */
#define RX_PACKETS 0
#define RX_BYTES 1
#define TX_PACKETS 2
#define TX_BYTES 3
#define TX_FAILED 4

struct devname {
    char name[IFNAMSIZ];
};

struct seen_t {
    u32 origin;     /* first traced device the skb was seen on */
    u32 rx_dev;     /* last traced device that received it (0: never received) */
    u32 last;       /* last traced device it was seen on */
};

struct traffic_key {
    u32 dev;
    u32 kind;
};

struct fwd_key {
    u32 in_dev;
    u32 out_dev;
};

struct drop_key {
    u32 origin;
    u32 last;
    u64 location;
    u32 reason;
};

BPF_HASH(traced_devs, struct devname, u32, 1024);
BPF_TABLE("lru_hash", u64, struct seen_t, seen, SEEN_MAX);
BPF_PERCPU_HASH(traffic, struct traffic_key, u64, 4096);
BPF_PERCPU_HASH(forwards, struct fwd_key, u64, 4096);
BPF_PERCPU_HASH(drops, struct drop_key, u64, 4096);
KVMBPF_OVERFLOW_MAP

/* The traced-device id of a tracepoint's `name` field at args + (data_loc & 0xffff), or 0. */
static __always_inline u32 dev_id(void *args, u32 data_loc)
{
    struct devname k = {};
    bpf_probe_read_str(k.name, sizeof(k.name), (char *)args + (data_loc & 0xffff));
    u32 *id = traced_devs.lookup(&k);
    return id ? *id : 0;
}

/* Add n to a counter from lookup_or_try_init; NULL (map full) is counted as overflow. */
static __always_inline void bump(u64 *c, u64 n)
{
    if (c) {
        *c += n;
        return;
    }
    int idx = 0;
    u64 *o = overflow.lookup(&idx);
    if (o)
        (*o)++;
}

static __always_inline void add(u32 dev, u32 kind, u64 n)
{
    struct traffic_key k = {.dev = dev, .kind = kind};
    u64 zero = 0;
    bump(traffic.lookup_or_try_init(&k, &zero), n);
}

/* Remember an skb on device `dev`; rx: the device received it. */
static __always_inline void remember(u64 skb, u32 dev, int rx)
{
    struct seen_t *s = seen.lookup(&skb);
    if (s) {
        s->last = dev;
        if (rx)
            s->rx_dev = dev;
        return;
    }
    struct seen_t n = {.origin = dev, .rx_dev = rx ? dev : 0, .last = dev};
    seen.update(&skb, &n);
}

/* Device `dev` received an skb from its far side (a tap: from the guest). len excludes the
 * Ethernet header, already pulled by eth_type_trans(). */
TRACEPOINT_PROBE(net, netif_receive_skb)
{
    u32 dev = dev_id(args, args->data_loc_name);
    if (!dev)
        return 0;
    add(dev, RX_PACKETS, 1);
    add(dev, RX_BYTES, args->len + ETH_HLEN);
    remember((u64)args->skbaddr, dev, 1);
    return 0;
}

/* An skb queued for transmission on a device: a forward if a traced device received it. */
TRACEPOINT_PROBE(net, net_dev_queue)
{
    u32 dev = dev_id(args, args->data_loc_name);
    if (!dev)
        return 0;
    u64 skb = (u64)args->skbaddr;
    struct seen_t *s = seen.lookup(&skb);
    if (s && s->rx_dev && s->rx_dev != dev) {
        struct fwd_key k = {.in_dev = s->rx_dev, .out_dev = dev};
        u64 zero = 0;
        bump(forwards.lookup_or_try_init(&k, &zero), 1);
    }
    remember(skb, dev, 0);
    return 0;
}

/* The driver's verdict on a transmit (a tap: to the guest); rc != 0 (tun: NET_XMIT_DROP when
 * the queue towards the guest is full) counts as failed. */
TRACEPOINT_PROBE(net, net_dev_xmit)
{
    u32 dev = dev_id(args, args->data_loc_name);
    if (!dev)
        return 0;
    if (args->rc) {
        add(dev, TX_FAILED, 1);
        return 0;
    }
    add(dev, TX_PACKETS, 1);
    add(dev, TX_BYTES, args->len);
    return 0;
}

TRACEPOINT_PROBE(skb, kfree_skb)
{
    u64 skb = (u64)args->skbaddr;
    struct seen_t *s = seen.lookup(&skb);
    if (!s)
        return 0;
    struct drop_key k = {.origin = s->origin, .last = s->last,
                         .location = (u64)args->location, .reason = args->reason};
    u64 zero = 0;
    bump(drops.lookup_or_try_init(&k, &zero), 1);
    seen.delete(&skb);
    return 0;
}

/* A normally freed skb: forget it, so its address can be reused without a false forward. */
TRACEPOINT_PROBE(skb, consume_skb)
{
    u64 skb = (u64)args->skbaddr;
    seen.delete(&skb);
    return 0;
}
