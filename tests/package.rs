//! The Debian package (`scripts/build-deb.sh`, `packaging/deb/`): built from the test binary,
//! inspected with `dpkg-deb`, then installed, removed and purged for real with `dpkg`, checking
//! what each step leaves on the machine.
//!
//! The lifecycle test needs root and a Debian machine (dpkg, systemd-analyze); it installs only
//! its own package, marked by its Maintainer field, and refuses to run where a logbridge package
//! or user it did not make exists. The package is built with gzip at level 1 (xz, the release
//! default, takes about ten seconds on the unstripped debug binary).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_logbridge");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The Maintainer field of the packages this test builds: how it knows an installed logbridge
/// package is its own (left by an earlier run that failed) and may be purged.
const TEST_MAINTAINER: &str = "logbridge package test <package-test@localhost>";

const UNIT: &str = "/lib/systemd/system/logbridge.service";
const ENV_FILE: &str = "/etc/default/logbridge";
const CONFIG: &str = "/etc/logbridge/logbridge.toml";
const STATE_DIR: &str = "/var/lib/logbridge";
const LOGS_DIR: &str = "/var/log/logbridge";
/// Where deb-systemd-helper records the links `systemctl enable` would make.
const DSH_STATE: &str = "/var/lib/systemd/deb-systemd-helper-enabled/logbridge.service.dsh-also";

/// What a stop takes beyond `drain_timeout_ms`: the consumer's finish grace (2 s), the final
/// commit (at most 1 s), leaving the group and closing the clients (src/consumer/mod.rs:
/// "shutdown must stay within drain_timeout_ms + a few seconds").
const STOP_MARGIN_MS: u64 = 5_000;

/// Lines the test adds to the installed environment file: two overrides it then finds in the
/// effective configuration.
const ENV_OVERRIDES: &str = "\n# added by tests/package.rs\n\
    LOGBRIDGE_KAFKA__BROKERS=kafka-a.package-test:9092,kafka-b.package-test:9092\n\
    LOGBRIDGE_KAFKA__GROUP_ID=\"package-test\"\n";

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program}: {err}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a command that must succeed and returns its standard output.
fn succeed(program: &str, args: &[&str]) -> String {
    let output = run(program, args);
    assert!(
        output.status.success(),
        "{program} {}: {}\n{}{}",
        args.join(" "),
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// Builds the package from the test binary into `out` and returns its path.
fn build_deb(out: &Path) -> PathBuf {
    let output = Command::new("sh")
        .current_dir(ROOT)
        .arg("scripts/build-deb.sh")
        .arg("--out")
        .arg(out)
        .args(["--compression", "gzip", BIN])
        .env("LOGBRIDGE_DEB_MAINTAINER", TEST_MAINTAINER)
        .output()
        .expect("run scripts/build-deb.sh");
    assert!(
        output.status.success(),
        "scripts/build-deb.sh: {}\n{}",
        output.status,
        text(&output.stderr)
    );
    let arch = succeed("dpkg", &["--print-architecture"]);
    let expected = out.join(format!("logbridge_{VERSION}_{}.deb", arch.trim()));
    assert_eq!(
        text(&output.stdout).trim(),
        expected.to_str().expect("utf-8 path"),
        "the script prints the package's path"
    );
    assert!(expected.is_file(), "{} was not written", expected.display());
    expected
}

/// The `key=value` settings of one section of a unit file (the last value of a key repeated).
fn unit_section(unit: &str, section: &str) -> BTreeMap<String, String> {
    let mut current = String::new();
    let mut settings = BTreeMap::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.to_string();
        } else if current == section {
            if let Some((key, value)) = line.split_once('=') {
                settings.insert(key.trim().to_string(), value.trim().to_string());
            }
        }
    }
    settings
}

/// A systemd time span (`30`, `30s`, `1min 30s`, `90sec`, `500ms`) in milliseconds; a bare
/// number is seconds, as systemd reads TimeoutStopSec.
fn time_span_ms(span: &str) -> u64 {
    let mut total = 0;
    for part in span.split_whitespace() {
        let digits = part
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(part.len());
        let (number, unit) = part.split_at(digits);
        let number: u64 = number
            .parse()
            .unwrap_or_else(|_| panic!("a time span this test reads: {span}"));
        let unit_ms = match unit {
            "ms" | "msec" => 1,
            "" | "s" | "sec" | "second" | "seconds" => 1_000,
            "m" | "min" | "minute" | "minutes" => 60_000,
            "h" | "hr" | "hour" | "hours" => 3_600_000,
            _ => panic!("a time span unit this test reads: {span}"),
        };
        total += number * unit_ms;
    }
    total
}

/// The variables an EnvironmentFile= gives the service: `NAME=value` lines, blank lines and
/// `#`/`;` comments skipped, one pair of surrounding quotes removed (the subset of systemd's
/// syntax the packaged file and this test use).
fn environment_file(contents: &str) -> Vec<(String, String)> {
    contents
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#') && !line.starts_with(';'))
        .map(|line| {
            let (name, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not NAME=value: {line}"));
            let value = value.trim();
            let unquoted = ['"', '\'']
                .iter()
                .find_map(|q| value.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)))
                .unwrap_or(value);
            (name.trim().to_string(), unquoted.to_string())
        })
        .collect()
}

/// The installed package's `${Status}` and `${Maintainer}`, or None when dpkg knows no
/// logbridge package (or only that it is not installed).
fn installed_package() -> Option<(String, String)> {
    let output = run(
        "dpkg-query",
        &["-W", "-f=${Status}\t${Maintainer}", "logbridge"],
    );
    if !output.status.success() {
        return None;
    }
    let line = text(&output.stdout);
    let (status, maintainer) = line.split_once('\t').unwrap_or((&line, ""));
    (!status.ends_with("not-installed")).then(|| (status.to_string(), maintainer.to_string()))
}

/// Runs dpkg, waiting while another dpkg or apt holds its lock (other work on a shared
/// machine), for at most two minutes.
fn dpkg(args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let output = run("dpkg", args);
        let stderr = text(&output.stderr);
        if !output.status.success()
            && stderr.contains("locked by another process")
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        assert!(
            output.status.success(),
            "dpkg {}: {}\n{}{stderr}",
            args.join(" "),
            output.status,
            text(&output.stdout)
        );
        return format!("{}{stderr}", text(&output.stdout));
    }
}

/// The uid and gid of a user, or None when it does not exist.
fn user(name: &str) -> Option<(u32, u32)> {
    let output = run("getent", &["passwd", name]);
    if !output.status.success() {
        return None;
    }
    let entry = text(&output.stdout);
    let fields: Vec<&str> = entry.trim().split(':').collect();
    let id = |n: usize| fields.get(n).and_then(|f| f.parse().ok());
    Some((
        id(2).expect("uid in getent passwd"),
        id(3).expect("gid in getent passwd"),
    ))
}

fn group_exists(name: &str) -> bool {
    run("getent", &["group", name]).status.success()
}

/// Owner, group and permission bits of an installed path.
fn owner_and_mode(path: &str) -> (u32, u32, u32) {
    let metadata = std::fs::metadata(path).unwrap_or_else(|err| panic!("{path}: {err}"));
    (metadata.uid(), metadata.gid(), metadata.mode() & 0o7777)
}

/// Purges the test's package when the test ends, passed or failed, so that a failure leaves
/// nothing installed.
struct PurgeOnDrop;

impl Drop for PurgeOnDrop {
    fn drop(&mut self) {
        if matches!(installed_package(), Some((_, maintainer)) if maintainer == TEST_MAINTAINER) {
            let _ = run("dpkg", &["--purge", "logbridge"]);
        }
    }
}

#[test]
fn the_package_holds_the_binary_the_unit_the_conffiles_and_the_maintainer_scripts() {
    let out = tempfile::tempdir().expect("tempdir");
    let deb = build_deb(out.path());
    let deb = deb.to_str().expect("utf-8 path");

    let info = succeed("dpkg-deb", &["--info", deb]);
    let arch = succeed("dpkg", &["--print-architecture"]);
    for field in [
        "Package: logbridge".to_string(),
        format!("Version: {VERSION}"),
        format!("Architecture: {}", arch.trim()),
    ] {
        assert!(info.contains(&field), "{field} in:\n{info}");
    }
    let depends = info
        .lines()
        .find_map(|line| line.trim().strip_prefix("Depends: "))
        .unwrap_or_else(|| panic!("a Depends field in:\n{info}"));
    for package in ["libc6", "passwd", "procps"] {
        assert!(
            depends.contains(package),
            "Depends names {package}: {depends}"
        );
    }
    for script in ["postinst", "prerm", "postrm", "conffiles", "md5sums"] {
        assert!(
            info.contains(script),
            "{script} in the control archive:\n{info}"
        );
    }
    let conffiles = succeed("dpkg-deb", &["--info", deb, "conffiles"]);
    let mut conffiles: Vec<&str> = conffiles.lines().collect();
    conffiles.sort_unstable();
    assert_eq!(conffiles, [ENV_FILE, CONFIG]);

    // `dpkg-deb --contents` lists like `tar tv`: mode, owner/group, size, date, time, path.
    let contents = succeed("dpkg-deb", &["--contents", deb]);
    let listed: BTreeMap<&str, (&str, &str)> = contents
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some((
                fields.get(5)?.trim_start_matches('.'),
                (fields[0], fields[1]),
            ))
        })
        .collect();
    for (path, mode) in [
        ("/usr/bin/logbridge", "-rwxr-xr-x"),
        (UNIT, "-rw-r--r--"),
        (ENV_FILE, "-rw-------"),
        (CONFIG, "-rw-r-----"),
        ("/usr/share/doc/logbridge/copyright", "-rw-r--r--"),
        ("/usr/share/doc/logbridge/runbook.md.gz", "-rw-r--r--"),
        (
            "/usr/share/doc/logbridge/examples/alerts.yml.gz",
            "-rw-r--r--",
        ),
        (
            "/usr/share/doc/logbridge/examples/alerts.test.yml.gz",
            "-rw-r--r--",
        ),
    ] {
        assert_eq!(
            listed.get(path),
            Some(&(mode, "root/root")),
            "{path} in:\n{contents}"
        );
    }
    assert!(
        !listed.keys().any(|path| path.starts_with(STATE_DIR)),
        "the state directory is the postinst's, owned by the service user:\n{contents}"
    );
}

#[test]
fn the_packaged_configuration_passes_check_config() {
    let output = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(Path::new(ROOT).join("packaging/deb/logbridge.toml"))
        .env_remove("LOGBRIDGE_CONFIG")
        .output()
        .expect("run logbridge");
    assert!(output.status.success(), "{}", text(&output.stderr));
}

/// Install, configure through the environment file, remove, purge: each step's effect on the
/// machine, with the unit as systemd reads it.
#[test]
fn installing_runs_as_a_system_user_removing_keeps_conffiles_and_purging_leaves_nothing() {
    let uid = succeed("id", &["-u"]);
    assert_eq!(
        uid.trim(),
        "0",
        "installing a package needs root: run this test as root on a Debian machine (CI does)"
    );
    // A failed earlier run left its package: purge it. Anything else is not ours to touch.
    if let Some((status, maintainer)) = installed_package() {
        assert_eq!(
            maintainer, TEST_MAINTAINER,
            "a logbridge package this test did not build is on this machine ({status}); \
             the test would replace and purge it: run it elsewhere"
        );
        dpkg(&["--purge", "logbridge"]);
    }
    assert!(
        user("logbridge").is_none() && !group_exists("logbridge"),
        "a logbridge user or group exists without the package; the purge would delete it: \
         run this test elsewhere (or userdel/groupdel it if an earlier run left it)"
    );
    assert!(
        !Path::new(STATE_DIR).exists() && !Path::new("/etc/logbridge").exists(),
        "{STATE_DIR} or /etc/logbridge exists without the package: not this test's to delete"
    );

    let out = tempfile::tempdir().expect("tempdir");
    let deb = build_deb(out.path());
    let _purge = PurgeOnDrop;
    dpkg(&["--install", deb.to_str().expect("utf-8 path")]);
    let (status, _) = installed_package().expect("installed");
    assert_eq!(status, "install ok installed");

    // The service user: a system account with no login, its group and home the state directory.
    let (uid, gid) = user("logbridge").expect("the postinst creates the user logbridge");
    assert!(uid < 1000, "a system user (uid {uid})");
    let passwd = succeed("getent", &["passwd", "logbridge"]);
    assert!(
        passwd
            .trim()
            .ends_with(&format!(":{STATE_DIR}:/usr/sbin/nologin")),
        "home and shell: {passwd}"
    );
    let group = succeed("getent", &["group", "logbridge"]);
    assert!(
        group.contains(&format!(":{gid}:")),
        "its own group: {group}"
    );

    for (path, expected) in [
        ("/usr/bin/logbridge", (0, 0, 0o755)),
        (UNIT, (0, 0, 0o644)),
        (ENV_FILE, (0, 0, 0o600)),
        ("/etc/logbridge", (0, 0, 0o755)),
        (CONFIG, (0, gid, 0o640)),
        (STATE_DIR, (uid, gid, 0o750)),
    ] {
        assert_eq!(
            owner_and_mode(path),
            expected,
            "{path}: (uid, gid, mode) with logbridge = ({uid}, {gid})"
        );
    }
    let version = succeed("/usr/bin/logbridge", &["--version"]);
    assert!(
        version.starts_with(&format!("logbridge {VERSION}")),
        "{version}"
    );

    // The unit as specified: who runs it, how it stops, restarts and reloads.
    let unit_text = std::fs::read_to_string(UNIT).expect("the unit is installed");
    let service = unit_section(&unit_text, "Service");
    for (key, value) in [
        ("User", "logbridge"),
        ("EnvironmentFile", "-/etc/default/logbridge"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("KillSignal", "SIGTERM"),
        ("Restart", "on-failure"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("StateDirectory", "logbridge"),
        ("WorkingDirectory", STATE_DIR),
    ] {
        assert_eq!(service.get(key).map(String::as_str), Some(value), "{key}=");
    }
    for key in ["RestartSec", "LimitNOFILE", "LogsDirectory"] {
        assert!(service.contains_key(key), "{key}= is set");
    }
    assert_eq!(
        unit_section(&unit_text, "Install")
            .get("WantedBy")
            .map(String::as_str),
        Some("multi-user.target")
    );
    assert!(
        Path::new("/bin/kill").is_file(),
        "ExecReload's /bin/kill (procps, in Depends)"
    );

    // systemd-analyze verify prints what it ignores (an unknown key, a bad value) and still
    // exits 0, so any output fails too.
    let verify = run("systemd-analyze", &["verify", UNIT]);
    assert!(
        verify.status.success() && verify.stdout.is_empty() && verify.stderr.is_empty(),
        "systemd-analyze verify {UNIT}: {}\n{}{}",
        verify.status,
        text(&verify.stdout),
        text(&verify.stderr)
    );

    // An override typed into the environment file reaches the configuration the service runs
    // with: check-config with what ExecStart names, started as the service is (its user and
    // group, its working directory, only the environment file's variables), prints the
    // effective configuration.
    let exec_start: Vec<&str> = service
        .get("ExecStart")
        .expect("ExecStart=")
        .split_whitespace()
        .collect();
    assert_eq!(
        exec_start,
        [
            "/usr/bin/logbridge",
            "--log-format",
            "json",
            "run",
            "--config",
            CONFIG
        ]
    );
    let mut env_file = std::fs::read_to_string(ENV_FILE).expect("the environment file");
    assert!(
        environment_file(&env_file).is_empty(),
        "the shipped environment file only has commented examples"
    );
    env_file.push_str(ENV_OVERRIDES);
    std::fs::write(ENV_FILE, &env_file).expect("edit the environment file");
    let check = Command::new(exec_start[0])
        .args(["check-config", "--config", exec_start[5]])
        .env_clear()
        .envs(environment_file(&env_file))
        .current_dir(STATE_DIR)
        .uid(uid)
        .gid(gid)
        .output()
        .expect("run the installed logbridge as logbridge");
    assert!(
        check.status.success(),
        "check-config of the installed configuration as the service user: {}\n{}",
        check.status,
        text(&check.stderr)
    );
    let effective: toml::Table = text(&check.stdout)
        .parse()
        .expect("check-config prints the effective configuration as TOML");
    let kafka = effective["kafka"].as_table().expect("[kafka]");
    assert_eq!(
        kafka["brokers"].as_str(),
        Some("kafka-a.package-test:9092,kafka-b.package-test:9092")
    );
    assert_eq!(kafka["group_id"].as_str(), Some("package-test"));

    // A stop must be able to drain: systemd's SIGKILL comes after TimeoutStopSec.
    let drain_ms = effective["pipeline"]["drain_timeout_ms"]
        .as_integer()
        .and_then(|ms| u64::try_from(ms).ok())
        .expect("pipeline.drain_timeout_ms");
    let stop_ms = time_span_ms(service.get("TimeoutStopSec").expect("TimeoutStopSec="));
    assert!(
        stop_ms >= drain_ms + STOP_MARGIN_MS,
        "TimeoutStopSec ({stop_ms} ms) must exceed drain_timeout_ms ({drain_ms} ms) by \
         {STOP_MARGIN_MS} ms"
    );

    // Installing again (what an upgrade runs: the postinst with the old version) keeps the
    // edited environment file and leaves user, owners and modes as they were.
    dpkg(&["--install", deb.to_str().expect("utf-8 path")]);
    assert_eq!(
        std::fs::read_to_string(ENV_FILE).expect("the environment file"),
        env_file,
        "an edited conffile survives a reinstallation"
    );
    assert_eq!(user("logbridge"), Some((uid, gid)), "the same user");
    assert_eq!(owner_and_mode(CONFIG), (0, gid, 0o640));
    assert_eq!(owner_and_mode(STATE_DIR), (uid, gid, 0o750));

    // remove: the program and the unit go; the configuration (as edited), the user and the
    // data stay.
    std::fs::write(Path::new(STATE_DIR).join("errors.jsonl"), "{}\n").expect("write output");
    dpkg(&["--remove", "logbridge"]);
    let (status, _) = installed_package().expect("known to dpkg after remove");
    assert_eq!(status, "deinstall ok config-files");
    for gone in ["/usr/bin/logbridge", UNIT, "/usr/share/doc/logbridge"] {
        assert!(!Path::new(gone).exists(), "{gone} removed");
    }
    assert_eq!(
        std::fs::read_to_string(ENV_FILE).expect("the environment file stays"),
        env_file
    );
    assert!(Path::new(CONFIG).is_file(), "{CONFIG} stays");
    assert!(user("logbridge").is_some(), "the user stays");
    assert!(
        Path::new(STATE_DIR).join("errors.jsonl").is_file(),
        "the data stays"
    );

    // purge: nothing of the package is left.
    dpkg(&["--purge", "logbridge"]);
    assert_eq!(installed_package(), None, "dpkg forgets the package");
    for gone in [
        ENV_FILE,
        CONFIG,
        "/etc/logbridge",
        STATE_DIR,
        LOGS_DIR,
        DSH_STATE,
    ] {
        assert!(!Path::new(gone).exists(), "{gone} purged");
    }
    assert!(user("logbridge").is_none(), "the user is removed");
    assert!(!group_exists("logbridge"), "the group is removed");
}

#[test]
fn time_spans_read_as_systemd_reads_them() {
    assert_eq!(time_span_ms("30"), 30_000);
    assert_eq!(time_span_ms("30s"), 30_000);
    assert_eq!(time_span_ms("1min 30s"), 90_000);
    assert_eq!(time_span_ms("500ms"), 500);
}
