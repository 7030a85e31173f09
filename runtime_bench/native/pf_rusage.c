
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: pf-rusage REPORT CMD...\n"); return 126; }
    pid_t pid = fork();
    if (pid < 0) { perror("pf-rusage: fork"); return 126; }
    if (pid == 0) { execvp(argv[2], argv + 2); perror("pf-rusage: exec"); _exit(127); }
    signal(SIGINT, SIG_IGN);
    int status; struct rusage ru;
    while (wait4(pid, &status, 0, &ru) < 0) { if (errno != EINTR) { perror("wait4"); return 126; } }
    FILE *f = fopen(argv[1], "w");
    if (f) {
        fprintf(f, "maxrss_kb %ld\nutime_s %.6f\nstime_s %.6f\nstatus %d\n", ru.ru_maxrss,
                ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6,
                ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6,
                WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status));
        fclose(f);
    }
    if (WIFSIGNALED(status)) { signal(WTERMSIG(status), SIG_DFL); raise(WTERMSIG(status)); }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 126;
}
