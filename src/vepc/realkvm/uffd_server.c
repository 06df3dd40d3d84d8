/*
 * A compiled userfaultfd fault server: the reference that measures the userfaultfd round trip with no
 * Python in it (vepc.realkvm.native, the "compiled handler" row of the real-KVM benchmark).
 *
 * It does what the Python reference handler in vepc/realkvm/bench.py does, in C: read fault messages
 * (up to 64 per read) from a non-blocking userfaultfd, spinning for `spin_ns` before it sleeps in poll(2)
 * (50 ms at most, so that *stop is seen), and answer each with UFFDIO_CONTINUE of the faulting page
 * (MINOR mode) or UFFDIO_COPY of the page at `src` (MISSING mode); a page already present (EEXIST) is
 * woken with UFFDIO_WAKE. No model is asked: this bounds any design that needs user space once per page.
 *
 * vepc_sync_touch is the other reference: the synchronous design, with no second thread. The range is
 * registered with UFFD_FEATURE_SIGBUS, so a guest's first touch makes KVM_RUN fail at once with EFAULT in
 * the vCPU thread itself, which maps the page and re-enters. KVM does not say which address faulted
 * (kvm_handle_error_pfn returns a bare -EFAULT; real-kvm.md), so the caller's loop must be known: the
 * benchmark's guest touches pages in order, and `*next` is the next one. No model is asked.
 *
 * vepc_run_ticks is the third: the cost of one exit to user space and back with no fault in it. The guest
 * writes a page that is already mapped and exits through an OUT to a tick port; the loop re-enters at once.
 * Any design that visits user space once per page pays at least this on top of the fault itself.
 *
 * The structure layouts and ioctl numbers are include/uapi/linux/userfaultfd.h's and linux/kvm.h's,
 * spelled out here (as vepc/realkvm/uffd.py and kvm_api.py do) so that only a C compiler and libc are
 * needed.
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096ULL
#define UFFD_EVENT_PAGEFAULT 0x12
/* _IOWR(0xAA, nr, size) and _IOR(0xAA, nr, size) */
#define UFFD_IOWR(nr, size) ((3UL << 30) | ((unsigned long)(size) << 16) | (0xAAUL << 8) | (nr))
#define UFFD_IOR(nr, size) ((2UL << 30) | ((unsigned long)(size) << 16) | (0xAAUL << 8) | (nr))

struct uffd_msg_pf {            /* struct uffd_msg for UFFD_EVENT_PAGEFAULT: 32 bytes */
	uint8_t event, reserved1;
	uint16_t reserved2;
	uint32_t reserved3;
	uint64_t flags, address, ptid;
};

struct uffd_range { uint64_t start, len; };
struct uffdio_copy { uint64_t dst, src, len, mode; int64_t copy; };
struct uffdio_continue { struct uffd_range range; uint64_t mode; int64_t mapped; };

#define UFFDIO_WAKE UFFD_IOR(0x02, sizeof(struct uffd_range))
#define UFFDIO_COPY UFFD_IOWR(0x03, sizeof(struct uffdio_copy))
#define UFFDIO_CONTINUE UFFD_IOWR(0x07, sizeof(struct uffdio_continue))
#define KVM_RUN 0xAE80UL                /* _IO(KVMIO, 0x80) */
#define KVM_EXIT_IO 2
#define RUN_EXIT_REASON 8               /* struct kvm_run: exit_reason (u32) */
#define RUN_IO_PORT 34                  /* the exit union at 32; io: direction u8, size u8, port u16 */

_Static_assert(sizeof(struct uffd_msg_pf) == 32, "struct uffd_msg is 32 bytes");
_Static_assert(sizeof(struct uffdio_copy) == 40, "struct uffdio_copy is 40 bytes");
_Static_assert(sizeof(struct uffdio_continue) == 32, "struct uffdio_continue is 32 bytes");

static int64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int answer(int fd, int minor, uint64_t src, uint64_t page)
{
	long ret;
	if (minor) {
		struct uffdio_continue c = { { page, PAGE }, 0, 0 };
		ret = ioctl(fd, UFFDIO_CONTINUE, &c);
	} else {
		struct uffdio_copy c = { page, src, PAGE, 0, 0 };
		ret = ioctl(fd, UFFDIO_COPY, &c);
	}
	if (ret == 0)
		return 0;
	if (errno == EEXIST) {                  /* already populated: let the waiter retry */
		struct uffd_range r = { page, PAGE };
		return ioctl(fd, UFFDIO_WAKE, &r) ? -errno : 0;
	}
	return -errno;
}

/* Serve until *stop is nonzero; returns the faults served, or -errno of the first failure. */
long vepc_uffd_serve(int fd, int minor, uint64_t src, volatile int *stop, long spin_ns)
{
	struct uffd_msg_pf msgs[64];
	long served = 0;
	int64_t idle_since = now_ns();

	while (!*stop) {
		ssize_t n = read(fd, msgs, sizeof msgs);
		if (n < 0) {
			if (errno != EAGAIN && errno != EINTR)
				return -errno;
			if (now_ns() - idle_since > spin_ns) {
				struct pollfd p = { fd, POLLIN, 0 };
				if (poll(&p, 1, 50) < 0 && errno != EINTR)
					return -errno;
				idle_since = now_ns();
			}
			continue;
		}
		for (ssize_t i = 0; i < n / (ssize_t)sizeof msgs[0]; i++) {
			if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
				continue;
			int err = answer(fd, minor, src, msgs[i].address & ~(PAGE - 1));
			if (err)
				return err;
			served++;
		}
		idle_since = now_ns();
	}
	return served;
}

/* Run the vCPU until an exit KVM_RUN reports normally (0: the caller reads kvm_run) or fails with anything
 * but EFAULT (-errno); each EFAULT maps page *next of [base, base + npages pages) and advances it. An
 * EFAULT with no page left is returned (-EFAULT): the guest touched more than the caller said. */
long vepc_sync_touch(int vcpu_fd, int fd, int minor, uint64_t src, uint64_t base, uint64_t npages,
		     uint64_t *next)
{
	for (;;) {
		if (ioctl(vcpu_fd, KVM_RUN, 0) == 0)
			return 0;
		if (errno != EFAULT)
			return -errno;
		if (*next >= npages)
			return -EFAULT;
		int err = answer(fd, minor, src, base + (*next)++ * PAGE);
		if (err)
			return err;
	}
}

/* Run the vCPU, re-entering at once after each KVM_EXIT_IO on `tick_port` (counted in *ticks), until any
 * other exit (0: the caller reads kvm_run) or a failure (-errno). kvm_run is mapped here (read only) from
 * the vCPU fd, `run_size` bytes (KVM_GET_VCPU_MMAP_SIZE). */
long vepc_run_ticks(int vcpu_fd, long run_size, int tick_port, uint64_t *ticks)
{
	const volatile uint8_t *run = mmap(NULL, run_size, PROT_READ, MAP_SHARED, vcpu_fd, 0);
	long ret = 0;

	if (run == MAP_FAILED)
		return -errno;
	for (;;) {
		if (ioctl(vcpu_fd, KVM_RUN, 0)) {
			ret = -errno;
			break;
		}
		if (*(const volatile uint32_t *)(run + RUN_EXIT_REASON) != KVM_EXIT_IO ||
		    *(const volatile uint16_t *)(run + RUN_IO_PORT) != tick_port)
			break;
		(*ticks)++;
	}
	munmap((void *)run, run_size);
	return ret;
}
