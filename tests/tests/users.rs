//! `[users]` and `[groups]` as the app sees them: glibc's lookups in the image's `/etc/passwd`
//! and `/etc/group`, the app's own user named by the table.

mod common;

use common::Sandbox;
use fuse_tests::assert_no_leaked_qemu;

/// Looks up who it runs as, and the names of fuse.toml's tables, through glibc (NSS files).
const WHO: &str = r#"
#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(void) {
    struct passwd *me = getpwuid(getuid());
    struct group *mine = getgrgid(getgid());
    printf("me=%s uid=%d gid=%d home=%s HOME=%s group=%s\n", me ? me->pw_name : "?",
           (int)getuid(), (int)getgid(), me ? me->pw_dir : "?", getenv("HOME"),
           mine ? mine->gr_name : "?");
    const char *users[] = {"www-data", "backup", "root", "nonroot", "app"};
    for (int i = 0; i < 5; i++) {
        struct passwd *p = getpwnam(users[i]);
        if (p) printf("user %s=%d:%d\n", users[i], (int)p->pw_uid, (int)p->pw_gid);
        else printf("user %s: none\n", users[i]);
    }
    const char *groups[] = {"www-data", "adm", "backup"};
    for (int i = 0; i < 3; i++) {
        struct group *g = getgrnam(groups[i]);
        if (g) printf("group %s=%d\n", groups[i], (int)g->gr_gid);
        else printf("group %s: none\n", groups[i]);
    }
    return 0;
}
"#;

#[test]
fn the_app_runs_as_a_named_user_and_sees_the_others() {
    let sb = Sandbox::new();
    let app = sb.program(WHO, "who", &[]);
    sb.dir.write(
        "fuse.toml",
        "user = \"www-data\"\n\n[users]\nwww-data = 33\nbackup = \"34:4\"\n\n[groups]\nadm = 4\n",
    );
    let out = sb.fuse().args(["run", "--accel", "tcg"]).arg(&app).run();
    out.assert_success()
        .assert_stdout_contains(
            "me=www-data uid=33 gid=33 home=/home/www-data HOME=/home/www-data group=www-data\n",
        )
        .assert_stdout_contains(
            "user www-data=33:33\nuser backup=34:4\nuser root=0:0\nuser nonroot: none\nuser app: none\n",
        )
        // backup's primary gid 4 is adm's: no group of its own.
        .assert_stdout_contains("group www-data=33\ngroup adm=4\ngroup backup: none\n");
    assert_no_leaked_qemu();
}
