/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The kernel/user ABI of tcpmon: the single definition of every pinned map's
 * name, key and value.  Included by the BPF program (bpf/tcpconnect.bpf.c)
 * and, through `cdef extern from`, by the Cython reader (ext/).
 */
#ifndef TCPMON_H
#define TCPMON_H

#ifndef __bpf__
#include <linux/types.h> /* the BPF side gets these from kernel_types.h */
#endif

#define TCPMON_COMM_LEN 16

/* Pin names under the pin dir; also the BPF map/program names. */
#define TCPMON_MAP_CONNECTS "connects"
#define TCPMON_MAP_COMM_TOTALS "comm_totals"
#define TCPMON_MAP_UPDATE_FAILURES "update_failures"
#define TCPMON_PIN_CONNECT_LINK "link_connect"
#define TCPMON_PIN_EXIT_LINK "link_exit"
#define TCPMON_PIN_CONNECT_PROG "prog_connect"
#define TCPMON_PIN_EXIT_PROG "prog_exit"

#define TCPMON_DEFAULT_MAX_PIDS 65536
#define TCPMON_DEFAULT_MAX_COMMS 16384

/* connects: BPF_MAP_TYPE_HASH, key __u32 tgid (the user-visible PID). */
struct tcpmon_pid_value {
	__u64 connects;              /* connect attempts since the PID first connected */
	char comm[TCPMON_COMM_LEN];  /* task comm at its latest connect */
};

/* comm_totals: BPF_MAP_TYPE_HASH, key struct tcpmon_comm_key, value __u64.
 * Counted at connect time, so it never drops when a PID exits. */
struct tcpmon_comm_key {
	char comm[TCPMON_COMM_LEN];
};

/* update_failures: BPF_MAP_TYPE_PERCPU_ARRAY, key __u32, value __u64 per CPU. */
enum tcpmon_failure_slot {
	TCPMON_FAIL_CONNECTS = 0,    /* connects was full: a new PID went uncounted */
	TCPMON_FAIL_COMM_TOTALS = 1, /* comm_totals was full: a new comm went uncounted */
	TCPMON_FAIL_SLOTS = 2,
};

_Static_assert(sizeof(struct tcpmon_pid_value) == 24, "connects value layout");
_Static_assert(sizeof(struct tcpmon_comm_key) == TCPMON_COMM_LEN, "comm key layout");

#endif /* TCPMON_H */
