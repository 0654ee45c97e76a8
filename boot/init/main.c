/*
 * fuse-init: PID 1 of a fuse VM.
 *
 * Boot: mount the early filesystems in the initramfs, switch to the read-only root, mount the
 * run-time filesystems, read the app spec and its run-time configuration (fuse's fw_cfg
 * overlay, else the cloud's: cloud.c), configure the network, set the host name, start the
 * app. Then supervise: reap every zombie, forward termination signals to the app, and when
 * the app exits stop everything else and power off, reporting its exit code through the status
 * port (status.c), which the app cannot write to.
 */
#define _GNU_SOURCE
#include "init.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

/* After the app exits: how long the other processes get between SIGTERM and SIGKILL, and how
 * long to wait for them to go after SIGKILL. */
#define GRACE_MS 2000
#define KILL_WAIT_MS 1000

/* The signals PID 1 takes through its signalfd. All but SIGCHLD are forwarded to the app. */
static const int handled[] = {SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};

static int status_code(int status)
{
	if (WIFEXITED(status))
		return WEXITSTATUS(status);
	if (WIFSIGNALED(status))
		return 128 + WTERMSIG(status);
	return EXIT_INIT_FAILURE;
}

/* Reap every exited child. Sets *app_status when it is the app. Returns true when the init
 * has no children left. */
static bool reap(pid_t app, int *app_status)
{
	for (;;) {
		int status;
		pid_t pid = waitpid(-1, &status, WNOHANG);
		if (pid > 0) {
			if (pid == app && app_status)
				*app_status = status;
			continue;
		}
		if (pid < 0 && errno == EINTR)
			continue;
		return pid < 0 && errno == ECHILD;
	}
}

/* The power button device (see powerkey.c), or -1. */
static int power_fd = -1;

/* Wait for the next signal from the signalfd, at most `timeout_ms` (-1: forever).
 * Returns the signal number, or 0 on timeout. */
static int next_signal(int sfd, int timeout_ms)
{
	struct pollfd pfd[4] = {{.fd = sfd, .events = POLLIN}, {.fd = power_fd, .events = POLLIN}};
	/* The app's output is relayed while the init waits (console.c). */
	int nc = console_pollfds(&pfd[2]);
	/* poll() skips a negative fd: no power button is fine. */
	int r = poll(pfd, (nfds_t)(2 + nc), timeout_ms);
	if (nc > 0)
		console_service();
	if (r <= 0)
		return 0;
	/* A power button press (arm64 virt) means what SIGTERM from ACPI means on x86. */
	if (power_fd >= 0 && (pfd[1].revents & POLLIN) && power_key_pressed(power_fd)) {
		debug("power button pressed");
		return SIGTERM;
	}
	if (!(pfd[0].revents & POLLIN))
		return 0;
	struct signalfd_siginfo si;
	if (read(sfd, &si, sizeof(si)) != sizeof(si))
		return 0;
	return (int)si.ssi_signo;
}

/* Whether a termination signal was forwarded to the app: what it leaves behind then is still
 * on its way out, not a daemon. */
static bool signal_forwarded;

/* Run until the app exits; returns its wait status. */
static int supervise(int sfd, pid_t app)
{
	int app_status = -1;
	for (;;) {
		/* Reap first: SIGCHLD may have arrived before we started reading. */
		reap(app, &app_status);
		if (app_status != -1)
			return app_status;
		int sig = next_signal(sfd, -1);
		if (sig == 0 || sig == SIGCHLD)
			continue;
		/* To the app's process group (it is a session leader), so a shell-style app and
		 * its children all hear it; fall back to the app alone if the group is gone. */
		debug("forwarding signal %d to the app", sig);
		signal_forwarded = true;
		if (kill(-app, sig) < 0)
			(void)kill(app, sig);
	}
}

/* The kernel's flag for its own threads (include/linux/sched.h); userspace has no header. */
#define PF_KTHREAD 0x00200000UL

/* How many processes are alive besides the init and kernel threads (zombies excluded): what
 * the app left behind. -1 when /proc cannot be read. */
static int count_leftovers(void)
{
	DIR *proc = opendir("/proc");
	if (!proc)
		return -1;
	int count = 0;
	struct dirent *e;
	while ((e = readdir(proc)) != NULL) {
		long pid = isdigit((unsigned char)e->d_name[0]) ? strtol(e->d_name, NULL, 10) : 0;
		if (pid <= 1)
			continue;
		char path[64], *stat;
		size_t len;
		snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
		if (read_file(path, 4096, &stat, &len) < 0)
			continue; /* gone meanwhile */
		/* "pid (comm) state ppid pgrp session tty_nr tpgid flags ...": comm may hold spaces
		 * and parentheses, so parse from its last ')'. */
		char state = 0;
		unsigned long flags = 0;
		char *end = strrchr(stat, ')');
		if (end && sscanf(end + 1, " %c %*d %*d %*d %*d %*d %lu", &state, &flags) == 2 &&
		    state != 'Z' && state != 'X' && !(flags & PF_KTHREAD))
			count++;
		free(stat);
	}
	closedir(proc);
	return count;
}

/* A server that daemonizes (nginx's default) exits 0 at once in the foreground, and the VM
 * would power off without a word: say why before stopping what it left. */
static void report_leftovers(int status)
{
	if (signal_forwarded || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
		return;
	int n = count_leftovers();
	if (n <= 0)
		return;
	warn("the app exited 0 but left %d process%s: it probably daemonized; run it in the "
	     "foreground (e.g. nginx -g 'daemon off;')",
	     n, n == 1 ? "" : "es");
}

/* Stop whatever the app left behind: SIGTERM, a grace period, SIGKILL. */
static void stop_everything(int sfd)
{
	if (reap(0, NULL))
		return;
	/* kill(-1) reaches every process but PID 1 itself. */
	if (kill(-1, SIGTERM) == 0) {
		long long deadline = now_ms() + GRACE_MS;
		while (!reap(0, NULL) && now_ms() < deadline)
			(void)next_signal(sfd, (int)(deadline - now_ms()));
	}
	if (reap(0, NULL))
		return;
	(void)kill(-1, SIGKILL);
	long long deadline = now_ms() + KILL_WAIT_MS;
	while (!reap(0, NULL) && now_ms() < deadline)
		(void)next_signal(sfd, (int)(deadline - now_ms()));
}

int main(void)
{
	/* Never act as init anywhere else: die() powers the machine off. */
	if (getpid() != 1) {
		fprintf(stderr, "fuse-init: error: this is the init of a fuse VM; it only runs as "
				"PID 1\n");
		return 1;
	}

	/* Block the handled signals before anything can send them, and read them from a
	 * signalfd: no handlers, no races between a signal and waitpid. */
	sigset_t set;
	sigemptyset(&set);
	for (size_t i = 0; i < sizeof(handled) / sizeof(handled[0]); i++)
		sigaddset(&set, handled[i]);
	sigprocmask(SIG_BLOCK, &set, NULL);
	int sfd = signalfd(-1, &set, SFD_CLOEXEC);
	if (sfd < 0)
		die(EXIT_INIT_FAILURE, "cannot create a signalfd: %s (kernel without CONFIG_SIGNALFD?)",
		    strerror(errno));
	/* Ctrl-Alt-Del sends SIGINT to init (forwarded to the app) instead of rebooting. */
	reboot(RB_DISABLE_CAD);

	mount_early();
	/* Modules first (only a foreign kernel has any, the benchmark's baseline): the ports'
	 * driver may be one. */
	load_modules();
	/* From here on every way the init ends reports through the status port. */
	status_open();
	console_open_port();
	struct boot_params params;
	read_boot_params(&params);
	debug_enabled = params.debug;
	debug("init started");
	switch_root(&params);
	mount_runtime();
	harden_kernel();
	power_fd = power_key_open();

	struct app_spec spec;
	struct cloud_config cloud = {0};
	bool overlay = load_spec(&spec);
	/* Without fuse's overlay this is a machine fuse did not start: the configuration comes
	 * from the cloud. A disk first (it needs no network), the metadata service after DHCP. */
	bool disk = !overlay && cloud_disk(&cloud);
	bool online = net_up();
	if (!overlay) {
		if (!disk && online)
			cloud_imds(&cloud);
		if (!cloud.found && !cloud.source[0])
			snprintf(cloud.source, sizeof(cloud.source),
				 "no cidata/config-2 disk, no network for IMDS");
		bool by_default;
		const char *env =
			apply_userdata(&spec, cloud.userdata, cloud.len, cloud.source, &by_default);
		char chosen[96];
		snprintf(chosen, sizeof(chosen), "%s%s%s", env ? "environment " : "no environments",
			 env ? env : "", env && by_default ? " (the image's default)" : "");
		if (cloud.userdata)
			info("run-time configuration: user-data from %s; %s", cloud.source, chosen);
		else
			info("run-time configuration: none (%s%s); %s", cloud.source,
			     cloud.found ? ": no user-data" : "", chosen);
		if (cloud.userdata)
			/* Secrets may be in it: do not leave them in memory longer than needed. */
			explicit_bzero(cloud.userdata, cloud.len);
		free(cloud.userdata);
		if (cloud.hostname) {
			free(spec.hostname);
			spec.hostname = xstrdup(cloud.hostname);
		}
	}
	mount_volumes(&spec);
	if (sethostname(spec.hostname, strlen(spec.hostname)) < 0)
		warn("cannot set the host name to %s: %s", spec.hostname, strerror(errno));
	net_write_hosts(spec.hostname, cloud.fqdn);

	pid_t app = start_app(&spec);
	int status = supervise(sfd, app);
	/* Its last output before anything the init says about its end. */
	console_drain();
	debug("app exited with status %d", status_code(status));
	report_leftovers(status);
	stop_everything(sfd);
	console_drain();
	unmount_volumes(&spec);
	power_off(status_code(status));
}
