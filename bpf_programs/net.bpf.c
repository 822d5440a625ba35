/* net.bpf.c — per-device packets/bytes, bridge forwards and skb drops for VM taps and bridges.
 *
 * Attach method: tracepoints only (net:netif_receive_skb, net:net_dev_queue, net:net_dev_xmit,
 * skb:kfree_skb, skb:consume_skb).  Device names (tracepoint `__data_loc char[] name`) are read
 * into a fixed 16-byte key and looked up in `traced_devs` (name -> small id, filled from the
 * inventory): a miss is the only work done for other devices.  Names are per network
 * namespace, so two namespaces' devices with one name are counted together.
 *
 * Cost (every hash map operation is ~20-60 ns on the measured host, an array lookup is inlined
 * and costs a few): the name's id comes from a small per-CPU direct-mapped cache keyed by the
 * name itself (so a hit means exactly what a `traced_devs` lookup would say), valid while
 * `filter_gen` (bumped by Python after every filter refresh) is unchanged; a device's rx/tx
 * and protocol counters are one struct in a per-CPU array indexed by its id.  Per-CPU, so no
 * torn cache entries: the kernel never nests two tracepoint programs on one CPU.
 *
 * An skb seen on a traced device is remembered in `seen` until it is freed: a transmit on
 * another traced device of an skb received on a traced one is a bridge forward, and a
 * kfree_skb of a remembered skb is a drop on a VM's path (reason and code location kept).
 * `seen` is a direct-mapped array indexed by a hash of skbaddr, the address stored in the slot
 * (an LRU hash insert and delete per skb cost more than all the rest): an skb whose slot
 * another live one takes is forgotten, as the LRU forgot its oldest; SEEN_BITS keeps that rare
 * (slots >> skbs of traced devices in flight).  Shared by all CPUs (an skb is freed where it
 * may not have been received); two CPUs writing one slot for two skbs at the same instant
 * could mix their entries — as rare as the collision itself, and at worst one skb mislabelled.
 *
 * Map methods are written out in functions: bcc 0.26 refuses them inside macros (COUNT_ADD).
 *
 * Protocol view (with -DSKB_HEAD_OFF etc., offsets from the kernel's BTF, never from headers):
 * on a traced device only, the frame's first bytes are read with bpf_probe_read_kernel and
 * classified (ARP, IPv6, ICMP, DNS, DHCP with its option-53 message type, other UDP/TCP/IPv4,
 * other).  Received: the frame starts at head + mac_header (eth_type_trans() already moved
 * data past the Ethernet header); queued for transmit: at data (__dev_queue_xmit() has just
 * reset mac_header to it).  Reads stay below head + tail (the linear part).
 *
 * Forward latency: the time from an skb's receive on a traced device (or, with DEEP_PROBES,
 * from the tun_get_user() call that built it) to its successful transmit on another one.
 *
 * DEEP_PROBES (kprobes, or fentry with DEEP_FENTRY): per-function call counts in tun and the
 * bridge, per traced device; the device comes from skb->dev or a net_device argument, read
 * at BTF offsets (SKB_DEV_OFF, NETDEV_NAME_OFF).
 */
#include "kvmbpf.h"
#ifdef DEEP_PROBES
#include <uapi/linux/ptrace.h>      /* struct pt_regs (kprobes): a stable user ABI layout */
#endif

#ifndef SEEN_BITS
#define SEEN_BITS 14
#endif
#ifndef MAX_DEVS
#define MAX_DEVS 1024       /* device ids (Python's, from 1) below this are counted */
#endif
#define DEV_CACHE_BITS 6
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
    u64 skb;        /* skbaddr this slot holds (0: free) */
    u32 origin;     /* first traced device the skb was seen on */
    u32 rx_dev;     /* last traced device that received it (0: never received) */
    u32 last;       /* last traced device it was seen on */
    u32 start;      /* what rx_ts marks: START_RECEIVE or START_TUN_GET_USER */
    u64 rx_ts;      /* when it entered rx_dev */
    u32 proto;      /* protocol class + 1 from the first traced receive (0: not classified) */
    u32 dhcp;       /* its DHCP message type */
};

#define START_RECEIVE 0
#define START_TUN_GET_USER 1

struct lat_key {
    u32 in_dev;
    u32 out_dev;
    u32 start;
    u32 slot;
};

#define PROTO_CLASSES 9     /* P_* below */

/* A device's counters: traffic by kind (RX_PACKETS...), and frames by direction (0: received,
 * 1: queued for transmit) and protocol class (DHCP: in `protos`, by message type). */
struct traffic_t {
    u64 n[5];
    u64 proto[2 * PROTO_CLASSES];   /* [dir * PROTO_CLASSES + class] */
};

/* A cached name -> id of traced_devs (id 0: not traced), valid in generation gen. */
struct dev_cache_t {
    u64 name[2];
    u32 id;
    u32 gen;
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
BPF_ARRAY(filter_gen, u32, 1);
BPF_PERCPU_ARRAY(dev_cache, struct dev_cache_t, 1 << DEV_CACHE_BITS);
BPF_ARRAY(seen, struct seen_t, 1 << SEEN_BITS);
BPF_PERCPU_ARRAY(traffic, struct traffic_t, MAX_DEVS);
BPF_PERCPU_HASH(forwards, struct fwd_key, u64, 4096);
BPF_PERCPU_HASH(drops, struct drop_key, u64, 4096);
BPF_PERCPU_HASH(latency, struct lat_key, u64, 8192);
KVMBPF_OVERFLOW_MAP

/* The traced-device id of a tracepoint's `name` field at args + (data_loc & 0xffff), or 0:
 * from dev_cache when it holds this name in the current generation, else from traced_devs. */
static __always_inline u32 dev_id(void *args, u32 data_loc)
{
    struct devname k = {};
    u32 len = (data_loc >> 16) - 1;     /* the name's length (data_loc's counts its NUL) */
    u64 n0 = 0, n1 = 0;
    /* a fixed-size read (cheaper than a string read), bytes past the name cleared */
    bpf_probe_read_kernel(k.name, sizeof(k.name), (char *)args + (data_loc & 0xffff));
    __builtin_memcpy(&n0, k.name, 8);
    __builtin_memcpy(&n1, k.name + 8, 8);
    if (len < 8) {
        n0 &= (1ULL << (len * 8)) - 1;
        n1 = 0;
    } else if (len < 16) {
        n1 &= (1ULL << ((len - 8) * 8)) - 1;
    }
    u32 idx = ((n0 ^ n1) * 0x9E3779B97F4A7C15ULL) >> (64 - DEV_CACHE_BITS), zero = 0;
    u32 *genp = filter_gen.lookup(&zero);
    struct dev_cache_t *c = dev_cache.lookup(&idx);
    if (!genp || !c)
        return 0;
    u32 gen = *genp;            /* read before traced_devs: a later change invalidates */
    if (c->gen == gen && c->name[0] == n0 && c->name[1] == n1)
        return c->id;
    __builtin_memcpy(k.name, &n0, 8);
    __builtin_memcpy(k.name + 8, &n1, 8);
    u32 *id = traced_devs.lookup(&k);
    c->name[0] = n0;
    c->name[1] = n1;
    c->id = id ? *id : 0;
    c->gen = gen;
    return c->id;
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

/* Add a packet of `bytes` to counters (kind) and (kind + 1) of dev; an id beyond the array
 * is counted as overflow. */
static __always_inline void add(u32 dev, u32 kind, u64 bytes)
{
    struct traffic_t *t = traffic.lookup(&dev);
    if (t) {
        t->n[kind]++;
        t->n[kind + 1] += bytes;
        return;
    }
    bump(0, 1);
}

/* The slot of skb in `seen`, and whether it holds skb (*s: the slot, NULL if none). */
static __always_inline int seen_slot(u64 skb, struct seen_t **s)
{
    u32 idx = (skb * 0x9E3779B97F4A7C15ULL) >> (64 - SEEN_BITS);
    *s = seen.lookup(&idx);
    return *s && (*s)->skb == skb;
}

/* Remember skb (slot s; hit: s holds it) on device `dev`; rx: the device received it, at
 * rx_ts (from `start`). */
static __always_inline void remember(struct seen_t *s, int hit, u64 skb, u32 dev, int rx,
                                     u64 rx_ts, u32 start)
{
    if (!s)
        return;
    if (!hit) {
        s->skb = skb;
        s->origin = dev;
        s->rx_dev = 0;
        s->rx_ts = 0;
        s->start = 0;
        s->proto = 0;
        s->dhcp = 0;
    }
    s->last = dev;
    if (rx) {
        s->rx_dev = dev;
        s->rx_ts = rx_ts;
        s->start = start;
    }
}

#ifdef SKB_HEAD_OFF
/* protocol classes of `protos` (mirrored in kvmbpf/collectors/net.py PROTOS) */
#define P_OTHER 0
#define P_ARP 1
#define P_IPV6 2
#define P_ICMP 3
#define P_DNS 4
#define P_DHCP 5
#define P_UDP 6
#define P_TCP 7
#define P_IPV4 8
#ifndef DHCP_OPTIONS
#define DHCP_OPTIONS 8      /* options looked at for option 53 (it is usually the first) */
#endif

struct proto_key {
    u32 dev;
    u32 dir;        /* 0: received by the device, 1: queued for transmit on it */
    u32 proto;
    u32 dhcp;       /* DHCP message type (option 53), 0 if not DHCP or not found */
};

BPF_PERCPU_HASH(protos, struct proto_key, u64, 4096);    /* DHCP frames only */

/* The DHCP message type (option 53) of the BOOTP message whose UDP header is at `udp`. */
static __always_inline u32 dhcp_type(u64 udp, u64 end)
{
    u64 o = udp + 8 + 236;              /* UDP header, fixed BOOTP fields */
    u32 cookie = 0;
    if (o + 4 > end)
        return 0;
    bpf_probe_read_kernel(&cookie, 4, (void *)o);
    if (cookie != 0x63538263)           /* 99.130.83.99, read little-endian */
        return 0;
    o += 4;
#pragma unroll
    for (int i = 0; i < DHCP_OPTIONS; i++) {
        u8 opt[3] = {};
        if (o + 3 > end)
            return 0;
        bpf_probe_read_kernel(opt, 3, (void *)o);
        if (opt[0] == 53)
            return opt[1] == 1 ? opt[2] : 0;
        if (opt[0] == 255)
            return 0;
        o += opt[0] == 0 ? 1 : 2 + opt[1];
    }
    return 0;
}

/* Classify the Ethernet frame in [p, end); *vlan: it is 802.1Q/802.1ad-tagged. */
static __always_inline u32 classify(u64 p, u64 end, u32 *dhcp, int *vlan)
{
    u8 eth[14] = {};
    if (p + 14 > end)
        return P_OTHER;
    bpf_probe_read_kernel(eth, 14, (void *)p);
    u16 type = (eth[12] << 8) | eth[13];
    *vlan = type == 0x8100 || type == 0x88A8;
    if (type == 0x0806)
        return P_ARP;
    if (type == 0x86DD)
        return P_IPV6;
    if (type != 0x0800)
        return P_OTHER;
    u8 ip[20] = {};
    p += 14;
    if (p + 20 > end)
        return P_IPV4;
    bpf_probe_read_kernel(ip, 20, (void *)p);
    u32 ihl = (ip[0] & 0xf) * 4;
    if (ip[9] == 1)
        return P_ICMP;
    if ((ip[9] != 6 && ip[9] != 17) || ihl < 20 || (ip[6] & 0x1f) || ip[7])
        return P_IPV4;                  /* not TCP/UDP, or a later fragment (no ports) */
    u8 ports[4] = {};
    p += ihl;
    if (p + 4 > end)
        return P_IPV4;
    bpf_probe_read_kernel(ports, 4, (void *)p);
    u16 sport = (ports[0] << 8) | ports[1], dport = (ports[2] << 8) | ports[3];
    if (sport == 53 || dport == 53)
        return P_DNS;
    if (ip[9] == 6)
        return P_TCP;
    if ((sport == 67 || sport == 68) && (dport == 67 || dport == 68)) {
        *dhcp = dhcp_type(p, end);
        return P_DHCP;
    }
    return P_UDP;
}

/* Count a classified frame: in the device's traffic struct, DHCP (by message type) in
 * `protos`; a device id beyond the array is counted as overflow. */
static __always_inline void count_class(struct proto_key *k)
{
    struct traffic_t *t = traffic.lookup(&k->dev);
    u32 p = k->proto;
    if (p != P_DHCP && t && p < PROTO_CLASSES) {
        t->proto[(k->dir & 1) * PROTO_CLASSES + p]++;
        return;
    }
    u64 zero = 0;
    bump(t ? protos.lookup_or_try_init(k, &zero) : 0, 1);
}

/* Count the frame of skb on dev; rx: received (frame at head + mac_header), else at data.
 * A received skb is classified once, on its first traced device, and the class kept in its
 * `seen` slot s: a bridge receives the frame its port received, unchanged (unless tagged:
 * the bridge sees it untagged, so a tagged frame is classified again). */
static __always_inline void count_proto(u64 skb, u32 dev, int rx, struct seen_t *s)
{
    struct proto_key k = {.dev = dev, .dir = rx ? 0 : 1};
    if (rx && s && s->proto) {
        k.proto = s->proto - 1;
        k.dhcp = s->dhcp;
        count_class(&k);
        return;
    }
    u64 head = 0, data = 0;
    u32 tail = 0;
    u16 mac = 0;
    bpf_probe_read_kernel(&head, 8, (void *)(skb + SKB_HEAD_OFF));
    bpf_probe_read_kernel(&tail, 4, (void *)(skb + SKB_TAIL_OFF));
    if (rx) {
        bpf_probe_read_kernel(&mac, 2, (void *)(skb + SKB_MAC_OFF));
        data = mac == 0xffff ? 0 : head + mac;
    } else {
        bpf_probe_read_kernel(&data, 8, (void *)(skb + SKB_DATA_OFF));
    }
    int vlan = 1;
    if (head && data)
        k.proto = classify(data, head + tail, &k.dhcp, &vlan);
    if (rx && s && !vlan) {
        s->proto = k.proto + 1;
        s->dhcp = k.dhcp;
    }
    count_class(&k);
}
#else
static __always_inline void count_proto(u64 skb, u32 dev, int rx, struct seen_t *s) {}
#endif

#ifdef DEEP_PROBES
/* functions of `calls` (mirrored in kvmbpf/collectors/net.py DEEP_FUNCTIONS) */
#define F_TUN_GET_USER 0
#define F_BR_HANDLE_FRAME 1
#define F_BR_FORWARD 2
#define F_DEV_QUEUE_XMIT 3
#define F_BR_DEV_XMIT 4
#define F_TUN_NET_XMIT 5

struct call_key {
    u32 dev;
    u32 fn;
};

BPF_PERCPU_HASH(calls, struct call_key, u64, 1024);
BPF_TABLE("lru_hash", u32, u64, tun_entry, 4096);   /* tid -> tun_get_user() entry time */

/* One call of deep-probe function fn on traced device dev (0: not a traced device). */
static __always_inline int count_call(u32 dev, u32 fn)
{
    if (!dev)
        return 0;
    struct call_key k = {.dev = dev, .fn = fn};
    u64 zero = 0;
    bump(calls.lookup_or_try_init(&k, &zero), 1);
    return 0;
}

/* The traced-device id of a struct net_device *, or 0. */
static __always_inline u32 netdev_id(u64 netdev)
{
    struct devname k = {};
    if (!netdev)
        return 0;
    bpf_probe_read_kernel_str(k.name, sizeof(k.name), (void *)(netdev + NETDEV_NAME_OFF));
    u32 *id = traced_devs.lookup(&k);
    return id ? *id : 0;
}

static __always_inline u32 skb_dev_id(u64 skb)
{
    u64 netdev = 0;
    bpf_probe_read_kernel(&netdev, 8, (void *)(skb + SKB_DEV_OFF));
    return netdev_id(netdev);
}

/* The thread is about to build an skb from what its VMM wrote: which tap is known at its
 * netif_receive_skb, where the call is counted. */
static __always_inline int on_tun_get_user(u64 a0, u64 a1)
{
    u32 tid = current_tid();
    u64 now = bpf_ktime_get_ns();
    tun_entry.update(&tid, &now);
    return 0;
}

static __always_inline int on_br_handle_frame(u64 pskb, u64 a1)
{
    u64 skb = 0;
    bpf_probe_read_kernel(&skb, 8, (void *)pskb);
    return count_call(skb ? skb_dev_id(skb) : 0, F_BR_HANDLE_FRAME);
}

/* br_forward(to, skb, ...): skb->dev is still the ingress port */
static __always_inline int on_br_forward(u64 to, u64 skb)
{
    return count_call(skb_dev_id(skb), F_BR_FORWARD);
}

static __always_inline int on_dev_queue_xmit(u64 skb, u64 a1)
{
    return count_call(skb_dev_id(skb), F_DEV_QUEUE_XMIT);
}

static __always_inline int on_br_dev_xmit(u64 skb, u64 netdev)
{
    return count_call(netdev_id(netdev), F_BR_DEV_XMIT);
}

static __always_inline int on_tun_net_xmit(u64 skb, u64 netdev)
{
    return count_call(netdev_id(netdev), F_TUN_NET_XMIT);
}

#if DEEP_FENTRY
#define DEEP_PROBE(fn, handler) KFUNC_PROBE(fn) { return handler(ctx[0], ctx[1]); }
#else
#define DEEP_PROBE(fn, handler) \
    int deep_##fn(struct pt_regs *ctx) { return handler(PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx)); }
#endif
DEEP_PROBE(tun_get_user, on_tun_get_user)
DEEP_PROBE(br_handle_frame, on_br_handle_frame)
DEEP_PROBE(br_forward, on_br_forward)
#if DEV_QUEUE_XMIT_INLINE                /* 5.19+: dev_queue_xmit() is an inline wrapper */
DEEP_PROBE(__dev_queue_xmit, on_dev_queue_xmit)
#else
DEEP_PROBE(dev_queue_xmit, on_dev_queue_xmit)
#endif
DEEP_PROBE(br_dev_xmit, on_br_dev_xmit)
DEEP_PROBE(tun_net_xmit, on_tun_net_xmit)

/* When this thread is in tun_get_user() (its netif_receive_skb is synchronous): count the
 * call on dev and return its entry time as the skb's start. */
static __always_inline u32 tun_start(u32 dev, u64 *ts)
{
    u32 tid = current_tid();
    u64 *entry = tun_entry.lookup(&tid);
    if (!entry)
        return START_RECEIVE;
    *ts = *entry;
    tun_entry.delete(&tid);
    count_call(dev, F_TUN_GET_USER);
    return START_TUN_GET_USER;
}
#else
static __always_inline u32 tun_start(u32 dev, u64 *ts) { return START_RECEIVE; }
#endif

/* Device `dev` received an skb from its far side (a tap: from the guest). len excludes the
 * Ethernet header, already pulled by eth_type_trans(). */
TRACEPOINT_PROBE(net, netif_receive_skb)
{
    u32 dev = dev_id(args, args->data_loc_name);
    if (!dev)
        return 0;
    add(dev, RX_PACKETS, args->len + ETH_HLEN);
    u64 skb = (u64)args->skbaddr;
    struct seen_t *s;
    int hit = seen_slot(skb, &s);
    u64 ts = bpf_ktime_get_ns();
    u32 start = tun_start(dev, &ts);
    remember(s, hit, skb, dev, 1, ts, start);
    count_proto(skb, dev, 1, s);
    return 0;
}

/* An skb queued for transmission on a device: a forward if a traced device received it. */
TRACEPOINT_PROBE(net, net_dev_queue)
{
    u32 dev = dev_id(args, args->data_loc_name);
    if (!dev)
        return 0;
    u64 skb = (u64)args->skbaddr;
    struct seen_t *s;
    int hit = seen_slot(skb, &s);
    if (hit && s->rx_dev && s->rx_dev != dev) {
        struct fwd_key k = {.in_dev = s->rx_dev, .out_dev = dev};
        u64 zero = 0;
        bump(forwards.lookup_or_try_init(&k, &zero), 1);
    }
    count_proto(skb, dev, 0, 0);
    remember(s, hit, skb, dev, 0, 0, 0);
    return 0;
}

/* The driver's verdict on a transmit (a tap: to the guest); rc != 0 (tun: NET_XMIT_DROP when
 * the queue towards the guest is full) counts as failed.  A success of an skb another traced
 * device received ends a forward latency (missed when the reader freed it first: tun hands
 * the skb to the VMM's thread before this tracepoint). */
TRACEPOINT_PROBE(net, net_dev_xmit)
{
    u32 dev = dev_id(args, args->data_loc_name);
    if (!dev)
        return 0;
    if (args->rc) {
        struct traffic_t *t = traffic.lookup(&dev);
        if (t)
            t->n[TX_FAILED]++;
        else
            bump(0, 1);
        return 0;
    }
    add(dev, TX_PACKETS, args->len);
    u64 skb = (u64)args->skbaddr;
    struct seen_t *s;
    if (seen_slot(skb, &s) && s->rx_dev && s->rx_dev != dev && s->rx_ts) {
        struct lat_key k = {.in_dev = s->rx_dev, .out_dev = dev, .start = s->start};
        k.slot = hist_slot(bpf_ktime_get_ns() - s->rx_ts);
        u64 zero = 0;
        bump(latency.lookup_or_try_init(&k, &zero), 1);
    }
    return 0;
}

TRACEPOINT_PROBE(skb, kfree_skb)
{
    u64 skb = (u64)args->skbaddr;
    struct seen_t *s;
    if (!seen_slot(skb, &s))
        return 0;
    struct drop_key k = {.origin = s->origin, .last = s->last,
                         .location = (u64)args->location, .reason = args->reason};
    s->skb = 0;
    u64 zero = 0;
    bump(drops.lookup_or_try_init(&k, &zero), 1);
    return 0;
}

/* A normally freed skb: forget it, so its address can be reused without a false forward. */
TRACEPOINT_PROBE(skb, consume_skb)
{
    u64 skb = (u64)args->skbaddr;
    struct seen_t *s;
    if (seen_slot(skb, &s))
        s->skb = 0;
    return 0;
}
