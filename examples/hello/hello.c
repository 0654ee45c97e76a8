/* The bundled native example: prints who and where it is, then exits 0. */
#include <stdio.h>
#include <sys/utsname.h>
#include <unistd.h>

int main(int argc, char **argv) {
    struct utsname u;
    char host[256] = "?";
    uname(&u);
    gethostname(host, sizeof host);
    printf("Hello from fuse! Linux %s on %s, hostname %s\n", u.release, u.machine, host);
    for (int i = 1; i < argc; i++)
        printf("arg %d: %s\n", i, argv[i]);
    return 0;
}
