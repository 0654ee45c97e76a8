//! JVM apps: real jars compiled by the test (javac + jar from the host JDK), real jlink
//! runtimes, real boots under QEMU.

mod common;

use common::{free_port, java_jar, json, serve_once, Detached, Sandbox};
use fuse_boot::poll::wait_until;
use fuse_tests::{assert_no_leaked_qemu, on_every_arch};
use std::path::Path;
use std::time::Duration;

const EXIT_WITH: &str = r#"
public class Hello {
    public static void main(String[] args) {
        System.out.println("hello from java " + System.getProperty("java.version")
            + " home=" + System.getProperty("java.home"));
        System.exit(args.length > 0 ? Integer.parseInt(args[0]) : 7);
    }
}
"#;

on_every_arch! {
    jar_prints_and_exits_with_its_code => jar_prints;
    modules_beyond_base_are_detected_and_work => modules_beyond_base;
    fat_jar_with_a_nested_dependency_runs => fat_jar;
    http_server_is_reachable_through_a_published_port => http_server;
    jar_native_library_for_the_image_arch_is_chosen => native_for_arch;
}

/// The ceiling of a Java hello image. aarch64 gets 3 MB more: its kernel is the uncompressed
/// arm64 Image (6.2 MB, what both QEMU and UEFI boot) where x86_64 has a 2.6 MB zstd bzImage.
fn java_hello_budget(arch: &str) -> u64 {
    if arch == "aarch64" {
        23_000_000
    } else {
        20_000_000
    }
}

fn modules(sb: &Sandbox, image: &str) -> Vec<String> {
    let inspect = json(
        sb.fuse()
            .args(["inspect", "--json", image])
            .run()
            .assert_success(),
    );
    inspect["notes"]["jdk.modules"]
        .as_str()
        .unwrap_or_else(|| panic!("no jdk.modules note: {inspect}"))
        .split(',')
        .map(str::to_string)
        .collect()
}

/// `hello-1.0.jar`, running [`EXIT_WITH`].
fn hello_jar(sb: &Sandbox) -> std::path::PathBuf {
    java_jar(
        sb.dir.path(),
        "hello-1.0.jar",
        "Hello",
        &[("Hello.java", EXIT_WITH)],
        &[],
    )
}

fn jar_prints(arch: &str) {
    let sb = Sandbox::new();
    let jar = hello_jar(&sb);
    let out = sb
        .fuse()
        .args(["run", "--accel", "tcg", "--arch", arch])
        .arg(&jar)
        .run();
    out.assert_code(7)
        .assert_stdout_contains("hello from java 17")
        .assert_stdout_contains("home=/opt/java");
    // Run-time arguments follow `-jar /app/x.jar` instead of replacing the JVM's.
    let out = sb.fuse().args(["run", "hello:1.0", "--", "3"]).run();
    out.assert_code(3).assert_stdout_contains("hello from java");

    let inspect = json(
        sb.fuse()
            .args(["inspect", "--json", "hello:1.0"])
            .run()
            .assert_success(),
    );
    assert_eq!(inspect["app"]["kind"], "jvm");
    assert_eq!(inspect["app"]["exe"], "/opt/java/bin/java");
    let args: Vec<&str> = inspect["app"]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        &args[args.len() - 2..],
        ["-jar", "/app/hello-1.0.jar"],
        "{args:?}"
    );
    assert!(args.contains(&"-XX:MaxRAMPercentage=75"), "{args:?}");
    assert!(inspect["app"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e == "JAVA_HOME=/opt/java"));
    assert_eq!(inspect["notes"]["jdk.modules"], "java.base");
    assert!(inspect["notes"]["jdk.version"]
        .as_str()
        .unwrap()
        .starts_with("17"));
    let parts = &inspect["contents"]["parts"];
    assert!(parts["runtime"].as_u64().unwrap() > 10_000_000, "{parts}");
    assert_eq!(
        parts["app"].as_u64().unwrap(),
        std::fs::metadata(&jar).unwrap().len()
    );
    let size = inspect["size"].as_u64().unwrap();
    let budget = java_hello_budget(arch);
    assert!(
        size < budget,
        "a Java hello image for {arch} is at most {budget} bytes: {size}"
    );

    // The same jar in another store: the same image, byte for byte.
    let other = Sandbox::new();
    let again = json(
        other
            .fuse()
            .args(["build", "--json", "--arch", arch])
            .arg(&jar)
            .run()
            .assert_success(),
    );
    assert_eq!(again["digest"], inspect["digest"]);

    // No CDS archive by default (JDK 17's is not reproducible under every load); with
    // `[jvm] cds = true` a runtime for the host's arch carries one and the JVM in the VM can
    // use it: `-Xshare:on` makes an archive the JVM refuses (paths, sizes, flags) an error.
    assert_eq!(inspect["notes"]["jvm.cds"], "none", "{}", inspect["notes"]);
    if arch == std::env::consts::ARCH {
        // Its own cache: a runtime cached by another build (whose dumps disagreed) has none.
        let sb = Sandbox::with_private_cache(arch);
        let shared = sb.dir.path().join("shared");
        std::fs::create_dir_all(&shared).unwrap();
        std::fs::copy(&jar, shared.join("hello-1.0.jar")).unwrap();
        std::fs::write(
            shared.join("fuse.toml"),
            "[jvm]\ncds = true\noptions = [\"-Xshare:on\"]\n",
        )
        .unwrap();
        let out = sb
            .fuse()
            .args(["run", "--accel", "tcg", "--arch", arch])
            .arg(shared.join("hello-1.0.jar"))
            .run();
        out.assert_code(7)
            .assert_stdout_contains("hello from java 17");
        let shared = json(
            sb.fuse()
                .args(["inspect", "--json", "hello:1.0"])
                .run()
                .assert_success(),
        );
        assert_eq!(
            shared["notes"]["jvm.cds"], "default classlist, dumped by fuse",
            "{}",
            shared["notes"]
        );
    }
    assert_no_leaked_qemu();
}

fn modules_beyond_base(arch: &str) {
    let sb = Sandbox::new();
    let src = r#"
import java.net.http.HttpClient;
import java.sql.DriverManager;
public class Uses {
    public static void main(String[] args) throws Exception {
        HttpClient client = HttpClient.newBuilder().build();
        System.out.println("http client " + client.version());
        System.out.println("login timeout " + DriverManager.getLoginTimeout());
    }
}
"#;
    let jar = java_jar(
        sb.dir.path(),
        "uses.jar",
        "Uses",
        &[("Uses.java", src)],
        &[],
    );
    let out = sb.fuse().args(["run", "--arch", arch]).arg(&jar).run();
    out.assert_success()
        .assert_stdout_contains("http client HTTP_2")
        .assert_stdout_contains("login timeout 0");
    let m = modules(&sb, "uses:latest");
    for needed in ["java.base", "java.net.http", "java.sql"] {
        assert!(m.iter().any(|x| x == needed), "{needed} missing from {m:?}");
    }
    assert!(!m.iter().any(|x| x == "java.desktop"), "{m:?}");
    assert_no_leaked_qemu();
}

/// A fat jar: the app's own classes plus `lib/dep.jar`, a dependency jar stored inside it,
/// which the Main class loads with a small class loader reading the nested jar from its own
/// resources (what Spring Boot's launcher does, minus everything else). The dependency uses
/// java.logging, which the app's own classes do not: fuse must scan the nested jar.
fn fat_jar(arch: &str) {
    let sb = Sandbox::new();
    let dep_src = r#"
package dep;
import java.util.logging.Logger;
public class Greeter {
    public static String greet() {
        Logger log = Logger.getLogger("dep");
        return "greetings from the nested jar via " + log.getName() + " logger";
    }
}
"#;
    let dep = java_jar(
        sb.dir.path(),
        "dep.jar",
        "",
        &[("Greeter.java", dep_src)],
        &[],
    );
    let main_src = r#"
import java.io.*;
import java.util.*;
import java.util.jar.*;
public class Fat {
    static class NestedLoader extends ClassLoader {
        private final Map<String, byte[]> classes = new HashMap<>();
        NestedLoader(InputStream nested) throws IOException {
            super(Fat.class.getClassLoader());
            try (JarInputStream in = new JarInputStream(nested)) {
                for (JarEntry e; (e = in.getNextJarEntry()) != null; ) {
                    if (e.getName().endsWith(".class")) {
                        String name = e.getName().replace('/', '.').replaceAll("\\.class$", "");
                        classes.put(name, in.readAllBytes());
                    }
                }
            }
        }
        @Override protected Class<?> findClass(String name) throws ClassNotFoundException {
            byte[] b = classes.get(name);
            if (b == null) throw new ClassNotFoundException(name);
            return defineClass(name, b, 0, b.length);
        }
    }
    public static void main(String[] args) throws Exception {
        InputStream nested = Fat.class.getResourceAsStream("/lib/dep.jar");
        ClassLoader loader = new NestedLoader(nested);
        Class<?> greeter = loader.loadClass("dep.Greeter");
        System.out.println(greeter.getMethod("greet").invoke(null));
    }
}
"#;
    let jar = java_jar(
        sb.dir.path(),
        "fat.jar",
        "Fat",
        &[("Fat.java", main_src)],
        &[("lib/dep.jar", &dep)],
    );
    let out = sb.fuse().args(["run", "--arch", arch]).arg(&jar).run();
    out.assert_success()
        .assert_stdout_contains("greetings from the nested jar via dep logger");
    let m = modules(&sb, "fat:latest");
    assert!(
        m.iter().any(|x| x == "java.logging"),
        "nested jar not scanned: {m:?}"
    );
    assert_no_leaked_qemu();
}

fn http_server(arch: &str) {
    let sb = Sandbox::new();
    let src = r#"
import com.sun.net.httpserver.HttpServer;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
public class Web {
    public static void main(String[] args) throws Exception {
        HttpServer server = HttpServer.create(new InetSocketAddress(8080), 0);
        server.createContext("/", exchange -> {
            byte[] body = "hello from the JVM in a VM\n".getBytes(StandardCharsets.UTF_8);
            exchange.sendResponseHeaders(200, body.length);
            exchange.getResponseBody().write(body);
            exchange.close();
        });
        server.start();
        System.out.println("listening on 8080");
    }
}
"#;
    let jar = java_jar(sb.dir.path(), "web.jar", "Web", &[("Web.java", src)], &[]);
    sb.fuse()
        .args(["build", "--arch", arch])
        .arg(&jar)
        .run()
        .assert_success();
    assert!(modules(&sb, "web:latest")
        .iter()
        .any(|m| m == "jdk.httpserver"));
    let (response, out) = serve_once(&sb, "web:latest", 8080);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.ends_with("hello from the JVM in a VM\n"),
        "{response}"
    );
    assert!(!out.timed_out, "{out}");
    out.assert_stdout_contains("listening on 8080");
    assert_no_leaked_qemu();
}

/// A stored zip (what `jar` cannot make): entries with any name, for the zip-slip case.
fn raw_zip(path: &Path, entries: &[(&str, &[u8])]) {
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let (mut out, mut central) = (Vec::new(), Vec::new());
    for (name, data) in entries {
        let offset = out.len() as u32;
        let crc = crc32(data);
        let len = data.len() as u32;
        let common = |v: &mut Vec<u8>| {
            v.extend(20u16.to_le_bytes()); // version needed
            v.extend(0u16.to_le_bytes()); // flags
            v.extend(0u16.to_le_bytes()); // stored
            v.extend(0u32.to_le_bytes()); // time, date
            v.extend(crc.to_le_bytes());
            v.extend(len.to_le_bytes());
            v.extend(len.to_le_bytes());
            v.extend((name.len() as u16).to_le_bytes());
            v.extend(0u16.to_le_bytes()); // extra
        };
        out.extend(0x0403_4b50u32.to_le_bytes());
        common(&mut out);
        out.extend(name.as_bytes());
        out.extend(*data);
        central.extend(0x0201_4b50u32.to_le_bytes());
        central.extend(20u16.to_le_bytes()); // version made by
        common(&mut central);
        central.extend([0u8; 8]); // comment len, disk, internal attrs, external attrs (part)
        central.extend([0u8; 2]);
        central.extend(offset.to_le_bytes());
        central.extend(name.as_bytes());
    }
    let cd_offset = out.len() as u32;
    let cd_len = central.len() as u32;
    out.extend(&central);
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend([0u8; 4]);
    out.extend((entries.len() as u16).to_le_bytes());
    out.extend((entries.len() as u16).to_le_bytes());
    out.extend(cd_len.to_le_bytes());
    out.extend(cd_offset.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    std::fs::write(path, out).unwrap();
}

#[test]
fn bad_jars_and_missing_jdks_are_refused_with_one_clear_line() {
    let sb = Sandbox::new();
    let lib = java_jar(
        sb.dir.path(),
        "library.jar",
        "",
        &[("Hello.java", EXIT_WITH)],
        &[],
    );
    sb.assert_refused(
        [Path::new("build"), lib.as_path()],
        &["library.jar", "no Main-Class"],
    );

    let corrupt = sb
        .dir
        .write("broken.jar", b"PK\x03\x04 this is not the rest of a zip");
    sb.assert_refused(
        [Path::new("build"), corrupt.as_path()],
        &["broken.jar", "corrupt"],
    );

    let slip = sb.dir.join("slip.jar");
    raw_zip(
        &slip,
        &[
            (
                "META-INF/MANIFEST.MF",
                b"Manifest-Version: 1.0\nMain-Class: Hello\n",
            ),
            ("../../escape.class", b"\xca\xfe\xba\xbe"),
        ],
    );
    sb.assert_refused(
        [Path::new("build"), slip.as_path()],
        &["slip.jar", "escapes its directory", "../../escape.class"],
    );

    let good = java_jar(
        sb.dir.path(),
        "good.jar",
        "Hello",
        &[("Hello.java", EXIT_WITH)],
        &[],
    );
    let not_a_jdk = sb.dir.join("jre");
    std::fs::create_dir_all(not_a_jdk.join("bin")).unwrap();
    sb.assert_refused(
        [
            Path::new("build"),
            good.as_path(),
            Path::new("--jdk"),
            not_a_jdk.as_path(),
        ],
        &["No JDK at", "jre", "--jdk"],
    );

    // --kind overrides detection: a jar forced to be native is refused as a non-ELF.
    let err = sb.assert_refused(
        [
            Path::new("build"),
            good.as_path(),
            Path::new("--kind"),
            Path::new("native"),
        ],
        &["good.jar"],
    );
    assert!(!err.contains("Main-Class"), "{err}");
}

/// `[jvm] options` of fuse.toml reach the JVM, after (so over) fuse's defaults.
#[test]
fn jvm_options_from_fuse_toml_reach_the_jvm() {
    let sb = Sandbox::new();
    let source = r#"
public class Props {
    public static void main(String[] args) {
        System.out.println("greeting=" + System.getProperty("greeting")
            + " maxram=" + java.lang.management.ManagementFactory.getRuntimeMXBean()
                .getInputArguments().stream().filter(a -> a.startsWith("-XX:MaxRAMPercentage"))
                .reduce((a, b) -> b).orElse("none"));
    }
}
"#;
    let jar = java_jar(
        sb.dir.path(),
        "props-1.0.jar",
        "Props",
        &[("Props.java", source)],
        &[],
    );
    sb.dir.write(
        "fuse.toml",
        "[jvm]\noptions = [\"-Dgreeting=from-toml\", \"-XX:MaxRAMPercentage=50\"]\n",
    );
    let out = sb.fuse().args(["run", "--accel", "tcg"]).arg(&jar).run();
    out.assert_success()
        .assert_stdout_contains("greeting=from-toml maxram=-XX:MaxRAMPercentage=50");
    assert_no_leaked_qemu();
}

/// A `fuse build` SIGKILLed while it writes the root filesystem cannot remove its scratch
/// directory from the store; the next command that opens the store does.
#[test]
fn scratch_of_a_killed_build_is_swept_by_the_next_command() {
    // An empty block cache and xz: writing the root filesystem takes seconds.
    let sb = Sandbox::with_private_cache("x86_64");
    let jar = hello_jar(&sb);
    let tmp = sb.home().join("images/tmp");
    let building = sb
        .fuse()
        .args(["build", "--compression", "small"])
        .arg(&jar)
        .spawn();
    let scratch = wait_until(Duration::from_secs(240), Duration::from_millis(10), || {
        std::fs::read_dir(&tmp)
            .ok()?
            .flatten()
            .next()
            .map(|e| e.path())
    });
    building.signal(libc::SIGKILL);
    let out = building.wait();
    let scratch = scratch.unwrap_or_else(|| panic!("no scratch directory appeared\n{out}"));
    assert_eq!(out.code(), None, "the build ended before the kill\n{out}");
    assert!(scratch.is_dir(), "a SIGKILLed build cannot clean up");
    sb.fuse().arg("ls").run().assert_success();
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().collect();
    assert!(left.is_empty(), "left in the store's tmp: {left:?}");
}

/// `[jvm] main_class` runs another class of the jar (`java -cp app.jar CLASS`, as H2's
/// `org.h2.tools.Server` needs), with fuse.toml's `args` after it; a class the jar does not
/// hold is refused at build with one line.
#[test]
fn main_class_from_fuse_toml_runs_that_class() {
    let sb = Sandbox::new();
    let jar = java_jar(
        sb.dir.path(),
        "tools-1.0.jar",
        "Console",
        &[
            (
                "Console.java",
                "public class Console { public static void main(String[] a) { \
                 System.out.println(\"the console\"); } }",
            ),
            (
                "Server.java",
                "public class Server { public static void main(String[] a) { \
                 System.out.println(\"the server \" + String.join(\" \", a)); } }",
            ),
        ],
        &[],
    );
    sb.dir.write(
        "fuse.toml",
        "args = [\"-tcp\", \"-tcpPort\", \"9092\"]\n[jvm]\nmain_class = \"Server\"\n",
    );
    sb.fuse()
        .args(["run", "--accel", "tcg"])
        .arg(&jar)
        .run()
        .assert_success()
        .assert_stdout_contains("the server -tcp -tcpPort 9092");
    // --main-class wins over fuse.toml.
    sb.fuse()
        .args(["run", "--accel", "tcg", "--main-class", "Console"])
        .arg(&jar)
        .run()
        .assert_success()
        .assert_stdout_contains("the console");

    // In a fresh store, so "nothing stored" is checked too.
    let fresh = Sandbox::new();
    let copy = fresh.dir.join("tools-1.0.jar");
    std::fs::copy(&jar, &copy).unwrap();
    fresh
        .dir
        .write("fuse.toml", "[jvm]\nmain_class = \"org.h2.tools.Server\"\n");
    fresh.assert_refused(
        ["build".as_ref(), copy.as_os_str()],
        &["has no class org.h2.tools.Server (no org/h2/tools/Server.class)"],
    );
    assert_no_leaked_qemu();
}

/// How a zip bomb jar inflates: its nested jar `lib/bomb.jar` holds...
enum Bomb {
    /// this many MiB of zeros (stored) in one entry,
    Zeros(u32),
    /// the same, and the outer jar's central directory understates the nested jar's size,
    Understated(u32),
    /// this many empty entries.
    Entries(u32),
}

/// Writes a zip bomb jar with Python's zipfile: a manifest and `lib/bomb.jar` (deflated),
/// streamed so the generator holds none of it.
fn zip_bomb(path: &Path, bomb: Bomb) {
    const SCRIPT: &str = r#"
import struct, sys, zipfile
out, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as outer:
    outer.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\nMain-Class: Hello\n")
    with outer.open("lib/bomb.jar", "w") as nested:
        with zipfile.ZipFile(nested, "w", zipfile.ZIP_STORED) as inner:
            if kind == "entries":
                for i in range(n):
                    inner.writestr("r/%08d" % i, b"")
            else:
                with inner.open("zeros.class", "w") as z:
                    chunk = bytes(1 << 20)
                    for _ in range(n):
                        z.write(chunk)
if kind == "understated":
    data = bytearray(open(out, "rb").read())
    at = data.index(b"PK\x01\x02")
    while data[at + 46:at + 58] != b"lib/bomb.jar":
        at = data.index(b"PK\x01\x02", at + 4)
    struct.pack_into("<I", data, at + 24, 1000000)
    open(out, "wb").write(data)
"#;
    let (kind, n) = match bomb {
        Bomb::Zeros(mib) => ("zeros", mib),
        Bomb::Understated(mib) => ("understated", mib),
        Bomb::Entries(n) => ("entries", n),
    };
    let status = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(path)
        .args([kind, &n.to_string()])
        .status()
        .expect("python3 is needed");
    assert!(status.success(), "the zip bomb generator failed");
}

/// Runs `fuse ARGS` in `sb`'s store and returns its output and peak resident memory (KiB),
/// the child's own rusage from wait4.
fn run_measuring_rss(sb: &Sandbox, args: &[&std::ffi::OsStr]) -> (fuse_tests::Output, u64) {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let started = std::time::Instant::now();
    let mut child = std::process::Command::new(fuse_tests::fuse_bin())
        .args(args)
        .env("FUSE_HOME", sb.home())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cannot start fuse");
    // A refused build writes a line or two: reading one pipe then the other cannot block.
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut stderr)
        .unwrap();
    let mut status = 0;
    // SAFETY: rusage is plain integers, for which all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: reaps our own child into locals; std never waits for it (the Child is forgotten
    // below, so its id cannot be reused under it).
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as libc::pid_t, "wait4 failed");
    std::mem::forget(child);
    let out = fuse_tests::Output {
        command: "fuse (measured)".into(),
        status: std::process::ExitStatus::from_raw(status),
        stdout,
        stderr,
        duration: started.elapsed(),
        timed_out: false,
    };
    (out, usage.ru_maxrss as u64)
}

/// A 300 KB jar whose nested jar inflates to 300 MB (issue 12 item 16: it took 321 MB of
/// memory, 1.7 GB here, and was built) is refused with one line naming the entry, before
/// anything is stored, and fuse's peak memory stays small; so is the same bomb with a header
/// that understates the size, and a 1.9 MB jar whose nested jar has 300,000 empty entries
/// (226 MB before: the zip reader indexes every entry).
#[test]
fn zip_bomb_jars_are_refused_within_bounded_memory() {
    let sb = Sandbox::new();
    let cases = [
        (
            "bomb.jar",
            Bomb::Zeros(300),
            ["bomb.jar", "zip bomb", "its entry lib/bomb.jar"],
        ),
        (
            "liar.jar",
            Bomb::Understated(300),
            [
                "liar.jar",
                "lib/bomb.jar",
                "does not hold the 1000000 bytes",
            ],
        ),
        (
            "many.jar",
            Bomb::Entries(300_000),
            ["many.jar", "its entry lib/bomb.jar", "1 KiB for each entry"],
        ),
    ];
    for (name, bomb, needles) in cases {
        let jar = sb.dir.join(name);
        zip_bomb(&jar, bomb);
        let size = std::fs::metadata(&jar).unwrap().len();
        assert!(size < 4 << 20, "{name} is small: {size} bytes");
        let (out, max_rss_kib) = run_measuring_rss(&sb, &["build".as_ref(), jar.as_os_str()]);
        common::assert_one_error(&out, &needles);
        assert!(out.stdout_str().is_empty(), "{out}");
        let stored = std::fs::read_dir(sb.home().join("images/refs"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(stored, 0, "nothing is stored for a refused jar");
        assert!(
            max_rss_kib < 100 * 1024,
            "fuse peaked at {max_rss_kib} KiB on {name}"
        );
    }
}

/// Debian's H2 (libh2-java, in ci/setup): a real JVM server whose jar's Main-Class is the GUI
/// console, so the image runs another class of it.
const H2_JAR: &str = "/usr/share/java/h2.jar";

/// `fuse kill` of a detached instance, which must say it stopped it.
fn stop(instance: Detached<'_>) {
    let stopped = format!("stopped {}", instance.id);
    instance
        .kill()
        .assert_success()
        .assert_stdout_contains(&stopped);
}

/// Starts the H2 image detached with its database directory on the volume `h2data`, and
/// returns once its TCP server accepts connections on the host's `port`.
fn start_h2(sb: &Sandbox, port: u16) -> Detached<'_> {
    let runtime = sb.dir.join("run");
    let out = sb
        .fuse()
        .env("FUSE_RUNTIME_DIR", &runtime)
        .args(["run", "-d", "--accel", "tcg", "-p"])
        .arg(format!("{port}:9092"))
        .args(["--health", "tcp", "--health-timeout", "240"])
        .args(["-v", "h2data:/data:64M", "h2:latest"])
        .run();
    out.assert_success()
        .assert_stderr_contains(&format!(" ms at tcp://localhost:{port}\n"));
    Detached::new(sb, &runtime, out.stdout_str().trim())
}

/// H2's own SQL shell, on the host, against the server in the VM.
fn h2_shell(port: u16, sql: &str) -> fuse_tests::Output {
    fuse_tests::FuseCmd::program("java")
        .args(["-cp", H2_JAR, "org.h2.tools.Shell", "-url"])
        .arg(format!("jdbc:h2:tcp://127.0.0.1:{port}/test"))
        .args(["-user", "sa", "-password", "", "-sql", sql])
        .timeout(Duration::from_secs(180))
        .run()
}

/// Issue 12: "H2's TCP server reached by H2's Shell from the host". The image runs
/// `org.h2.tools.Server` (`[jvm] main_class`) with fuse.toml's `args`, its databases on a
/// volume; the host's H2 Shell creates a table through the published port, and the row is
/// still there after the VM is stopped and booted again.
#[test]
fn h2_tcp_server_is_reached_by_h2_shell_from_the_host() {
    assert!(
        Path::new(H2_JAR).is_file(),
        "{H2_JAR} is missing: apt-get install libh2-java (ci/setup)"
    );
    let sb = Sandbox::new();
    let jar = sb.dir.join("h2.jar");
    std::fs::copy(H2_JAR, &jar).unwrap();
    sb.dir.write(
        "fuse.toml",
        "args = [\"-tcp\", \"-tcpAllowOthers\", \"-tcpPort\", \"9092\", \"-ifNotExists\", \
         \"-baseDir\", \"/data\"]\n[jvm]\nmain_class = \"org.h2.tools.Server\"\n",
    );
    sb.fuse().arg("build").arg(&jar).run().assert_success();
    let inspect = json(
        sb.fuse()
            .args(["inspect", "--json", "h2:latest"])
            .run()
            .assert_success(),
    );
    assert_eq!(inspect["notes"]["jar.main-class"], "org.h2.tools.Server");
    // jdeps decides H2's modules (java.sql at least); were it to give up, the safe set would
    // be used with a warning and the server would run all the same.
    eprintln!(
        "h2 modules ({}): {}",
        inspect["notes"]["jdk.modules.source"], inspect["notes"]["jdk.modules"]
    );
    assert!(modules(&sb, "h2:latest").iter().any(|m| m == "java.sql"));
    // A headless JVM: java.desktop's display, sound and splash libraries are left out, and
    // with them X11 and ALSA.
    let listing = sb.rootfs_listing("h2:latest");
    for absent in [
        "libawt_xawt.so",
        "libjsound.so",
        "libsplashscreen.so",
        "libX11.so",
        "libasound.so",
    ] {
        assert!(!listing.contains(absent), "{absent} is in the image");
    }
    if modules(&sb, "h2:latest")
        .iter()
        .any(|m| m == "java.desktop")
    {
        assert!(listing.contains("libawt_headless.so"), "{listing}");
    }

    let port = free_port();
    let h2 = start_h2(&sb, port);
    let out = h2_shell(
        port,
        "CREATE TABLE t(x INT); INSERT INTO t VALUES (42); SELECT x FROM t",
    );
    out.assert_success();
    let stdout = out.stdout_str();
    assert!(stdout.lines().any(|l| l == "42"), "{out}");
    assert!(stdout.lines().any(|l| l.starts_with("(1 row")), "{out}");
    stop(h2);

    // The database lives on the volume, not in the VM: a new boot serves the same row.
    let h2 = start_h2(&sb, port);
    let out = h2_shell(port, "SELECT x * 2 FROM t");
    out.assert_success();
    assert!(out.stdout_str().lines().any(|l| l == "84"), "{out}");
    stop(h2);
    assert!(sb.home().join("volumes/h2data.ext4").is_file());
    assert_no_leaked_qemu();
}

/// What sqlite-jdbc, netty or zstd-jni do with the native library they bundle: extract it to
/// `java.io.tmpdir` and `System.load` it, else `System.loadLibrary` it from
/// `java.library.path`.
const JNI_LOADER: &str = r#"
import java.io.*;
import java.nio.file.*;
public class Greet {
    static native String hello();
    public static void main(String[] args) throws Exception {
        String arch = System.getProperty("os.arch").equals("amd64") ? "x86_64" : System.getProperty("os.arch");
        String res = "/native/Linux/" + arch + "/libgreet.so";
        try (InputStream in = Greet.class.getResourceAsStream(res)) {
            if (in == null) throw new IllegalStateException("no " + res + " in the jar");
            File f = File.createTempFile("libgreet-", ".so");
            f.deleteOnExit();
            Files.copy(in, f.toPath(), StandardCopyOption.REPLACE_EXISTING);
            System.load(f.getAbsolutePath());
            System.out.println("loaded the extracted copy");
        } catch (UnsatisfiedLinkError e) {
            System.out.println("extracted copy failed: " + e.getMessage());
            System.loadLibrary("greet");
        }
        System.out.println(hello());
    }
}
"#;

/// The JNI library: `Greet.hello()` hashes with libcrypt's `crypt` (a library the Java
/// runtime does not bring), the return value saying which copy was loaded.
fn greet_c(copy: &str) -> String {
    format!(
        r#"
#include <jni.h>
#include <crypt.h>
#include <stdio.h>
JNIEXPORT jstring JNICALL Java_Greet_hello(JNIEnv *env, jclass cls) {{
    char buf[256];
    snprintf(buf, sizeof buf, "{copy} greets: %s", crypt("fuse", "$6$fusesalt$"));
    return (*env)->NewStringUTF(env, buf);
}}
"#
    )
}

/// The builds of `libgreet.so` a jar bundles: glibc (linked with libcrypt), Android (glibc
/// too, told apart by its path only) and musl (needs musl's `libc.so`).
struct GreetBuilds {
    glibc: std::path::PathBuf,
    android: std::path::PathBuf,
    musl: std::path::PathBuf,
}

fn greet_builds(sb: &Sandbox, arch: &str) -> GreetBuilds {
    let jdk = Path::new("/usr/lib/jvm/java-17-openjdk-amd64/include");
    let include = format!("-I{}", jdk.display());
    let include_linux = format!("-I{}/linux", jdk.display());
    let lib = |name: &str, copy: &str, extra: &[&str]| {
        let mut args = vec!["-shared", "-fPIC", &include, &include_linux];
        args.extend(extra);
        sb.program_for(arch, &greet_c(copy), name, &args)
    };
    let glibc = lib("libgreet.so", "glibc", &["-lcrypt"]);
    let android = lib("android-libgreet.so", "android", &["-lcrypt"]);
    let fake_libc = sb.program_for(
        arch,
        "int musl_marker;",
        "libc.so",
        &["-shared", "-fPIC", "-nostdlib", "-Wl,-soname,libc.so"],
    );
    let lib_dir = format!("-L{}", fake_libc.parent().unwrap().display());
    let musl = sb.program_for(
        arch,
        "void *Java_Greet_hello(void) { return 0; }",
        "musl-libgreet.so",
        &[
            "-shared",
            "-fPIC",
            "-nostdlib",
            "-Wl,--no-as-needed",
            &lib_dir,
            "-l:libc.so",
        ],
    );
    GreetBuilds {
        glibc,
        android,
        musl,
    }
}

#[test]
fn jar_bundled_native_library_loads_from_the_jni_directory() {
    let arch = "x86_64";
    let sb = Sandbox::new();
    let dir = sb.dir.path();
    let GreetBuilds {
        glibc,
        android,
        musl,
    } = greet_builds(&sb, arch);
    let jar = java_jar(
        dir,
        "greet.jar",
        "Greet",
        &[("Greet.java", JNI_LOADER)],
        &[
            ("native/Linux-Android/x86_64/libgreet.so", &android),
            ("native/Linux-Musl/x86_64/libgreet.so", &musl),
            ("native/Linux/x86_64/libgreet.so", &glibc),
        ],
    );
    let out = sb
        .fuse()
        .args(["run", "--accel", "tcg", "--arch", arch])
        .arg(&jar)
        .run();
    out.assert_success()
        // The guest's /tmp is noexec: the library's own fallback is what loads it.
        .assert_stdout_contains("extracted copy failed")
        .assert_stdout_contains("glibc greets: $6$fusesalt$")
        .assert_stderr_contains(
            "placed 1 native library bundled in the jar in /usr/lib/x86_64-linux-gnu/jni",
        )
        .assert_stderr_contains("libgreet.so (from native/Linux/x86_64/libgreet.so)")
        .assert_stderr_contains("native/Linux-Musl/x86_64/libgreet.so (musl)")
        .assert_stderr_contains("native/Linux-Android/x86_64/libgreet.so (Android)");
    let stdout = out.stdout_str();
    assert!(!stdout.contains("android greets"), "{stdout}");
    let inspect = json(
        sb.fuse()
            .args(["inspect", "--json", "greet:latest"])
            .run()
            .assert_success(),
    );
    assert_eq!(inspect["notes"]["jar.natives"], "libgreet.so");
    // Same jar, another store: the same image.
    let other = Sandbox::new();
    let again = json(
        other
            .fuse()
            .args(["build", "--json", "--arch", arch])
            .arg(&jar)
            .run()
            .assert_success(),
    );
    assert_eq!(again["digest"], inspect["digest"]);
    assert_no_leaked_qemu();
}

/// [`JNI_LOADER`] for a Spring Boot fat jar: the library is in a nested jar.
const NESTED_JNI_LOADER: &str = r#"
import java.io.*;
import java.nio.file.*;
import java.util.jar.*;
public class Greet {
    static native String hello();
    public static void main(String[] args) throws Exception {
        String res = "native/Linux/x86_64/libgreet.so";
        try (JarInputStream in = new JarInputStream(
                Greet.class.getResourceAsStream("/BOOT-INF/lib/greet-native.jar"))) {
            JarEntry e;
            while ((e = in.getNextJarEntry()) != null && !e.getName().equals(res)) {}
            if (e == null) throw new IllegalStateException("no " + res + " in the nested jar");
            File f = File.createTempFile("libgreet-", ".so");
            f.deleteOnExit();
            Files.copy(in, f.toPath(), StandardCopyOption.REPLACE_EXISTING);
            System.load(f.getAbsolutePath());
            System.out.println("loaded the extracted copy");
        } catch (UnsatisfiedLinkError e) {
            System.out.println("extracted copy failed: " + e.getMessage());
            System.loadLibrary("greet");
        }
        System.out.println(hello());
    }
}
"#;

#[test]
fn native_library_in_a_nested_jar_of_a_fat_jar_loads() {
    let arch = "x86_64";
    let sb = Sandbox::new();
    let dir = sb.dir.path();
    let GreetBuilds { glibc, musl, .. } = greet_builds(&sb, arch);
    let native = java_jar(
        dir,
        "greet-native.jar",
        "",
        &[("Marker.java", "public class Marker {}")],
        &[
            ("native/Linux-Musl/x86_64/libgreet.so", &musl),
            ("native/Linux/x86_64/libgreet.so", &glibc),
        ],
    );
    let jar = java_jar(
        dir,
        "boot.jar",
        "Greet",
        &[("Greet.java", NESTED_JNI_LOADER)],
        &[("BOOT-INF/lib/greet-native.jar", &native)],
    );
    sb.fuse()
        .args(["run", "--accel", "tcg", "--arch", arch])
        .arg(&jar)
        .run()
        .assert_success()
        .assert_stdout_contains("extracted copy failed")
        .assert_stdout_contains("glibc greets: $6$fusesalt$")
        .assert_stderr_contains(
            "libgreet.so (from BOOT-INF/lib/greet-native.jar!/native/Linux/x86_64/libgreet.so)",
        )
        .assert_stderr_contains(
            "BOOT-INF/lib/greet-native.jar!/native/Linux-Musl/x86_64/libgreet.so (musl)",
        );
    assert_no_leaked_qemu();
}

/// A jar with `libgreet.so` for both machines: the image's is placed, and answers from it.
fn native_for_arch(arch: &str) {
    let sb = Sandbox::new();
    let dir = sb.dir.path();
    let jdk = Path::new("/usr/lib/jvm/java-17-openjdk-amd64/include");
    let include = format!("-I{}", jdk.display());
    let include_linux = format!("-I{}/linux", jdk.display());
    let src = r#"
#include <jni.h>
#include <stdio.h>
#include <sys/utsname.h>
JNIEXPORT jstring JNICALL Java_Greet_hello(JNIEnv *env, jclass cls) {
    char buf[256];
    struct utsname u;
    uname(&u);
    snprintf(buf, sizeof buf, "greets from the %s build on %s", BUILD, u.machine);
    return (*env)->NewStringUTF(env, buf);
}
"#;
    let build = |for_arch: &str| {
        let define = format!("-DBUILD=\"{for_arch}\"");
        sb.program_for(
            for_arch,
            src,
            &format!("libgreet-{for_arch}.so"),
            &["-shared", "-fPIC", &include, &include_linux, &define],
        )
    };
    let x86 = build("x86_64");
    let arm = build("aarch64");
    let jar = java_jar(
        dir,
        "greet.jar",
        "Greet",
        &[("Greet.java", JNI_LOADER)],
        &[
            ("native/Linux/aarch64/libgreet.so", &arm),
            ("native/Linux/x86_64/libgreet.so", &x86),
        ],
    );
    sb.fuse()
        .args(["run", "--accel", "tcg", "--arch", arch])
        .arg(&jar)
        .run()
        .assert_success()
        .assert_stdout_contains("extracted copy failed")
        .assert_stdout_contains(&format!("greets from the {arch} build on {arch}"))
        .assert_stderr_contains(&format!(
            "in /usr/lib/{arch}-linux-gnu/jni (on java.library.path, where it loads from when extracting to /tmp fails): libgreet.so (from native/Linux/{arch}/libgreet.so)"
        ));
    assert_no_leaked_qemu();
}

/// An app drawing with AWT in the VM: headless (no display libraries in the image), it
/// fills a BufferedImage and encodes it as PNG through libawt and ImageIO.
#[test]
fn headless_awt_draws_into_an_image_and_encodes_it() {
    let sb = Sandbox::new();
    let src = r#"
import java.awt.*;
import java.awt.image.BufferedImage;
import java.io.ByteArrayOutputStream;
import javax.imageio.ImageIO;
public class Draw {
    public static void main(String[] a) throws Exception {
        BufferedImage img = new BufferedImage(64, 64, BufferedImage.TYPE_INT_RGB);
        Graphics2D g = img.createGraphics();
        g.setColor(Color.RED);
        g.fillOval(8, 8, 48, 48);
        g.dispose();
        ByteArrayOutputStream png = new ByteArrayOutputStream();
        ImageIO.write(img, "png", png);
        System.out.println("headless " + GraphicsEnvironment.isHeadless() + " centre "
            + Integer.toHexString(img.getRGB(32, 32)) + " png " + (png.size() > 100));
    }
}
"#;
    let jar = java_jar(
        sb.dir.path(),
        "draw.jar",
        "Draw",
        &[("Draw.java", src)],
        &[],
    );
    let out = sb.fuse().args(["run", "--accel", "tcg"]).arg(&jar).run();
    out.assert_success()
        .assert_stdout_contains("headless true centre ffff0000 png true");
    assert!(modules(&sb, "draw:latest")
        .iter()
        .any(|m| m == "java.desktop"));
    let listing = sb.rootfs_listing("draw:latest");
    assert!(!listing.contains("libX11.so"), "{listing}");
    assert_no_leaked_qemu();
}
