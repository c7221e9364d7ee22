// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Empty programs on tcpmon's connect hooks: what one run costs before a
 * program does anything (the kernel's dispatch, and with
 * kernel.bpf_stats_enabled=1 the clock reads that measure it).  The probe-cost
 * benchmark attaches them beside tcpmon and bpftrace to show that floor.
 */
#define SEC(name) __attribute__((section(name), used))

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("tp_btf/inet_sock_set_state")
int noop_tp_btf(void *ctx)
{
	return 0;
}

SEC("tracepoint/sock/inet_sock_set_state")
int noop_tp(void *ctx)
{
	return 0;
}
