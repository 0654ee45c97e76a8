/*
 * Starting the app: the only process the init creates.
 */
#define _GNU_SOURCE
#include "init.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <termios.h>
#include <unistd.h>

/* Fail before forking when the exe or cwd is obviously wrong: the message then names the
 * path and the exit code says which (127 not found, 126 not executable). */
static void check_spec_paths(const struct app_spec *s)
{
	struct stat st;
	if (stat(s->exe, &st) < 0) {
		int e = errno;
		die(e == ENOENT || e == ENOTDIR ? EXIT_NOT_FOUND : EXIT_NOT_EXECUTABLE,
		    "cannot execute %s: %s%s", s->exe, strerror(e),
		    e == ENOENT ? " (it is not in the image)" : "");
	}
	if (!S_ISREG(st.st_mode))
		die(EXIT_NOT_EXECUTABLE, "cannot execute %s: not a regular file", s->exe);
	if (!(st.st_mode & 0111))
		die(EXIT_NOT_EXECUTABLE, "cannot execute %s: not executable (mode %04o)", s->exe,
		    (unsigned)(st.st_mode & 07777));
	if (stat(s->cwd, &st) < 0)
		die(EXIT_INIT_FAILURE, "cannot use working directory %s: %s", s->cwd,
		    strerror(errno));
	if (!S_ISDIR(st.st_mode))
		die(EXIT_INIT_FAILURE, "cannot use working directory %s: not a directory", s->cwd);
}

/* In the child: report and exit. Never die() here, that would power off from a child. */
__attribute__((noreturn, format(printf, 2, 3))) static void child_fail(int code,
									  const char *fmt, ...);
static void child_fail(int code, const char *fmt, ...)
{
	char msg[768];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	error_line("%s", msg);
	_exit(code);
}

static void child(const struct app_spec *s, int term)
{
	/* The init blocks the signals it reads from its signalfd; the app starts with none
	 * blocked and every disposition at its default (the init ignores none, and exec resets
	 * handled ones, but be explicit: an inherited SIG_IGN would survive exec). */
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	for (int sig = 1; sig < NSIG; sig++)
		if (sig != SIGKILL && sig != SIGSTOP)
			signal(sig, SIG_DFL); /* EINVAL for libc-reserved signals: fine */

	/* Own session and process group, the target of the signals the init forwards. The
	 * console is its stdin/stdout/stderr but NOT its controlling terminal: when a session
	 * leader with a controlling tty exits, the kernel hangs the tty up and discards output
	 * still queued for the serial line, so the app's last lines could be lost (seen with 2
	 * vCPUs). Nobody types on this console (QEMU's stdin is /dev/null): no ^C is lost. */
	if (setsid() < 0)
		child_fail(EXIT_INIT_FAILURE, "cannot start %s: setsid: %s", s->exe, strerror(errno));
	int fd = term >= 0 ? term : open("/dev/console", O_RDWR | O_NOCTTY);
	if (fd >= 0) {
		/* The console becomes the app's, as login hands a tty to its user: servers that log
		 * to /dev/stdout reopen it by name (/proc/self/fd/1), which a root-owned 0600 node
		 * refuses. The app could already write to it; the exit status does not travel on
		 * it (status.c). */
		if (s->uid != 0 && fchown(fd, s->uid, s->gid) < 0)
			warn("cannot hand the console to uid %u: %s", (unsigned)s->uid, strerror(errno));
		dup2(fd, STDIN_FILENO);
		dup2(fd, STDOUT_FILENO);
		dup2(fd, STDERR_FILENO);
		if (fd > STDERR_FILENO)
			close(fd);
	}

	/* The app's own user, no capabilities, no_new_privs (see privs.c). */
	char why[256];
	if (drop_privileges(s->uid, s->gid, s->have_caps ? &s->caps : NULL, why, sizeof(why)) < 0)
		child_fail(EXIT_INIT_FAILURE, "cannot run %s as uid %u gid %u: %s", s->exe,
			   (unsigned)s->uid, (unsigned)s->gid, why);
	/* After dropping privileges: the directory must be usable by the app's user. */
	if (chdir(s->cwd) < 0)
		child_fail(EXIT_INIT_FAILURE, "cannot change to working directory %s: %s", s->cwd,
			   strerror(errno));

	execve(s->exe, s->argv, s->envp);

	int e = errno;
	struct stat st;
	if (e == ENOENT && stat(s->exe, &st) == 0)
		/* The file is there, so what is missing is what it needs to start. */
		child_fail(EXIT_NOT_FOUND,
			   "cannot execute %s: its interpreter (dynamic loader or #! program) is not "
			   "in the image",
			   s->exe);
	child_fail(e == ENOENT || e == ENOTDIR ? EXIT_NOT_FOUND : EXIT_NOT_EXECUTABLE,
		   "cannot execute %s: %s", s->exe, strerror(e));
}

pid_t start_app(const struct app_spec *s)
{
	check_spec_paths(s);
	int term = console_open_app_side();
	/* What the init said so far leaves the slow serial console before the app's output
	 * takes the fast way. */
	if (term >= 0)
		(void)tcdrain(STDERR_FILENO);
	pid_t pid = fork();
	if (pid < 0)
		die(EXIT_INIT_FAILURE, "cannot start %s: fork: %s", s->exe, strerror(errno));
	if (pid == 0)
		child(s, term);
	if (term >= 0) {
		close(term);
		/* The relay should take the app's output in batches, not preempt the app at every
		 * line it writes (each switch costs much under emulation): a batch task does not
		 * preempt on wakeup. Set after the fork, so the app keeps the normal policy. The
		 * system call itself: musl's sched_setscheduler() is a stub that fails with ENOSYS. */
		struct sched_param none = {0};
		if (syscall(SYS_sched_setscheduler, 0, SCHED_BATCH, &none) < 0)
			debug("cannot make the init a batch task: %s", strerror(errno));
	}
	debug("started %s as pid %d", s->exe, (int)pid);
	return pid;
}
