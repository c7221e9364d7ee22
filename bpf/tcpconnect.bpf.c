// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Counts TCP connects per process, and how and how fast each one ended.
 *
 * Connect (one of four interchangeable hooks; the loader enables exactly one):
 * counts the attempt per PID, per comm and per (cgroup, comm), and remembers
 * the socket's start.  Outcome (inet_sock_set_state leaving SYN_SENT): adds the
 * result and the latency to the socket's (cgroup, comm).  The tp_btf and
 * tracepoint connect programs sit on that same hook and do both; fentry and
 * kprobe get an outcome program beside them.  Exit: the last thread of a
 * process drops its PID, so a reused PID starts at zero.
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "tcpmon.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* max_entries are defaults; the loader resizes them before load. */
#define TCPMON_DEFINE_MAP(name_, type_, key_, value_, max_) \
	struct {                                           \
		__uint(type, BPF_MAP_TYPE_##type_);        \
		__uint(max_entries, max_);                 \
		__type(key, key_);                         \
		__type(value, value_);                     \
	} name_ SEC(".maps");
TCPMON_MAPS(TCPMON_DEFINE_MAP)

/* The only read-only data: the loader fills it in, the verifier then prunes
 * what it turns off. */
const volatile struct tcpmon_config config = {};

/* Initial values of new entries, too big for the BPF stack. */
static struct tcpmon_outcome_value zero_outcome;

static __always_inline void count_failure(__u32 slot)
{
	struct tcpmon_counter *failures = bpf_map_lookup_elem(&update_failures, &slot);

	if (failures)
		failures->count += 1; /* per-CPU slot: no atomic needed */
}

/* The entry under `key`, inserted from `init` if there is none yet; NULL (and
 * a counted failure) when the map is full.  The one place that handles the race
 * of two CPUs inserting the same key. */
static __always_inline void *lookup_or_init(void *map, const void *key, const void *init, __u32 slot)
{
	void *value = bpf_map_lookup_elem(map, key);

	if (value)
		return value;
	bpf_map_update_elem(map, key, init, BPF_NOEXIST); /* EEXIST: another CPU was first */
	value = bpf_map_lookup_elem(map, key);
	if (!value)
		count_failure(slot);
	return value;
}

static __always_inline bool same_comm(const char *a, const char *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;

	return x[0] == y[0] && x[1] == y[1];
}

static __always_inline void copy_comm(char *to, const char *from)
{
	__builtin_memcpy(to, from, TCPMON_COMM_LEN);
}

static __always_inline void count_pid(__u32 tgid, const struct tcpmon_comm_key *comm)
{
	struct tcpmon_pid_key key = { .tgid = tgid };
	struct tcpmon_pid_value first = {}, *value;

	copy_comm(first.comm, comm->comm);
	value = lookup_or_init(&connects, &key, &first, TCPMON_FAIL_CONNECTS);
	if (!value)
		return;
	__atomic_add_fetch(&value->connects, 1, __ATOMIC_RELAXED);
	/* After exec the PID keeps its count but shows its new name. */
	if (!same_comm(value->comm, comm->comm))
		copy_comm(value->comm, comm->comm);
}

static __always_inline void count_comm(const struct tcpmon_comm_key *comm)
{
	struct tcpmon_counter zero = {}, *total;

	total = lookup_or_init(&comm_totals, comm, &zero, TCPMON_FAIL_COMM_TOTALS);
	if (total)
		__atomic_add_fetch(&total->count, 1, __ATOMIC_RELAXED);
}

/* The bytes of a little-endian comm word before its first NUL (the kernel may
 * leave an old name's bytes after it); zero once an earlier word ended. */
static __always_inline __u64 comm_word(__u64 word, bool *ended)
{
	__u64 zero = (word - 0x0101010101010101ULL) & ~word & 0x8080808080808080ULL;

	if (*ended)
		return 0;
	if (!zero)
		return word;
	*ended = true;
	return word & (((zero & -zero) >> 7) - 1);
}

/* tgid and comm of the current task: read straight from its task_struct where
 * the kernel hands out a BTF pointer to it (5.11+), about 20 ns cheaper than
 * the two helpers; the same bytes either way. */
static __always_inline __u32 current_task(struct tcpmon_comm_key *comm)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	if (bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_get_current_task_btf)) {
		struct task_struct *task = bpf_get_current_task_btf();
		__u64 *words = (__u64 *)comm->comm;
		bool ended = false;

		__builtin_memcpy(comm->comm, task->comm, TCPMON_COMM_LEN);
		words[0] = comm_word(words[0], &ended);
		words[1] = comm_word(words[1], &ended);
		return task->tgid;
	}
#endif
	bpf_get_current_comm(comm->comm, TCPMON_COMM_LEN);
	return bpf_get_current_pid_tgid() >> 32;
}

static __always_inline void start_socket(__u64 sk, __u32 tgid, __u64 cgroup_id,
					 const struct tcpmon_comm_key *comm)
{
	struct tcpmon_socket_key key = { .sk = sk };
	struct tcpmon_socket_value start = {
		.start_ns = bpf_ktime_get_ns(), .cgroup_id = cgroup_id, .tgid = tgid,
	};

	copy_comm(start.comm, comm->comm);
	/* BPF_ANY: an entry left by an earlier socket at this address is stale */
	if (bpf_map_update_elem(&sockets, &key, &start, BPF_ANY))
		count_failure(TCPMON_FAIL_SOCKETS);
}

static __always_inline struct tcpmon_outcome_value *outcome_of(__u64 cgroup_id, const char *comm)
{
	struct tcpmon_outcome_key key = { .cgroup_id = cgroup_id };

	copy_comm(key.comm, comm);
	return lookup_or_init(&outcomes, &key, &zero_outcome, TCPMON_FAIL_OUTCOMES);
}

/* Runs in the context of the task calling connect(); `sk` is its socket. */
static __always_inline int count_connect(__u64 sk)
{
	struct tcpmon_comm_key comm = {};
	__u32 tgid = current_task(&comm);
	__u64 cgroup_id = bpf_get_current_cgroup_id();
	struct tcpmon_outcome_value *outcome;

	count_pid(tgid, &comm);
	count_comm(&comm);
	start_socket(sk, tgid, cgroup_id, &comm);
	outcome = outcome_of(cgroup_id, comm.comm);
	if (outcome)
		__atomic_add_fetch(&outcome->attempts, 1, __ATOMIC_RELAXED);
	return 0;
}

/* How a handshake that left SYN_SENT for `newstate` ended, from the socket's error. */
static __always_inline __u32 result_of(int newstate, int err)
{
	if (newstate != TCP_CLOSE)
		return TCPMON_RESULT_SUCCESS; /* ESTABLISHED, or SYN_RECV in a simultaneous open */
	switch (err) {
	case 0:
		return TCPMON_RESULT_ABORTED; /* closed (or disconnected) by the application */
	case ECONNREFUSED:
		return TCPMON_RESULT_REFUSED;
	case ETIMEDOUT:
		return TCPMON_RESULT_TIMEOUT;
	case EHOSTUNREACH:
	case ENETUNREACH:
		return TCPMON_RESULT_UNREACHABLE;
	default:
		return TCPMON_RESULT_OTHER;
	}
}

static __always_inline __u32 log2_u32(__u32 v)
{
	__u32 shift, r;

	r = (v > 0xFFFF) << 4;
	v >>= r;
	shift = (v > 0xFF) << 3;
	v >>= shift;
	r |= shift;
	shift = (v > 0xF) << 2;
	v >>= shift;
	r |= shift;
	shift = (v > 0x3) << 1;
	v >>= shift;
	r |= shift;
	return r | (v >> 1);
}

static __always_inline __u32 latency_slot(__u64 ns)
{
	__u64 us = ns / 1000;
	__u32 slot;

	if (us >> 32)
		return TCPMON_LATENCY_SLOTS - 1;
	slot = log2_u32(us);
	return slot < TCPMON_LATENCY_SLOTS ? slot : TCPMON_LATENCY_SLOTS - 1;
}

static __always_inline bool ephemeral(__u16 port)
{
	return port >= config.ephemeral_low && port <= config.ephemeral_high;
}

/* `dest` holds the remote address, port and family; the rest is filled in here. */
static __always_inline void count_destination(struct tcpmon_destination_key *dest,
					      const struct tcpmon_outcome_key *of, __u32 result)
{
	struct tcpmon_counter zero = {}, *count;

	if (ephemeral(dest->port))
		return;
	dest->cgroup_id = of->cgroup_id;
	copy_comm(dest->comm, of->comm);
	dest->result = result;
	count = lookup_or_init(&destinations, dest, &zero, TCPMON_FAIL_DESTINATIONS);
	if (count)
		__atomic_add_fetch(&count->count, 1, __ATOMIC_RELAXED);
}

/* The handshake of socket `sk` ended: add its result and latency to the
 * (cgroup, comm) that started it.  `dest` is NULL unless destinations are counted. */
static __always_inline int count_outcome(__u64 sk, __u32 result, struct tcpmon_destination_key *dest)
{
	struct tcpmon_socket_key key = { .sk = sk };
	struct tcpmon_socket_value *start = bpf_map_lookup_elem(&sockets, &key);
	struct tcpmon_outcome_key of = {};
	struct tcpmon_outcome_value *outcome;
	__u64 duration;

	if (!start)
		return 0; /* started before the probe was attached, or not stored (counted) */
	duration = bpf_ktime_get_ns() - start->start_ns;
	of.cgroup_id = start->cgroup_id;
	copy_comm(of.comm, start->comm);
	bpf_map_delete_elem(&sockets, &key);
	if (result >= TCPMON_RESULT_COUNT)
		result = TCPMON_RESULT_OTHER;
	if (dest)
		count_destination(dest, &of, result);
	outcome = lookup_or_init(&outcomes, &of, &zero_outcome, TCPMON_FAIL_OUTCOMES);
	if (!outcome)
		return 0;
	__atomic_add_fetch(&outcome->results[result], 1, __ATOMIC_RELAXED);
	if (result == TCPMON_RESULT_SUCCESS) {
		__atomic_add_fetch(&outcome->duration_ns, duration, __ATOMIC_RELAXED);
		__atomic_add_fetch(&outcome->latency[latency_slot(duration)], 1, __ATOMIC_RELAXED);
	}
	return 0;
}

/* --- tp_btf: the socket is a BTF pointer; reading it needs no helper ---------- */

static __always_inline struct tcpmon_destination_key *remote_of_btf(const struct sock *sk,
								     struct tcpmon_destination_key *dest)
{
	if (!config.count_destinations)
		return NULL;
	dest->family = sk->__sk_common.skc_family;
	dest->port = bpf_ntohs(sk->__sk_common.skc_dport);
	if (dest->family == AF_INET6)
		__builtin_memcpy(dest->addr, sk->__sk_common.skc_v6_daddr.in6_u.u6_addr8, 16);
	else
		__builtin_memcpy(dest->addr, &sk->__sk_common.skc_daddr, 4);
	return dest;
}

static __always_inline int finish_btf(const struct sock *sk, int newstate)
{
	struct tcpmon_destination_key dest = {};

	return count_outcome((__u64)sk, result_of(newstate, newstate == TCP_CLOSE ? sk->sk_err : 0),
			     remote_of_btf(sk, &dest));
}

/* The states are arguments: filter on them before touching the socket. */
static __always_inline bool leaves_syn_sent(int oldstate, int newstate)
{
	return oldstate == TCP_SYN_SENT && newstate != TCP_SYN_SENT;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(connect_tp_btf, const struct sock *sk, int oldstate, int newstate)
{
	if (oldstate == TCP_CLOSE && newstate == TCP_SYN_SENT) {
		if (sk->sk_protocol != IPPROTO_TCP)
			return 0;
		return count_connect((__u64)sk);
	}
	if (leaves_syn_sent(oldstate, newstate) && sk->sk_protocol == IPPROTO_TCP)
		return finish_btf(sk, newstate);
	return 0;
}

/* Beside fentry: outcomes only. */
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(outcome_tp_btf, const struct sock *sk, int oldstate, int newstate)
{
	if (leaves_syn_sent(oldstate, newstate) && sk->sk_protocol == IPPROTO_TCP)
		return finish_btf(sk, newstate);
	return 0;
}

SEC("fentry/tcp_connect")
int BPF_PROG(connect_fentry, struct sock *sk)
{
	return count_connect((__u64)sk);
}

/* --- tracepoint: the event record carries the addresses; the socket is read through a helper */

static __always_inline struct tcpmon_destination_key *remote_of_tp(const struct trace_event_raw_inet_sock_set_state *ctx,
								    struct tcpmon_destination_key *dest)
{
	if (!config.count_destinations)
		return NULL;
	dest->family = ctx->family;
	dest->port = ctx->dport; /* host order in the record */
	/* Through the helper: a copy of a relocated ctx array would dereference a moved ctx pointer. */
	if (dest->family == AF_INET6)
		bpf_core_read(dest->addr, 16, &ctx->daddr_v6);
	else
		bpf_core_read(dest->addr, 4, &ctx->daddr);
	return dest;
}

/* The states are read from the record once: clang may otherwise compute the
 * field's address into a register, and the verifier refuses a moved ctx pointer. */
static __always_inline int finish_tp(const struct trace_event_raw_inet_sock_set_state *ctx, int newstate)
{
	const struct sock *sk = ctx->skaddr;
	struct tcpmon_destination_key dest = {};
	int err = 0;

	if (newstate == TCP_CLOSE)
		err = BPF_CORE_READ(sk, sk_err);
	return count_outcome((__u64)sk, result_of(newstate, err), remote_of_tp(ctx, &dest));
}

SEC("tracepoint/sock/inet_sock_set_state")
int connect_tp(struct trace_event_raw_inet_sock_set_state *ctx)
{
	int oldstate = ctx->oldstate, newstate = ctx->newstate;

	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	if (oldstate == TCP_CLOSE && newstate == TCP_SYN_SENT)
		return count_connect((__u64)ctx->skaddr);
	if (leaves_syn_sent(oldstate, newstate))
		return finish_tp(ctx, newstate);
	return 0;
}

/* Beside kprobe: outcomes only. */
SEC("tracepoint/sock/inet_sock_set_state")
int outcome_tp(struct trace_event_raw_inet_sock_set_state *ctx)
{
	int oldstate = ctx->oldstate, newstate = ctx->newstate;

	if (ctx->protocol == IPPROTO_TCP && leaves_syn_sent(oldstate, newstate))
		return finish_tp(ctx, newstate);
	return 0;
}

SEC("kprobe/tcp_connect")
int connect_kprobe(struct pt_regs *ctx)
{
	return count_connect((__u64)PT_REGS_PARM1(ctx)); /* tcp_connect(struct sock *sk) */
}

/* --- exit ----------------------------------------------------------------- */

static __always_inline int drop_exited_process(void)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct tcpmon_pid_key key;

	if (BPF_CORE_READ(task, signal, live.counter) != 0)
		return 0;
	key.tgid = bpf_get_current_pid_tgid() >> 32;
	bpf_map_delete_elem(&connects, &key);
	return 0;
}

/* With kprobe and tracepoint (perf-event links). */
SEC("tracepoint/sched/sched_process_exit")
int process_exit(void *ctx)
{
	return drop_exited_process();
}

/* With fentry and tp_btf: a raw-tracepoint link, which kernels pin from 5.7 on,
 * where perf-event links need 5.15. */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(process_exit_btf)
{
	return drop_exited_process();
}
