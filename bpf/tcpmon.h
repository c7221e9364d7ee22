/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The kernel/user ABI of tcpmon: the single definition of every pinned map,
 * its key and value layout, and the constants both sides share.
 *
 * Each struct is written as a list of its fields, FIELD(struct, type, name) or
 * ARRAY(struct, type, name, count), and the maps as one list,
 * MAP(name, type, key, value, max_entries).  The BPF program
 * (bpf/tcpconnect.bpf.c) declares the structs and maps from these lists; the
 * Cython module tcpmon._abi turns the same lists into tables of names, sizes
 * and offsets, from which tcpmon/maps.py describes and decodes every map.  A
 * layout therefore exists only here.
 */
#ifndef TCPMON_H
#define TCPMON_H

#ifndef __bpf__
#include <linux/types.h> /* the BPF side gets these from kernel_types.h */
#endif

/* Bumped whenever a pinned map changes layout or meaning: the loader migrates
 * pins of an older version (tcpmon/loader.py), the exporter reads only its own. */
#define TCPMON_ABI_VERSION 2

#define TCPMON_COMM_LEN 16

/* Connect latency histogram: slot i counts connects that took [2^i, 2^(i+1))
 * microseconds (slot 0 from 0); the last slot everything from 2^25 us (~34 s). */
#define TCPMON_LATENCY_SLOTS 26

/* Pin names of the programs and links under the pin dir. */
#define TCPMON_PIN_CONNECT_LINK "link_connect"
#define TCPMON_PIN_OUTCOME_LINK "link_outcome"
#define TCPMON_PIN_EXIT_LINK "link_exit"
#define TCPMON_PIN_CONNECT_PROG "prog_connect"
#define TCPMON_PIN_OUTCOME_PROG "prog_outcome"
#define TCPMON_PIN_EXIT_PROG "prog_exit"

#define TCPMON_DEFAULT_MAX_PIDS 65536
#define TCPMON_DEFAULT_MAX_COMMS 16384
#define TCPMON_DEFAULT_MAX_SOCKETS 16384
#define TCPMON_DEFAULT_MAX_OUTCOMES 8192
#define TCPMON_DEFAULT_MAX_DESTINATIONS 16384

/* How a connect ended: RESULT(NAME, label).  Labels are tcpmon_connects_total's `result`. */
#define TCPMON_RESULTS(RESULT)          \
	RESULT(SUCCESS, success)         \
	RESULT(REFUSED, refused)         \
	RESULT(TIMEOUT, timeout)         \
	RESULT(UNREACHABLE, unreachable) \
	RESULT(ABORTED, aborted)         \
	RESULT(OTHER, other)

#define TCPMON_RESULT_ENUM(NAME, label) TCPMON_RESULT_##NAME,
enum tcpmon_result { TCPMON_RESULTS(TCPMON_RESULT_ENUM) TCPMON_RESULT_COUNT };

/* update_failures slots, SLOT(NAME, map): a connect that `map` had no room for. */
#define TCPMON_FAILURES(SLOT)                    \
	SLOT(CONNECTS, connects)                  \
	SLOT(COMM_TOTALS, comm_totals)            \
	SLOT(SOCKETS, sockets)                    \
	SLOT(OUTCOMES, outcomes)                  \
	SLOT(DESTINATIONS, destinations)

#define TCPMON_FAILURE_ENUM(NAME, map) TCPMON_FAIL_##NAME,
enum tcpmon_failure_slot { TCPMON_FAILURES(TCPMON_FAILURE_ENUM) TCPMON_FAIL_SLOTS };

/* connects key: the process (tgid, the user-visible PID). */
#define TCPMON_PID_KEY(S, FIELD, ARRAY) FIELD(S, __u32, tgid)

/* connects value: attempts since the PID first connected, and its comm at the latest one. */
#define TCPMON_PID_VALUE(S, FIELD, ARRAY) \
	FIELD(S, __u64, connects)          \
	ARRAY(S, char, comm, TCPMON_COMM_LEN)

/* comm_totals key: counted at connect time, so a total never drops when a PID exits. */
#define TCPMON_COMM_KEY(S, FIELD, ARRAY) ARRAY(S, char, comm, TCPMON_COMM_LEN)

/* A plain counter: comm_totals and destinations values, update_failures per CPU. */
#define TCPMON_COUNTER(S, FIELD, ARRAY) FIELD(S, __u64, count)

/* sockets: a connect in flight, keyed by the kernel address of its socket.
 * Written in the connecting task, read and deleted when the handshake ends. */
#define TCPMON_SOCKET_KEY(S, FIELD, ARRAY) FIELD(S, __u64, sk)

#define TCPMON_SOCKET_VALUE(S, FIELD, ARRAY) \
	FIELD(S, __u64, start_ns)             \
	FIELD(S, __u64, cgroup_id)            \
	FIELD(S, __u32, tgid)                 \
	FIELD(S, __u32, pad)                  \
	ARRAY(S, char, comm, TCPMON_COMM_LEN)

/* outcomes: per (cgroup v2 id, comm) of the connecting task. */
#define TCPMON_OUTCOME_KEY(S, FIELD, ARRAY) \
	FIELD(S, __u64, cgroup_id)           \
	ARRAY(S, char, comm, TCPMON_COMM_LEN)

#define TCPMON_OUTCOME_VALUE(S, FIELD, ARRAY)                   \
	FIELD(S, __u64, attempts)     /* counted at connect time */ \
	ARRAY(S, __u64, results, TCPMON_RESULT_COUNT)            \
	FIELD(S, __u64, duration_ns)  /* sum over successes */      \
	ARRAY(S, __u64, latency, TCPMON_LATENCY_SLOTS)

/* destinations (only with `tcpmon load --destinations`): per remote address and
 * port; addr holds an IPv4 address in its first 4 bytes. */
#define TCPMON_DESTINATION_KEY(S, FIELD, ARRAY) \
	FIELD(S, __u64, cgroup_id)               \
	ARRAY(S, char, comm, TCPMON_COMM_LEN)    \
	ARRAY(S, __u8, addr, 16)                 \
	FIELD(S, __u16, port)                    \
	FIELD(S, __u8, family)                   \
	FIELD(S, __u8, result)                   \
	FIELD(S, __u32, pad)

/* Set by the loader before load (read-only data of the program). */
#define TCPMON_CONFIG(S, FIELD, ARRAY)      \
	FIELD(S, __u32, count_destinations)  \
	FIELD(S, __u16, ephemeral_low)       \
	FIELD(S, __u16, ephemeral_high)

/* Every struct above: STRUCT(name, FIELDS). */
#define TCPMON_STRUCTS(STRUCT)                               \
	STRUCT(tcpmon_pid_key, TCPMON_PID_KEY)                \
	STRUCT(tcpmon_pid_value, TCPMON_PID_VALUE)            \
	STRUCT(tcpmon_comm_key, TCPMON_COMM_KEY)              \
	STRUCT(tcpmon_counter, TCPMON_COUNTER)                \
	STRUCT(tcpmon_socket_key, TCPMON_SOCKET_KEY)          \
	STRUCT(tcpmon_socket_value, TCPMON_SOCKET_VALUE)      \
	STRUCT(tcpmon_outcome_key, TCPMON_OUTCOME_KEY)        \
	STRUCT(tcpmon_outcome_value, TCPMON_OUTCOME_VALUE)    \
	STRUCT(tcpmon_destination_key, TCPMON_DESTINATION_KEY) \
	STRUCT(tcpmon_config, TCPMON_CONFIG)

/* Every pinned map: MAP(name, type, key, value, max_entries).  max_entries is
 * the default; the loader sizes all but update_failures from its flags.  Array
 * keys are plain __u32 indexes: the kernel takes no other key type for arrays. */
#define TCPMON_MAPS(MAP)                                                                                   \
	MAP(connects, HASH, struct tcpmon_pid_key, struct tcpmon_pid_value, TCPMON_DEFAULT_MAX_PIDS)         \
	MAP(comm_totals, HASH, struct tcpmon_comm_key, struct tcpmon_counter, TCPMON_DEFAULT_MAX_COMMS)      \
	MAP(sockets, HASH, struct tcpmon_socket_key, struct tcpmon_socket_value, TCPMON_DEFAULT_MAX_SOCKETS) \
	MAP(outcomes, HASH, struct tcpmon_outcome_key, struct tcpmon_outcome_value, TCPMON_DEFAULT_MAX_OUTCOMES) \
	MAP(destinations, HASH, struct tcpmon_destination_key, struct tcpmon_counter,                       \
	    TCPMON_DEFAULT_MAX_DESTINATIONS)                                                                 \
	MAP(update_failures, PERCPU_ARRAY, __u32, struct tcpmon_counter, TCPMON_FAIL_SLOTS)

#define TCPMON_DECLARE_FIELD(S, type, name) type name;
#define TCPMON_DECLARE_ARRAY(S, type, name, count) type name[count];
#define TCPMON_DECLARE_STRUCT(name, FIELDS) \
	struct name { FIELDS(name, TCPMON_DECLARE_FIELD, TCPMON_DECLARE_ARRAY) };
TCPMON_STRUCTS(TCPMON_DECLARE_STRUCT)

/* No implicit padding anywhere: hash keys are compared as bytes, and user space
 * decodes with these exact sizes. */
_Static_assert(sizeof(struct tcpmon_pid_value) == 24, "connects value layout");
_Static_assert(sizeof(struct tcpmon_socket_value) == 40, "sockets value layout");
_Static_assert(sizeof(struct tcpmon_outcome_key) == 24, "outcomes key layout");
_Static_assert(sizeof(struct tcpmon_outcome_value) == 8 * (2 + TCPMON_RESULT_COUNT + TCPMON_LATENCY_SLOTS),
	       "outcomes value layout");
_Static_assert(sizeof(struct tcpmon_destination_key) == 48, "destinations key layout");
_Static_assert(sizeof(struct tcpmon_config) == 8, "config layout");

#endif /* TCPMON_H */
