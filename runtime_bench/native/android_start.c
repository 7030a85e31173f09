/* Program entry for Android (Bionic) executables linked without the NDK.
 *
 * The NDK's crtbegin_dynamic.o does this: the kernel enters `_start` with the stack holding
 * argc/argv/envp/auxv, and Bionic's __libc_init(raw_args, onexit, main, structors) sets up
 * libc and calls main. The structors arrays follow Bionic's convention (a -1 sentinel first,
 * NULL-terminated); the dynamic linker itself runs the executable's DT_INIT_ARRAY, so they are
 * empty here. The ELF note marks the binary as an Android one (API level 24), like crtbrand.
 */
typedef struct {
  void (**preinit_array)(void);
  void (**init_array)(void);
  void (**fini_array)(void);
} pf_structors_array_t;

extern int main(int argc, char** argv, char** envp);
extern void __libc_init(void* raw_args, void (*onexit)(void), int (*slingshot)(int, char**, char**),
                        pf_structors_array_t const* const structors) __attribute__((noreturn));

static void (*pf_empty_array[2])(void) = {(void (*)(void))-1, 0};

__attribute__((used, visibility("hidden"))) void _pf_start_main(void* raw_args) {
  pf_structors_array_t array;
  array.preinit_array = pf_empty_array;
  array.init_array = pf_empty_array;
  array.fini_array = pf_empty_array;
  __libc_init(raw_args, 0, &main, &array);
}

__asm__(
    ".text\n"
    ".global _start\n"
    ".type _start,%function\n"
    "_start:\n"
    "  mov x29, #0\n"
    "  mov x30, #0\n"
    "  mov x0, sp\n"
    "  b _pf_start_main\n"
    ".size _start, .-_start\n"
    ".section .note.android.ident,\"a\",%note\n"
    ".balign 4\n"
    ".long 8\n"          /* namesz: "Android\0" */
    ".long 4\n"          /* descsz */
    ".long 1\n"          /* NT_VERSION: ABI note */
    ".ascii \"Android\\0\"\n"
    ".long 24\n"         /* API level */
    ".text\n");
