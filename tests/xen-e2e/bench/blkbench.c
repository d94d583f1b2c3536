/*
 * blkbench: the guest-side load generator of scripts/bench-xen.sh (a fio subset that fits a
 * busybox initramfs: built with gcc -static on the host, no libraries in the guest).
 *
 *   blkbench DEV MODE BS QD SECONDS [RAMP_SECONDS]
 *     MODE   read | write | randread | randwrite
 *     BS     request size in bytes (a multiple of 512)
 *     QD     requests kept in flight (1..256)
 *
 * Opens DEV with O_DIRECT and keeps QD requests in flight with Linux native AIO (io_setup,
 * io_submit, io_getevents through syscall(2), no libaio), like fio --ioengine=libaio
 * --direct=1 --iodepth=QD. Sequential modes walk the device from offset 0 and wrap at its end;
 * random modes pick BS-aligned offsets uniformly over the device from a fixed seed, so every
 * backend sees the same offsets. Writes carry incompressible bytes. Requests completing in
 * the first RAMP_SECONDS (default 1) are not counted; the counted window is the SECONDS after
 * it. Prints one line:
 *   BLKBENCH mode=M bs=B qd=Q secs=S ios=N bytes=N mbps=X iops=Y
 * (mbps = 10^6 bytes per second) and exits 0, or prints "blkbench: <why>" and exits 1 on any
 * error, including a failed or short request.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_QD 256

static void die(const char *what)
{
    fprintf(stderr, "blkbench: %s: %s\n", what, strerror(errno));
    exit(1);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t rng = 0x9e3779b97f4a7c15ULL;
static uint64_t next_rand(void)
{
    /* xorshift64* */
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 2685821657736338717ULL;
}

static long parse(const char *s, const char *what, long lo, long hi)
{
    char *end;
    long v;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno != 0 || *end != '\0' || v < lo || v > hi) {
        fprintf(stderr, "blkbench: bad %s '%s' (%ld..%ld)\n", what, s, lo, hi);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    aio_context_t ctx = 0;
    struct iocb cbs[MAX_QD];
    struct iocb *ptrs[MAX_QD];
    struct io_event evs[MAX_QD];
    unsigned char *bufs;
    uint64_t size, blocks, seq = 0, ios = 0, bytes = 0;
    long bs, qd, secs, ramp = 1;
    int freelist[MAX_QD];
    int fd, rnd, wr, inflight = 0, nfree = 0, i;
    double t0, start, end;
    struct stat st;

    if (argc < 6 || argc > 7) {
        fprintf(stderr, "usage: blkbench DEV read|write|randread|randwrite BS QD SECONDS [RAMP]\n");
        return 2;
    }
    if (strcmp(argv[2], "read") == 0) {
        rnd = 0, wr = 0;
    } else if (strcmp(argv[2], "write") == 0) {
        rnd = 0, wr = 1;
    } else if (strcmp(argv[2], "randread") == 0) {
        rnd = 1, wr = 0;
    } else if (strcmp(argv[2], "randwrite") == 0) {
        rnd = 1, wr = 1;
    } else {
        fprintf(stderr, "blkbench: unknown mode '%s'\n", argv[2]);
        return 2;
    }
    bs = parse(argv[3], "block size", 512, 16 << 20);
    if (bs % 512 != 0) {
        fprintf(stderr, "blkbench: block size %ld is not a multiple of 512\n", bs);
        return 2;
    }
    qd = parse(argv[4], "queue depth", 1, MAX_QD);
    secs = parse(argv[5], "seconds", 1, 3600);
    if (argc == 7)
        ramp = parse(argv[6], "ramp seconds", 0, 3600);

    fd = open(argv[1], (wr ? O_RDWR : O_RDONLY) | O_DIRECT);
    if (fd < 0)
        die(argv[1]);
    if (fstat(fd, &st) != 0)
        die("fstat");
    if (S_ISREG(st.st_mode))
        size = (uint64_t)st.st_size;
    else if (ioctl(fd, BLKGETSIZE64, &size) != 0)
        die("BLKGETSIZE64");
    blocks = size / (uint64_t)bs;
    if (blocks < (uint64_t)qd) {
        fprintf(stderr, "blkbench: %s holds %llu bytes, too small for %ld x %ld\n", argv[1],
                (unsigned long long)size, qd, bs);
        return 1;
    }
    if (posix_memalign((void **)&bufs, 4096, (size_t)bs * (size_t)qd) != 0) {
        fprintf(stderr, "blkbench: no memory for %ld buffers of %ld bytes\n", qd, bs);
        return 1;
    }
    for (size_t k = 0; k < (size_t)bs * (size_t)qd; k += 8) {
        uint64_t r = next_rand();
        memcpy(bufs + k, &r, 8);
    }
    if (syscall(SYS_io_setup, (unsigned)qd, &ctx) != 0)
        die("io_setup");

    t0 = now();
    start = t0 + (double)ramp;
    end = start + (double)secs;
    for (i = 0; i < qd; i++) {
        memset(&cbs[i], 0, sizeof(cbs[i]));
        cbs[i].aio_fildes = (uint32_t)fd;
        cbs[i].aio_lio_opcode = wr ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
        cbs[i].aio_buf = (uint64_t)(uintptr_t)(bufs + (size_t)i * (size_t)bs);
        cbs[i].aio_nbytes = (uint64_t)bs;
        cbs[i].aio_data = (uint64_t)i;
        freelist[nfree++] = i;
    }
    for (;;) {
        int n = 0;
        double t = now();
        /* Refill: every idle slot gets a new offset while the window lasts. */
        if (t < end) {
            while (nfree > 0) {
                struct iocb *cb = &cbs[freelist[--nfree]];
                uint64_t blk = rnd ? next_rand() % blocks : seq++ % blocks;
                cb->aio_offset = (int64_t)(blk * (uint64_t)bs);
                ptrs[n++] = cb;
            }
        }
        if (n > 0) {
            long got = syscall(SYS_io_submit, ctx, (long)n, ptrs);
            if (got != n) {
                if (got < 0)
                    die("io_submit");
                fprintf(stderr, "blkbench: io_submit took %ld of %d\n", got, n);
                return 1;
            }
            inflight += n;
        }
        if (inflight == 0)
            break;
        long got = syscall(SYS_io_getevents, ctx, 1L, (long)inflight, evs, NULL);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            die("io_getevents");
        }
        t = now();
        for (i = 0; i < got; i++) {
            if (evs[i].res != bs) {
                fprintf(stderr, "blkbench: %s at request %llu returned %lld (%s)\n",
                        wr ? "write" : "read", (unsigned long long)evs[i].data,
                        (long long)evs[i].res,
                        evs[i].res < 0 ? strerror((int)-evs[i].res) : "short");
                return 1;
            }
            if (t >= start && t <= end) {
                ios++;
                bytes += (uint64_t)bs;
            }
            freelist[nfree++] = (int)evs[i].data;
        }
        inflight -= (int)got;
    }
    syscall(SYS_io_destroy, ctx);
    if (wr && fdatasync(fd) != 0)
        die("fdatasync");
    close(fd);
    printf("BLKBENCH mode=%s bs=%ld qd=%ld secs=%ld ios=%llu bytes=%llu mbps=%.2f iops=%.1f\n",
           argv[2], bs, qd, secs, (unsigned long long)ios, (unsigned long long)bytes,
           (double)bytes / (double)secs / 1e6, (double)ios / (double)secs);
    return 0;
}
