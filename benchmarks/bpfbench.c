// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * libbpfbench.so: the plain-C side of tcpmon's benchmarks, loaded with ctypes.
 *
 *   bench_map_create  make a map (the production layouts) and pin it
 *   bench_update_batch  fill it with one BPF_MAP_UPDATE_BATCH loop
 *   bench_read_batch  the floor: the batch lookup loop tcpmon's reader runs,
 *                     with nothing around it but the syscalls
 *
 * Every function returns >= 0 on success and -errno on failure.
 */
#include <errno.h>
#include <linux/bpf.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static long sys_bpf(int cmd, union bpf_attr *attr)
{
	return syscall(SYS_bpf, cmd, attr, sizeof(*attr));
}

int bench_map_create(uint32_t map_type, const char *name, uint32_t key_size, uint32_t value_size,
		     uint32_t max_entries, const char *pin_path)
{
	union bpf_attr attr;
	int fd;

	memset(&attr, 0, sizeof(attr));
	attr.map_type = map_type;
	attr.key_size = key_size;
	attr.value_size = value_size;
	attr.max_entries = max_entries;
	strncpy(attr.map_name, name, sizeof(attr.map_name) - 1);
	fd = sys_bpf(BPF_MAP_CREATE, &attr);
	if (fd < 0)
		return -errno;
	memset(&attr, 0, sizeof(attr));
	attr.pathname = (uint64_t)(uintptr_t)pin_path;
	attr.bpf_fd = fd;
	if (sys_bpf(BPF_OBJ_PIN, &attr) < 0) {
		int err = errno;

		close(fd);
		return -err;
	}
	return fd;
}

int bench_close(int fd)
{
	return close(fd) < 0 ? -errno : 0;
}

/* Insert `count` entries laid out back to back; the kernel may take fewer per call. */
int bench_update_batch(int fd, const char *keys, const char *values, uint32_t count,
		       uint32_t key_size, uint32_t value_size)
{
	union bpf_attr attr;
	uint32_t done = 0;

	while (done < count) {
		memset(&attr, 0, sizeof(attr));
		attr.batch.map_fd = fd;
		attr.batch.keys = (uint64_t)(uintptr_t)(keys + (size_t)done * key_size);
		attr.batch.values = (uint64_t)(uintptr_t)(values + (size_t)done * value_size);
		attr.batch.count = count - done;
		if (sys_bpf(BPF_MAP_UPDATE_BATCH, &attr) < 0)
			return -errno;
		if (attr.batch.count == 0)
			return -EIO;
		done += attr.batch.count;
	}
	return (int)done;
}

/* The floor: the same BPF_MAP_LOOKUP_BATCH loop as ext/_maps.pyx BpfMap._read_batch. */
int bench_read_batch(int fd, char *keys, char *values, uint32_t capacity, uint32_t key_size,
		     uint32_t value_stride, int *calls)
{
	union bpf_attr attr;
	uint64_t token[8], next_token[8];
	uint32_t total = 0;
	int first = 1;

	while (total < capacity) {
		long ret;

		memset(&attr, 0, sizeof(attr));
		attr.batch.map_fd = fd;
		attr.batch.in_batch = first ? 0 : (uint64_t)(uintptr_t)token;
		attr.batch.out_batch = (uint64_t)(uintptr_t)next_token;
		attr.batch.keys = (uint64_t)(uintptr_t)(keys + (size_t)total * key_size);
		attr.batch.values = (uint64_t)(uintptr_t)(values + (size_t)total * value_stride);
		attr.batch.count = capacity - total;
		ret = sys_bpf(BPF_MAP_LOOKUP_BATCH, &attr);
		if (calls)
			++*calls; /* how many bpf() calls one read needs, to explain where the time goes */
		if (ret < 0 && errno != ENOENT)
			return -errno;
		total += attr.batch.count;
		if (ret < 0)
			break;
		memcpy(token, next_token, sizeof(token));
		first = 0;
	}
	return (int)total;
}
