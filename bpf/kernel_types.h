/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The few kernel types the probe touches, kept by hand instead of a generated
 * vmlinux.h.  preserve_access_index makes every field access a CO-RE
 * relocation, so offsets come from the running kernel's BTF at load time.
 */
#ifndef TCPMON_KERNEL_TYPES_H
#define TCPMON_KERNEL_TYPES_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed int __s32;
typedef signed long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef _Bool bool;
enum { false = 0, true = 1 };

enum bpf_map_type {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
};

enum { BPF_ANY = 0, BPF_NOEXIST = 1, BPF_EXIST = 2 };

/* include/net/tcp_states.h: stable UAPI values */
enum {
	TCP_SYN_SENT = 2,
	TCP_CLOSE = 7,
};

#define IPPROTO_TCP 6

typedef struct {
	int counter;
} atomic_t;

struct signal_struct {
	atomic_t live;
} __attribute__((preserve_access_index));

struct task_struct {
	int tgid;
	char comm[16];
	struct signal_struct *signal;
} __attribute__((preserve_access_index));

/* Only for bpf_core_enum_value_exists(): does the running kernel have this helper? */
enum bpf_func_id {
	BPF_FUNC_get_current_task_btf = 158,
};

struct sock {
	__u16 sk_protocol;
} __attribute__((preserve_access_index));

struct trace_entry {
	unsigned short type;
	unsigned char flags;
	unsigned char preempt_count;
	int pid;
};

struct trace_event_raw_inet_sock_set_state {
	struct trace_entry ent;
	const void *skaddr;
	int oldstate;
	int newstate;
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u16 protocol;
} __attribute__((preserve_access_index));

#endif /* TCPMON_KERNEL_TYPES_H */
