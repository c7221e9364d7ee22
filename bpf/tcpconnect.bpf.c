// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Counts TCP connect attempts per process.  Four interchangeable hooks share
 * one counting body; the loader enables exactly one of them (autoload) plus
 * the exit hook that drops dead PIDs.
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "tcpmon.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* max_entries are defaults; the loader resizes them before load. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TCPMON_DEFAULT_MAX_PIDS);
	__type(key, __u32);
	__type(value, struct tcpmon_pid_value);
} connects SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TCPMON_DEFAULT_MAX_COMMS);
	__type(key, struct tcpmon_comm_key);
	__type(value, __u64);
} comm_totals SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TCPMON_FAIL_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} update_failures SEC(".maps");

static __always_inline void count_failure(__u32 slot)
{
	__u64 *failures = bpf_map_lookup_elem(&update_failures, &slot);

	if (failures)
		*failures += 1; /* per-CPU slot: no atomic needed */
}

static __always_inline bool same_comm(const char *a, const char *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;

	return x[0] == y[0] && x[1] == y[1];
}

static __always_inline void count_pid(__u32 tgid, const struct tcpmon_comm_key *comm)
{
	struct tcpmon_pid_value *value = bpf_map_lookup_elem(&connects, &tgid);

	if (!value) {
		struct tcpmon_pid_value first = { .connects = 1 };

		__builtin_memcpy(first.comm, comm->comm, TCPMON_COMM_LEN);
		if (!bpf_map_update_elem(&connects, &tgid, &first, BPF_NOEXIST))
			return;
		/* Another thread of this process may have inserted first. */
		value = bpf_map_lookup_elem(&connects, &tgid);
		if (!value) {
			count_failure(TCPMON_FAIL_CONNECTS);
			return;
		}
	}
	__atomic_add_fetch(&value->connects, 1, __ATOMIC_RELAXED);
	/* After exec the PID keeps its count but shows its new name. */
	if (!same_comm(value->comm, comm->comm))
		__builtin_memcpy(value->comm, comm->comm, TCPMON_COMM_LEN);
}

static __always_inline void count_comm(const struct tcpmon_comm_key *comm)
{
	__u64 one = 1, *total = bpf_map_lookup_elem(&comm_totals, comm);

	if (!total) {
		if (!bpf_map_update_elem(&comm_totals, comm, &one, BPF_NOEXIST))
			return;
		total = bpf_map_lookup_elem(&comm_totals, comm);
		if (!total) {
			count_failure(TCPMON_FAIL_COMM_TOTALS);
			return;
		}
	}
	__atomic_add_fetch(total, 1, __ATOMIC_RELAXED);
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

/* Runs in the context of the task calling connect(). */
static __always_inline int count_connect(void)
{
	struct tcpmon_comm_key comm = {};
	__u32 tgid = current_task(&comm);

	count_pid(tgid, &comm);
	count_comm(&comm);
	return 0;
}

static __always_inline bool is_tcp_connect(int oldstate, int newstate, __u16 protocol)
{
	return oldstate == TCP_CLOSE && newstate == TCP_SYN_SENT && protocol == IPPROTO_TCP;
}

SEC("kprobe/tcp_connect")
int connect_kprobe(void *ctx)
{
	return count_connect();
}

SEC("fentry/tcp_connect")
int BPF_PROG(connect_fentry)
{
	return count_connect();
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(connect_tp_btf, const struct sock *sk, int oldstate, int newstate)
{
	if (!is_tcp_connect(oldstate, newstate, sk->sk_protocol))
		return 0;
	return count_connect();
}

SEC("tracepoint/sock/inet_sock_set_state")
int connect_tp(struct trace_event_raw_inet_sock_set_state *ctx)
{
	if (!is_tcp_connect(ctx->oldstate, ctx->newstate, ctx->protocol))
		return 0;
	return count_connect();
}

/* The last thread of a process drops its PID, so a reused PID starts at zero. */
static __always_inline int drop_exited_process(void)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u32 tgid;

	if (BPF_CORE_READ(task, signal, live.counter) != 0)
		return 0;
	tgid = bpf_get_current_pid_tgid() >> 32;
	bpf_map_delete_elem(&connects, &tgid);
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
