//! Debian's `mosquitto` (2.x) as a child process, for tests against a real, strict broker: a TLS
//! or plain listener with the rules a test sets (password file, ACL, size limits, client
//! certificates), and always a second, plain listener on loopback for the test's own
//! subscriber (the `collector` user, who may read `#`).
//!
//! Each broker lives in its own temporary directory (config, password and ACL files, log).
//! Ports: mosquitto cannot listen on port 0, so free loopback ports are picked (bind
//! `127.0.0.1:0`, read the port, let it go) and the start is retried with new ones when another
//! process took one in between. [`Mosquitto::restart`] keeps the ports. The broker is killed when
//! the [`Mosquitto`] is dropped, and its log (everything it wrote, across restarts) is printed
//! then if the test is failing.
//!
//! mosquitto missing is a failure, never a skip: `.ci/run` installs it.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Collector;

/// What a test run says when the broker is not installed.
pub const NOT_INSTALLED: &str =
    "mosquitto is not installed: .ci/run installs it (apt-get install mosquitto)";

/// The user of the test's own subscriber, on the second listener.
pub const COLLECTOR_USER: &str = "collector";

/// Attempts at starting with fresh ports when one was taken in between.
const PORT_ATTEMPTS: usize = 8;

/// How long a start may take before it is a failure.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS listener's files and client-certificate rules.
#[derive(Debug, Clone)]
pub struct Tls {
    /// The CA (PEM) that client certificates must chain to (`cafile`).
    pub ca_file: PathBuf,
    /// The broker's certificate chain (PEM, `certfile`).
    pub cert_file: PathBuf,
    /// The broker's private key (PEM, `keyfile`).
    pub key_file: PathBuf,
    /// Refuse clients without a certificate signed by `ca_file` (`require_certificate`).
    pub require_certificate: bool,
    /// Take the client certificate's CN as the user name (`use_identity_as_username`; needs
    /// `require_certificate`, and the password file is then not used on this listener).
    pub use_identity_as_username: bool,
}

impl Tls {
    /// A TLS listener with `ca_file`, `cert_file` and `key_file`, no client certificate asked.
    pub fn new(
        ca_file: impl Into<PathBuf>,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Tls {
        Tls {
            ca_file: ca_file.into(),
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            require_certificate: false,
            use_identity_as_username: false,
        }
    }

    /// Clients must present a certificate signed by the CA.
    pub fn require_certificate(mut self) -> Tls {
        self.require_certificate = true;
        self
    }

    /// Clients must present a certificate signed by the CA, and its CN is their user name.
    pub fn identity_as_username(mut self) -> Tls {
        self.require_certificate = true;
        self.use_identity_as_username = true;
        self
    }
}

/// How a [`Mosquitto`] is set up. Without any call, a plain listener that refuses anonymous
/// clients (mosquitto 2's default) and knows no user.
#[derive(Debug, Clone, Default)]
pub struct MosquittoBuilder {
    tls: Option<Tls>,
    users: Vec<(String, String)>,
    acl: Vec<(String, String)>,
    max_packet_size: Option<u32>,
    message_size_limit: Option<u32>,
    allow_anonymous: bool,
    no_retain: bool,
}

impl MosquittoBuilder {
    /// The main listener speaks TLS.
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// A user of the main listener's password file.
    pub fn user(mut self, name: &str, password: &str) -> Self {
        assert!(
            !name.contains([':', '\n']) && !password.contains('\n'),
            "a password file line cannot hold {name:?}"
        );
        self.users.push((name.to_owned(), password.to_owned()));
        self
    }

    /// `user` may publish to `topic` (a filter). Once any ACL line is given, a user may do
    /// only what its lines allow; without any, everyone may do everything.
    pub fn allow_write(self, user: &str, topic: &str) -> Self {
        self.acl_line(user, "write", topic)
    }

    /// `user` may subscribe to and receive `topic` (a filter).
    pub fn allow_read(self, user: &str, topic: &str) -> Self {
        self.acl_line(user, "read", topic)
    }

    /// `user` may publish to and receive `topic` (a filter).
    pub fn allow_readwrite(self, user: &str, topic: &str) -> Self {
        self.acl_line(user, "readwrite", topic)
    }

    fn acl_line(mut self, user: &str, access: &str, topic: &str) -> Self {
        assert!(
            !user.contains('\n') && !topic.contains('\n'),
            "an ACL line cannot hold {user:?} or {topic:?}"
        );
        self.acl
            .push((user.to_owned(), format!("topic {access} {topic}")));
        self
    }

    /// MQTT packets larger than `bytes` (whole packet) make the broker drop the client; MQTT 5
    /// clients are told the limit in the CONNACK (`max_packet_size`).
    pub fn max_packet_size(mut self, bytes: u32) -> Self {
        self.max_packet_size = Some(bytes);
        self
    }

    /// Publishes whose payload is larger than `bytes` are refused: not forwarded, a QoS 1
    /// one acknowledged with "implementation specific error" (0x83) to MQTT 5 clients
    /// (`message_size_limit`).
    pub fn message_size_limit(mut self, bytes: u32) -> Self {
        self.message_size_limit = Some(bytes);
        self
    }

    /// The broker keeps no retained messages (`retain_available false`): an MQTT 5 CONNECT
    /// with a retained will is refused (0x9A), and the CONNACK says so.
    pub fn without_retain(mut self) -> Self {
        self.no_retain = true;
        self
    }

    /// Clients without a user name may connect to the main listener.
    pub fn allow_anonymous(mut self, allow: bool) -> Self {
        self.allow_anonymous = allow;
        self
    }

    /// Writes the files and starts the broker; panics (with its log) when it cannot.
    pub async fn start(self) -> Mosquitto {
        let binary = find_binary("mosquitto");
        let dir = tempfile::Builder::new()
            .prefix("mosquitto-")
            .tempdir()
            .expect("a temporary directory for mosquitto");
        let collector_password = format!("c-{:016x}", rand::random::<u64>());
        let files = self.write_files(dir.path(), &collector_password);
        let mut broker = Mosquitto {
            binary,
            builder: self,
            files,
            collector_password,
            port: 0,
            collector_port: 0,
            child: None,
            dir,
        };
        broker.start_on_free_ports().await;
        broker
    }

    /// The password and ACL files (the config is written per start, as it names the ports).
    fn write_files(&self, dir: &Path, collector_password: &str) -> Files {
        let passwd = (!self.users.is_empty()).then(|| {
            let mut text = String::new();
            for (user, password) in &self.users {
                let _ = writeln!(text, "{user}:{password}");
            }
            let path = dir.join("users.passwd");
            hashed_password_file(&path, &text);
            path
        });
        let acl = (!self.acl.is_empty()).then(|| {
            let mut text = String::new();
            let mut users: Vec<&str> = self.acl.iter().map(|(u, _)| u.as_str()).collect();
            users.sort_unstable();
            users.dedup();
            for user in users {
                let _ = writeln!(text, "user {user}");
                for (_, line) in self.acl.iter().filter(|(u, _)| u == user) {
                    let _ = writeln!(text, "{line}");
                }
                text.push('\n');
            }
            let path = dir.join("users.acl");
            write_private(&path, &text);
            path
        });
        let collector_passwd = dir.join("collector.passwd");
        hashed_password_file(
            &collector_passwd,
            &format!("{COLLECTOR_USER}:{collector_password}\n"),
        );
        let collector_acl = dir.join("collector.acl");
        write_private(
            &collector_acl,
            &format!("user {COLLECTOR_USER}\ntopic read #\n"),
        );
        Files {
            config: dir.join("mosquitto.conf"),
            log: dir.join("mosquitto.log"),
            passwd,
            acl,
            collector_passwd,
            collector_acl,
        }
    }
}

/// The files of one broker.
#[derive(Debug)]
struct Files {
    config: PathBuf,
    log: PathBuf,
    passwd: Option<PathBuf>,
    acl: Option<PathBuf>,
    collector_passwd: PathBuf,
    collector_acl: PathBuf,
}

/// A mosquitto broker running as a child process on 127.0.0.1. Killed when dropped.
#[derive(Debug)]
pub struct Mosquitto {
    binary: PathBuf,
    builder: MosquittoBuilder,
    files: Files,
    collector_password: String,
    port: u16,
    collector_port: u16,
    child: Option<Child>,
    // Last: the directory goes once the broker is gone.
    dir: tempfile::TempDir,
}

impl Mosquitto {
    /// A broker to set up.
    pub fn builder() -> MosquittoBuilder {
        MosquittoBuilder::default()
    }

    /// The main listener's port (TLS when the builder asked for it).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The main listener's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The plain listener of the test's own subscriber.
    pub fn collector_port(&self) -> u16 {
        self.collector_port
    }

    /// The user name and password of the test's own subscriber, on [`Mosquitto::collector_port`].
    pub fn collector_login(&self) -> (&str, &str) {
        (COLLECTOR_USER, &self.collector_password)
    }

    /// A subscriber to `filter` on the collector listener.
    pub async fn collector(&self, filter: &str) -> Collector {
        Collector::start_as(self.collector_port, filter, Some(self.collector_login())).await
    }

    /// The broker's directory (config, password and ACL files, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The file the broker logs to (everything, across restarts).
    pub fn log_path(&self) -> &Path {
        &self.files.log
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.files.log).unwrap_or_default()
    }

    /// Whether the broker process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops the broker (SIGTERM, then SIGKILL if it lingers) and waits until it is gone.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Changes the broker's rules (users, ACL) while it runs: rewrites its password and ACL
    /// files and sends SIGHUP, which makes mosquitto read them again. Connected clients stay
    /// connected; their next publish is judged by the new rules.
    pub async fn reload_with(&mut self, change: impl FnOnce(MosquittoBuilder) -> MosquittoBuilder) {
        let builder = change(std::mem::take(&mut self.builder));
        let files = builder.write_files(self.dir.path(), &self.collector_password);
        assert_eq!(
            files.acl, self.files.acl,
            "an ACL must exist from the start to be reloaded"
        );
        self.builder = builder;
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .arg("-HUP")
                .arg(child.id().to_string())
                .status();
        }
        // mosquitto handles the signal in its main loop.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// Kills the broker at once (SIGKILL), as a crash or a power cut would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the broker and starts it again on the same ports (retrying while the old
    /// sockets linger); its sessions and retained messages are gone (no persistence).
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            match self.launch().await {
                Ok(()) => return,
                Err(Launch::PortTaken(log)) => {
                    last = log;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(Launch::Failed(why)) => self.fail(&why),
            }
        }
        self.fail(&format!(
            "mosquitto could not get its ports {} and {} back: {last}",
            self.port, self.collector_port
        ));
    }

    /// Starts on fresh free ports, again with others while one was taken in between.
    async fn start_on_free_ports(&mut self) {
        for _ in 0..PORT_ATTEMPTS {
            self.port = free_port();
            self.collector_port = free_port();
            if self.port == self.collector_port {
                continue;
            }
            match self.launch().await {
                Ok(()) => return,
                Err(Launch::PortTaken(_)) => continue,
                Err(Launch::Failed(why)) => self.fail(&why),
            }
        }
        self.fail("no free pair of loopback ports after several attempts");
    }

    /// Writes the config for the current ports, spawns the broker and waits until both
    /// listeners accept connections.
    async fn launch(&mut self) -> Result<(), Launch> {
        std::fs::write(&self.files.config, self.config_text()).expect("the config is written");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.files.log)
            .expect("the log file opens");
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let stderr = log.try_clone().expect("the log file handle is cloned");
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.files.config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .spawn()
            .map_err(|e| Launch::Failed(format!("{} cannot run: {e}", self.binary.display())))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                let log = self.log_since(log_start);
                return Err(if log.contains("Address already in use") {
                    Launch::PortTaken(log)
                } else {
                    Launch::Failed(format!("mosquitto exited at start with {status}"))
                });
            }
            // "running" is logged once every listener is open.
            if self.log_since(log_start).contains(" running") && self.accepts().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Launch::Failed(format!(
                    "mosquitto did not accept connections within {START_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether both listeners accept a TCP connection.
    async fn accepts(&self) -> bool {
        for port in [self.port, self.collector_port] {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }

    /// The log written from byte `start` on.
    fn log_since(&self, start: u64) -> String {
        let log = std::fs::read(&self.files.log).unwrap_or_default();
        let start = usize::try_from(start).unwrap_or(usize::MAX).min(log.len());
        String::from_utf8_lossy(&log[start..]).into_owned()
    }

    /// The config for the current ports.
    fn config_text(&self) -> String {
        let b = &self.builder;
        let f = &self.files;
        let mut c = String::new();
        // Each listener has its own users and ACL; the collector's listener is the test's.
        c.push_str("per_listener_settings true\npersistence false\n");
        // Started as root, mosquitto would switch to the `mosquitto` user, who cannot read
        // the test's files; as any other user this line has no effect.
        c.push_str("user root\n");
        c.push_str("log_dest stderr\nlog_type all\nconnection_messages true\n");
        c.push_str("log_timestamp_format %H:%M:%S\n");
        if let Some(n) = b.max_packet_size {
            let _ = writeln!(c, "max_packet_size {n}");
        }
        if let Some(n) = b.message_size_limit {
            let _ = writeln!(c, "message_size_limit {n}");
        }
        if b.no_retain {
            c.push_str("retain_available false\n");
        }
        let _ = writeln!(c, "\nlistener {} 127.0.0.1", self.port);
        let _ = writeln!(c, "allow_anonymous {}", b.allow_anonymous);
        if let Some(passwd) = &f.passwd {
            let _ = writeln!(c, "password_file {}", passwd.display());
        }
        if let Some(acl) = &f.acl {
            let _ = writeln!(c, "acl_file {}", acl.display());
        }
        if let Some(tls) = &b.tls {
            let _ = writeln!(c, "cafile {}", tls.ca_file.display());
            let _ = writeln!(c, "certfile {}", tls.cert_file.display());
            let _ = writeln!(c, "keyfile {}", tls.key_file.display());
            let _ = writeln!(c, "require_certificate {}", tls.require_certificate);
            let _ = writeln!(
                c,
                "use_identity_as_username {}",
                tls.use_identity_as_username
            );
        }
        let _ = writeln!(c, "\nlistener {} 127.0.0.1", self.collector_port);
        c.push_str("allow_anonymous false\n");
        let _ = writeln!(c, "password_file {}", f.collector_passwd.display());
        let _ = writeln!(c, "acl_file {}", f.collector_acl.display());
        c
    }

    /// Panics with `why`, the config and the log.
    fn fail(&mut self, why: &str) -> ! {
        self.kill();
        panic!(
            "{why}\n--- mosquitto config ({}):\n{}\n--- mosquitto log ({}):\n{}",
            self.files.config.display(),
            std::fs::read_to_string(&self.files.config).unwrap_or_default(),
            self.files.log.display(),
            self.log()
        );
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- mosquitto log ({}):\n{}",
                self.files.log.display(),
                self.log()
            );
        }
    }
}

/// Why a launch did not give a running broker.
enum Launch {
    /// Another process took one of the ports (the log says so).
    PortTaken(String),
    /// Anything else: a failure of the test setup.
    Failed(String),
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Where `name` is installed: on `PATH`, or in the sbin directories a user's `PATH` may lack.
/// Panics with [`NOT_INSTALLED`] when nowhere.
fn find_binary(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/bin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{NOT_INSTALLED} ({name} not found)"))
}

/// Writes `text` to `path`, readable by its owner only.
fn write_private(path: &Path, text: &str) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .expect("a broker file is created");
    file.write_all(text.as_bytes())
        .expect("a broker file is written");
}

/// Writes `user:password` lines to `path` and hashes them with `mosquitto_passwd -U`.
fn hashed_password_file(path: &Path, plain: &str) {
    write_private(path, plain);
    let tool = find_binary("mosquitto_passwd");
    let out = Command::new(&tool)
        .arg("-U")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("mosquitto_passwd runs");
    assert!(
        out.status.success(),
        "{} -U {} failed: {}{}",
        tool.display(),
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let hashed = std::fs::read_to_string(path).unwrap_or_default();
    assert_eq!(
        hashed.lines().count(),
        plain.lines().count(),
        "mosquitto_passwd kept every user"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(
        expected = "mosquitto is not installed: .ci/run installs it (apt-get install mosquitto)"
    )]
    fn a_missing_binary_fails_the_test_with_the_fix() {
        find_binary("mosquitto-that-is-not-there");
    }

    #[test]
    fn acl_lines_are_grouped_by_user() {
        let b = Mosquitto::builder()
            .allow_write("b", "x/#")
            .allow_read("a", "y")
            .allow_readwrite("b", "z");
        let dir = tempfile::tempdir().unwrap();
        let files = b.write_files(dir.path(), "pw");
        let acl = std::fs::read_to_string(files.acl.unwrap()).unwrap();
        assert_eq!(
            acl,
            "user a\ntopic read y\n\nuser b\ntopic write x/#\ntopic readwrite z\n\n"
        );
    }
}
