// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Empty programs, for the probe benchmarks (test_probe.py):
 *   noop_tp_btf, noop_tp  on tcpmon's connect hooks (tp_btf and classic tracepoint): what a run
 *                         costs before a program does anything (the kernel's dispatch, and with
 *                         kernel.bpf_stats_enabled=1 the clock reads that time it);
 *   noop_idle             on a hook a connect loop never fires (task_rename): attaching it must
 *                         change nothing, which checks the with/without method itself.
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

SEC("tp_btf/task_rename")
int noop_idle(void *ctx)
{
	return 0;
}
