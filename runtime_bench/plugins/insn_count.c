/*
 * insn_count.c - pocketformer's QEMU TCG plugin: count executed guest instructions.
 *
 * Usage (user-mode QEMU, the dynamic qemu-aarch64, not qemu-aarch64-static):
 *   qemu-aarch64 -plugin ./insn_count.so,outfile=/tmp/count.txt[,mode=tb|inline] ./prog
 *
 * At exit the plugin writes, atomically (temp file + rename), to `outfile`:
 *   insns <total executed guest instructions>
 *   insns_vcpu0 <instructions of vCPU 0, the guest's main thread; mode=tb only>
 *   vcpus <vCPU slots used: about the most guest threads alive at once>
 *   mode <tb|inline>
 * so the count never mixes with the guest's own stdout/stderr.
 *
 * Counting is done once per executed translation block (TB): at translation time we
 * know how many instructions the block holds, and every execution adds that number.
 *   mode=tb (default)  a per-TB callback adds n_insns to the counter of the vCPU that runs
 *                      it; each guest thread owns its counter, so multi-threaded guests
 *                      (thread pools) are counted exactly, without atomics.
 *   mode=inline        an inline "add n_insns" op on one shared counter, without a helper
 *                      call: fastest, exact for single-threaded guests; with several
 *                      threads running at once, concurrent adds may be lost (the file then
 *                      says vcpus > 1 and the caller should not trust it).
 * TB-level counting is exact unless a block is left half-way (a guest fault, or QEMU
 * replaying an exclusive/atomic instruction on its own), which is rare and repeatable.
 *
 * Written for the plugin API of QEMU 7.2 (QEMU_PLUGIN_VERSION 1); build with
 *   gcc -shared -fPIC -O2 -I<dir of qemu-plugin.h> insn_count.c -o insn_count.so
 * No GLib is needed.
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

/* One counter per vCPU, each on its own cache line so threads do not share lines. */
#define PF_MAX_VCPUS 1024
struct pf_counter {
    uint64_t n;
    char pad[64 - sizeof(uint64_t)];
};

static struct pf_counter pf_counts[PF_MAX_VCPUS];
static uint64_t pf_overflow;        /* vCPUs beyond PF_MAX_VCPUS: atomic adds */
static uint64_t pf_inline_total;    /* mode=inline: the shared counter */
static unsigned int pf_vcpus;       /* highest vcpu index + 1 seen */
static int pf_inline;
static pid_t pf_pid;                /* only the process that loaded us writes the file */
static char *pf_outfile;

static void pf_vcpu_init(qemu_plugin_id_t id, unsigned int vcpu_index)
{
    (void)id;
    unsigned int want = vcpu_index + 1;
    unsigned int have = __atomic_load_n(&pf_vcpus, __ATOMIC_RELAXED);
    while (want > have &&
           !__atomic_compare_exchange_n(&pf_vcpus, &have, want, 0,
                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}

static void pf_tb_exec(unsigned int vcpu_index, void *udata)
{
    uint64_t n = (uint64_t)(uintptr_t)udata;
    if (vcpu_index < PF_MAX_VCPUS) {
        pf_counts[vcpu_index].n += n;   /* only this vCPU's thread writes this slot */
    } else {
        __atomic_fetch_add(&pf_overflow, n, __ATOMIC_RELAXED);
    }
}

static void pf_tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    if (pf_inline) {
        qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64,
                                                 &pf_inline_total, n);
    } else {
        qemu_plugin_register_vcpu_tb_exec_cb(tb, pf_tb_exec, QEMU_PLUGIN_CB_NO_REGS,
                                             (void *)(uintptr_t)n);
    }
}

static uint64_t pf_total(void)
{
    uint64_t total = pf_inline_total + __atomic_load_n(&pf_overflow, __ATOMIC_RELAXED);
    for (unsigned int i = 0; i < PF_MAX_VCPUS; i++) {
        total += pf_counts[i].n;
    }
    return total;
}

static void pf_exit(qemu_plugin_id_t id, void *userdata)
{
    (void)id;
    (void)userdata;
    if (getpid() != pf_pid) {
        return;   /* a forked guest child: its parent reports */
    }
    size_t len = strlen(pf_outfile) + 32;
    char *tmp = malloc(len);
    if (!tmp) {
        return;
    }
    snprintf(tmp, len, "%s.%ld.tmp", pf_outfile, (long)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) {
        fprintf(stderr, "insn_count: cannot write %s\n", tmp);
        free(tmp);
        return;
    }
    fprintf(f, "insns %" PRIu64 "\nvcpus %u\nmode %s\n", pf_total(),
            __atomic_load_n(&pf_vcpus, __ATOMIC_RELAXED), pf_inline ? "inline" : "tb");
    if (!pf_inline) {
        fprintf(f, "insns_vcpu0 %" PRIu64 "\n", pf_counts[0].n);
    }
    int bad = ferror(f);
    bad |= fclose(f);
    if (bad || rename(tmp, pf_outfile) != 0) {
        fprintf(stderr, "insn_count: cannot write %s\n", pf_outfile);
        unlink(tmp);
    }
    free(tmp);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    (void)info;
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "outfile=", 8) == 0 && arg[8]) {
            pf_outfile = strdup(arg + 8);
        } else if (strcmp(arg, "mode=inline") == 0) {
            pf_inline = 1;
        } else if (strcmp(arg, "mode=tb") == 0) {
            pf_inline = 0;
        } else {
            fprintf(stderr, "insn_count: unknown argument '%s' "
                            "(expected outfile=PATH, mode=tb|inline)\n", arg);
            return -1;
        }
    }
    if (!pf_outfile) {
        fprintf(stderr, "insn_count: outfile=PATH is required\n");
        return -1;
    }
    pf_pid = getpid();
    qemu_plugin_register_vcpu_init_cb(id, pf_vcpu_init);
    qemu_plugin_register_vcpu_tb_trans_cb(id, pf_tb_trans);
    qemu_plugin_register_atexit_cb(id, pf_exit, NULL);
    return 0;
}
