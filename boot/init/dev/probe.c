/*
 * A test app for manual boots of the init (see boot.sh): each mode exercises one duty of the
 * init. Not part of any image.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <ifaddrs.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

static void cat(const char *path)
{
	FILE *f = fopen(path, "r");
	printf("--- %s\n", path);
	if (!f) {
		perror(path);
		return;
	}
	char line[512];
	while (fgets(line, sizeof(line), f))
		fputs(line, stdout);
	fclose(f);
}

static volatile sig_atomic_t got;
static void on_signal(int sig) { got = sig; }

static int zombies(void)
{
	int n = 0;
	DIR *d = opendir("/proc");
	struct dirent *e;
	while ((e = readdir(d))) {
		char path[300], buf[512];
		snprintf(path, sizeof(path), "/proc/%s/stat", e->d_name);
		FILE *f = fopen(path, "r");
		if (!f)
			continue;
		if (fgets(buf, sizeof(buf), f)) {
			char *p = strrchr(buf, ')');
			if (p && p[2] == 'Z')
				n++;
		}
		fclose(f);
	}
	closedir(d);
	return n;
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "hello";
	if (!strcmp(mode, "hello")) {
		printf("hello from the app\n");
		return 0;
	}
	if (!strcmp(mode, "exit"))
		return atoi(argv[2]);
	if (!strcmp(mode, "env")) {
		for (int i = 0; i < argc; i++)
			printf("argv[%d]=%s\n", i, argv[i]);
		for (char **e = environ; *e; e++)
			printf("env %s\n", *e);
		char cwd[256];
		printf("cwd=%s uid=%d gid=%d pid=%d sid=%d\n", getcwd(cwd, sizeof(cwd)), getuid(),
		       getgid(), getpid(), getsid(0));
		return 0;
	}
	if (!strcmp(mode, "net")) {
		char host[128];
		gethostname(host, sizeof(host));
		printf("hostname=%s\n", host);
		struct ifaddrs *ifa;
		getifaddrs(&ifa);
		for (struct ifaddrs *i = ifa; i; i = i->ifa_next)
			if (i->ifa_addr && i->ifa_addr->sa_family == AF_INET)
				printf("%s %s\n", i->ifa_name,
				       inet_ntoa(((struct sockaddr_in *)i->ifa_addr)->sin_addr));
		cat("/proc/net/route");
		cat("/etc/resolv.conf");
		cat("/etc/hosts");
		return 0;
	}
	if (!strcmp(mode, "mounts")) {
		cat("/proc/mounts");
		system("true");
		return 0;
	}
	if (!strcmp(mode, "sigterm")) {
		/* Have someone else signal init (SIGTERM, or the signal number in argv[2]: 2 is
		 * what Ctrl-Alt-Del sends); init must forward it to us. */
		int sig = argc > 2 ? atoi(argv[2]) : SIGTERM;
		signal(sig, on_signal);
		if (fork() == 0) {
			kill(1, sig);
			_exit(0);
		}
		while (!got)
			pause();
		printf("app got signal %d\n", got);
		return 42;
	}
	if (!strcmp(mode, "zombies")) {
		/* Orphans: children whose parent exits at once are reparented to init. */
		for (int i = 0; i < 5; i++)
			if (fork() == 0) {
				if (fork() == 0) {
					usleep(100000);
					_exit(0);
				}
				_exit(0);
			}
		while (wait(NULL) > 0)
			;
		sleep(1);
		printf("zombies after 1 s: %d\n", zombies());
		return 0;
	}
	if (!strcmp(mode, "leftover")) {
		/* A process that ignores SIGTERM outlives the app: init must SIGKILL it. */
		if (fork() == 0) {
			signal(SIGTERM, SIG_IGN);
			for (;;)
				pause();
		}
		printf("leaving a stubborn child behind\n");
		return 3;
	}
	if (!strcmp(mode, "crash")) {
		raise(SIGSEGV);
		return 0;
	}
	if (!strcmp(mode, "wait")) {
		/* For SIGINT via ctrl-alt-del or system_powerdown: wait for a signal. */
		signal(SIGINT, on_signal);
		signal(SIGTERM, on_signal);
		while (!got)
			pause();
		printf("app got signal %d\n", got);
		return 0;
	}
	fprintf(stderr, "unknown mode %s\n", mode);
	return 2;
}
