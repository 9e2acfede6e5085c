//! Apache Kafka for the broker tier: the broker users run, as processes on loopback.
//!
//! `scripts/install-kafka.sh` resolves the pinned `org.apache.kafka:kafka_2.13` from Maven
//! Central into a cache folder (the test helpers run it when the folder is missing). Each
//! [`ApacheKafka`] is a KRaft cluster of combined broker+controller nodes in a folder of its
//! own: every node's log directory is formatted with the storage tool, then `kafka.Kafka` runs
//! with a small heap, and the cluster counts as started when it answers a metadata request
//! naming all its brokers. Nodes can be killed (SIGKILL) and started again on the same log
//! directory. Dropping the cluster kills its nodes and removes its folder.
//!
//! Every broker process is started by one long-lived thread of the test process with
//! `PR_SET_PDEATHSIG`, so a test binary that dies (or a shared broker that no test stops)
//! never leaves a JVM behind: the kernel kills the broker when the test process ends.
//!
//! [`shared`] is one single-node broker per test binary, for tests that are independent on it
//! (each uses its own topics and groups, see [`crate::common::Kafka::apache`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// A port free now, for a broker's listener. Kafka needs its ports before it starts (every
/// node lists the controllers' ports, and advertises its own), so they are picked here and
/// released; another process may take one before the broker binds it: the broker then exits
/// ("Address already in use") and the cluster is started again on other ports (see
/// [`ApacheKafka::start_with`] and [`ApacheKafka::wait_ready`]).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("free port")
}

/// How many times a cluster is started on freshly picked ports when a node cannot bind one.
const PORT_ATTEMPTS: usize = 3;

/// The KRaft cluster id every test cluster is formatted with (any 16 bytes in base64url).
const CLUSTER_ID: &str = "bG9nYnJpZGdlLXRlc3Q";

/// The heap and JIT a test broker runs with: the machines have two cores, shared with the
/// tests and logbridge. C1 only and the serial collector halve the CPU a broker takes to start
/// (about 2 s of CPU instead of 4) and keep it small (about 300 MB resident).
const JVM_OPTIONS: &[&str] = &[
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:-UsePerfData",
    "-Djava.awt.headless=true",
];

/// The folder with the broker's jars, installed on first use.
pub fn kafka_libs() -> PathBuf {
    static LIBS: OnceLock<PathBuf> = OnceLock::new();
    LIBS.get_or_init(|| {
        if let Some(libs) = std::env::var_os("LOGBRIDGE_KAFKA_LIBS") {
            return PathBuf::from(libs);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-kafka.sh");
        let output = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/install-kafka.sh");
        assert!(
            output.status.success(),
            "scripts/install-kafka.sh failed (Java 17+ and Maven are needed)"
        );
        PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
    })
    .clone()
}

/// Starts `command` from a thread that lives as long as the test process, with the broker
/// tied to it: the kernel sends SIGKILL to the child when that thread ends (at process exit).
/// `PR_SET_PDEATHSIG` follows the thread that forked, so a test's own thread (which ends with
/// the test) cannot be the one.
fn spawn_tied(command: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("broker-spawner".into())
            .spawn(move || {
                use std::os::unix::process::CommandExt;
                // Ends only with the process: the sender lives in a static.
                for (mut command, reply) in incoming {
                    let parent = std::process::id() as libc::pid_t;
                    // SAFETY: prctl and getppid are async-signal-safe, as pre_exec requires.
                    unsafe {
                        command.pre_exec(move || {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            // The test process died between fork and prctl.
                            if libc::getppid() != parent {
                                return Err(std::io::Error::other("test process gone"));
                            }
                            Ok(())
                        });
                    }
                    // The asking test may have given up; the child is then dropped (and killed
                    // at exit like every other).
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("start the broker spawner thread");
        Mutex::new(requests)
    });
    let (reply, answer) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send((command, reply))
        .expect("broker spawner running");
    answer.recv().expect("broker spawner answered")
}

/// A listener a secured cluster adds beside PLAINTEXT (which the test helpers use as admins).
#[derive(Clone, Debug)]
pub enum Secured {
    /// TLS; with `client_auth` the client must show a certificate the CA signed (mutual TLS).
    Tls { client_auth: bool },
    /// SASL over TLS (SCRAM, and PLAIN for the PLAIN users of `Options::users`).
    SaslSsl,
    /// SASL without TLS.
    SaslPlaintext,
}

impl Secured {
    fn name(&self) -> &'static str {
        match self {
            Secured::Tls { client_auth: false } => "TLS",
            Secured::Tls { client_auth: true } => "MTLS",
            Secured::SaslSsl => "SASLTLS",
            Secured::SaslPlaintext => "SASL",
        }
    }

    fn protocol(&self) -> &'static str {
        match self {
            Secured::Tls { .. } => "SSL",
            Secured::SaslSsl => "SASL_SSL",
            Secured::SaslPlaintext => "SASL_PLAINTEXT",
        }
    }

    fn sasl(&self) -> bool {
        matches!(self, Secured::SaslSsl | Secured::SaslPlaintext)
    }
}

/// How a cluster is set up.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Nodes, each broker and controller (all controllers vote): 1 or 3.
    pub nodes: usize,
    /// Extra or replaced `server.properties` lines.
    pub properties: Vec<(String, String)>,
    /// Secured listeners, served with `tls`.
    pub secured: Vec<Secured>,
    /// The broker's PEM keystore (its unencrypted PKCS#8 key, its certificate and the chain
    /// up to the CA, in one file: Kafka reads it with `ssl.keystore.type=PEM` and no
    /// password), and the PEM file of the CA client certificates are checked against.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// SASL users: (mechanism, user, password). `SCRAM-SHA-256` and `SCRAM-SHA-512`
    /// credentials are written into the cluster metadata at format time (the storage tool's
    /// `--add-scram`); `PLAIN` users are listed in the SASL listeners' JAAS configuration, and
    /// PLAIN is offered only when there is one.
    pub users: Vec<(String, String, String)>,
    /// ACLs on (StandardAuthorizer); `User:ANONYMOUS` and the SASL user `admin` are super
    /// users. ANONYMOUS is every client of the PLAINTEXT listener (the controllers, replication,
    /// the tests' admin) and also of a TLS listener without client authentication; a client
    /// certificate's principal is its common name.
    pub acls: bool,
    /// The port node 1's PLAINTEXT listener is given first (others are picked free): a test of
    /// the start on other ports holds it.
    pub first_port: Option<u16>,
}

struct Node {
    id: u32,
    port: u16,
    controller_port: u16,
    /// Secured listeners' ports, in the order of `Options::secured`.
    secured_ports: Vec<u16>,
    child: Option<Child>,
    /// When the current process was started, for its start-up time.
    launched: Option<Instant>,
    /// Sizes of the node's output and log files when the current process was started: what
    /// it wrote comes after.
    output_from: [u64; 2],
}

/// An Apache Kafka cluster of combined broker+controller nodes on loopback.
pub struct ApacheKafka {
    nodes: Vec<Node>,
    options: Options,
    dir: PathBuf,
    /// How long formatting the log directories took (one storage tool run per node).
    pub formatted_in: Duration,
    /// How long the last full start took until the cluster answered metadata.
    pub started_in: Duration,
    /// Times a node could not bind one of its ports (taken since it was picked): at the first
    /// start the cluster starts again on other ports, on a restart the node is launched again.
    pub port_clashes: usize,
    /// The client [`ApacheKafka::leader`] asks, made on first use and kept: tests poll leaders
    /// every few milliseconds while one moves, and a client per question opens connections and
    /// threads each time. (Each answer is a fresh metadata request, not a cached one.)
    metadata: OnceLock<BaseConsumer>,
}

/// A folder for one cluster's files: `<tmp>/logbridge-kafka/<pid>-<n>`. Folders of test
/// processes that are gone (their shared broker is never dropped) are removed first.
fn cluster_dir() -> PathBuf {
    static SEQUENCE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let root = std::env::temp_dir().join("logbridge-kafka");
    std::fs::create_dir_all(&root).expect("kafka test folder");
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let owner = name
                .split('-')
                .next()
                .and_then(|pid| pid.parse::<u32>().ok());
            if let Some(pid) = owner {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }
    let n = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = root.join(format!("{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("cluster folder");
    dir
}

impl ApacheKafka {
    /// One combined node, plaintext.
    pub fn start() -> ApacheKafka {
        ApacheKafka::start_with(Options {
            nodes: 1,
            ..Options::default()
        })
    }

    /// Three nodes: replication factor 3 and `min.insync.replicas = 2` for every topic.
    pub fn cluster() -> ApacheKafka {
        ApacheKafka::start_with(Options {
            nodes: 3,
            ..Options::default()
        })
    }

    pub fn start_with(options: Options) -> ApacheKafka {
        assert!(
            options.nodes == 1 || options.nodes == 3,
            "1 or 3 nodes, not {}",
            options.nodes
        );
        let libs = kafka_libs();
        let dir = cluster_dir();
        let nodes = (1..=options.nodes as u32)
            .map(|id| Node {
                id,
                port: 0,
                controller_port: 0,
                secured_ports: Vec::new(),
                child: None,
                launched: None,
                output_from: [0; 2],
            })
            .collect();
        let mut cluster = ApacheKafka {
            nodes,
            options,
            dir,
            formatted_in: Duration::ZERO,
            started_in: Duration::ZERO,
            port_clashes: 0,
            metadata: OnceLock::new(),
        };
        std::fs::write(
            cluster.dir.join("log4j2.properties"),
            log4j_config(&cluster.dir),
        )
        .expect("log4j2 config");
        for attempt in 1..=PORT_ATTEMPTS {
            cluster.pick_ports(attempt == 1);
            let formatting = Instant::now();
            for index in 0..cluster.nodes.len() {
                std::fs::write(cluster.properties_path(index), cluster.properties(index))
                    .expect("server.properties");
                cluster.format(&libs, index);
            }
            cluster.formatted_in = formatting.elapsed();
            let started = Instant::now();
            for index in 0..cluster.nodes.len() {
                cluster.launch(index);
            }
            match cluster.wait_answering(Duration::from_secs(90), OnClash::GiveUp) {
                Ok(()) => {
                    cluster.started_in = started.elapsed();
                    return cluster;
                }
                Err(clash) => {
                    println!(
                        "{clash} (attempt {attempt} of {PORT_ATTEMPTS}); starting the cluster \
                         again on other ports"
                    );
                    // Nothing of this attempt is kept: its log directories are formatted
                    // again with the new ports.
                    for index in 0..cluster.nodes.len() {
                        if let Some(mut child) = cluster.nodes[index].child.take() {
                            let _ = child.kill();
                            let _ = child.wait();
                        }
                        let _ = std::fs::remove_dir_all(cluster.log_dir(index));
                    }
                }
            }
        }
        panic!(
            "Apache Kafka could not bind its ports in {PORT_ATTEMPTS} attempts:\n{}",
            cluster.log_tail(40)
        );
    }

    /// Picks every node's ports (node 1's PLAINTEXT port from `Options::first_port` at first).
    fn pick_ports(&mut self, first: bool) {
        let secured = self.options.secured.len();
        for node in &mut self.nodes {
            node.port = free_port();
            node.controller_port = free_port();
            node.secured_ports = (0..secured).map(|_| free_port()).collect();
        }
        if let (true, Some(port)) = (first, self.options.first_port) {
            self.nodes[0].port = port;
        }
    }

    fn properties_path(&self, index: usize) -> PathBuf {
        self.dir
            .join(format!("node-{}.properties", self.nodes[index].id))
    }

    fn log_dir(&self, index: usize) -> PathBuf {
        self.dir.join(format!("node-{}", self.nodes[index].id))
    }

    /// The node's `server.properties`.
    fn properties(&self, index: usize) -> String {
        let node = &self.nodes[index];
        let n = self.nodes.len();
        let voters: Vec<String> = self
            .nodes
            .iter()
            .map(|node| format!("{}@127.0.0.1:{}", node.id, node.controller_port))
            .collect();
        let mut listeners = vec![
            format!("PLAINTEXT://127.0.0.1:{}", node.port),
            format!("CONTROLLER://127.0.0.1:{}", node.controller_port),
        ];
        let mut advertised = vec![format!("PLAINTEXT://127.0.0.1:{}", node.port)];
        let mut protocols = vec![
            "PLAINTEXT:PLAINTEXT".to_string(),
            "CONTROLLER:PLAINTEXT".to_string(),
        ];
        for (secured, port) in self.options.secured.iter().zip(&node.secured_ports) {
            listeners.push(format!("{}://127.0.0.1:{port}", secured.name()));
            advertised.push(format!("{}://127.0.0.1:{port}", secured.name()));
            protocols.push(format!("{}:{}", secured.name(), secured.protocol()));
        }
        let (replication, min_isr) = if n >= 3 { (3, 2) } else { (1, 1) };
        let mut properties: Vec<(String, String)> = [
            ("process.roles", "broker,controller".to_string()),
            ("node.id", node.id.to_string()),
            ("controller.quorum.voters", voters.join(",")),
            ("listeners", listeners.join(",")),
            ("advertised.listeners", advertised.join(",")),
            ("controller.listener.names", "CONTROLLER".into()),
            ("inter.broker.listener.name", "PLAINTEXT".into()),
            ("listener.security.protocol.map", protocols.join(",")),
            ("log.dirs", self.log_dir(index).display().to_string()),
            ("num.partitions", "1".into()),
            ("default.replication.factor", replication.to_string()),
            ("min.insync.replicas", min_isr.to_string()),
            ("offsets.topic.replication.factor", replication.to_string()),
            ("offsets.topic.num.partitions", "10".into()),
            (
                "transaction.state.log.replication.factor",
                replication.to_string(),
            ),
            ("transaction.state.log.min.isr", min_isr.to_string()),
            ("transaction.state.log.num.partitions", "10".into()),
            // Tests create their topics; a typo must not create one.
            ("auto.create.topics.enable", "false".into()),
            // A group's first join is not held back 3 s waiting for more members.
            ("group.initial.rebalance.delay.ms", "0".into()),
            // The KIP-848 `consumer` protocol's session is set on the broker (45 s by default,
            // and clients cannot change it): the classic tests' 6 s, so that a killed member
            // is expired as fast under both protocols.
            ("group.consumer.min.session.timeout.ms", "6000".into()),
            ("group.consumer.session.timeout.ms", "6000".into()),
            ("group.consumer.min.heartbeat.interval.ms", "1000".into()),
            ("group.consumer.heartbeat.interval.ms", "1000".into()),
            // Two cores: few threads.
            ("num.network.threads", "2".into()),
            ("num.io.threads", "2".into()),
            ("background.threads", "2".into()),
            ("num.recovery.threads.per.data.dir", "1".into()),
            ("num.replica.fetchers", "1".into()),
            ("log.cleaner.threads", "1".into()),
            // The compaction test's cleaner runs within a second, in a small buffer.
            ("log.cleaner.backoff.ms", "500".into()),
            ("log.cleaner.dedupe.buffer.size", "16777216".into()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect();
        if !self.options.secured.is_empty() {
            let (keystore, ca) = self
                .options
                .tls
                .as_ref()
                .expect("secured listeners need Options::tls");
            let plain_users: Vec<String> = self
                .options
                .users
                .iter()
                .filter(|(mechanism, _, _)| mechanism == "PLAIN")
                .map(|(_, user, password)| format!("user_{user}=\"{password}\""))
                .collect();
            let mut mechanisms = vec!["SCRAM-SHA-256", "SCRAM-SHA-512"];
            if !plain_users.is_empty() {
                mechanisms.push("PLAIN");
            }
            properties.extend(
                [
                    // A PEM keystore holding an unencrypted key needs no `ssl.key.password`
                    // (and a PEM keystore refuses `ssl.keystore.password`).
                    ("ssl.keystore.type", "PEM".to_string()),
                    ("ssl.keystore.location", keystore.display().to_string()),
                    ("ssl.truststore.type", "PEM".to_string()),
                    ("ssl.truststore.location", ca.display().to_string()),
                    ("sasl.enabled.mechanisms", mechanisms.join(",")),
                    // The principal of a client certificate is its common name.
                    (
                        "ssl.principal.mapping.rules",
                        "RULE:^CN=([^,]*).*$/$1/,DEFAULT".into(),
                    ),
                ]
                .into_iter()
                .map(|(key, value)| (key.to_string(), value)),
            );
            for secured in &self.options.secured {
                let listener = format!("listener.name.{}", secured.name().to_lowercase());
                if let Secured::Tls { client_auth: true } = secured {
                    properties.push((format!("{listener}.ssl.client.auth"), "required".into()));
                }
                if !secured.sasl() {
                    continue;
                }
                // A SASL listener needs a JAAS login module per mechanism (without one the
                // broker does not start: "Could not find a 'KafkaServer' or
                // '<listener>.KafkaServer' entry in the JAAS configuration"). SCRAM's takes no
                // options: it checks against the credentials in the cluster metadata.
                for mechanism in ["scram-sha-256", "scram-sha-512"] {
                    properties.push((
                        format!("{listener}.{mechanism}.sasl.jaas.config"),
                        "org.apache.kafka.common.security.scram.ScramLoginModule required;".into(),
                    ));
                }
                if !plain_users.is_empty() {
                    properties.push((
                        format!("{listener}.plain.sasl.jaas.config"),
                        format!(
                            "org.apache.kafka.common.security.plain.PlainLoginModule required {};",
                            plain_users.join(" ")
                        ),
                    ));
                }
            }
        }
        if self.options.acls {
            properties.extend(
                [
                    (
                        "authorizer.class.name",
                        "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                    ),
                    // The PLAINTEXT listener (controllers, replication, the tests' admin) and
                    // the SCRAM user `admin`.
                    ("super.users", "User:ANONYMOUS;User:admin"),
                ]
                .into_iter()
                .map(|(key, value)| (key.to_string(), value.to_string())),
            );
        }
        for (key, value) in &self.options.properties {
            properties.retain(|(existing, _)| existing != key);
            properties.push((key.clone(), value.clone()));
        }
        properties
            .iter()
            .map(|(key, value)| format!("{key}={value}\n"))
            .collect()
    }

    fn java(&self, libs: &Path) -> Command {
        let mut command = Command::new("java");
        command
            .args(JVM_OPTIONS)
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.dir.join("log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", libs.display()))
            .current_dir(&self.dir);
        command
    }

    fn format(&self, libs: &Path, index: usize) {
        let mut command = self.java(libs);
        command.args([
            "kafka.tools.StorageTool",
            "format",
            "--ignore-formatted",
            "-t",
        ]);
        command
            .arg(CLUSTER_ID)
            .arg("-c")
            .arg(self.properties_path(index));
        let scram = self
            .options
            .users
            .iter()
            .filter(|(mechanism, _, _)| mechanism.starts_with("SCRAM-"));
        for (mechanism, user, password) in scram {
            command
                .arg("--add-scram")
                .arg(format!("{mechanism}=[name={user},password={password}]"));
        }
        let output = command.output().expect("run kafka's storage tool");
        assert!(
            output.status.success(),
            "formatting node {}: {}{}",
            self.nodes[index].id,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn launch(&mut self, index: usize) {
        let libs = kafka_libs();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node-{}.out", self.nodes[index].id)))
            .expect("broker output file");
        let mut command = self.java(&libs);
        command
            .arg(format!("-Dlogbridge.node={}", self.nodes[index].id))
            .arg("kafka.Kafka")
            .arg(self.properties_path(index))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        let output_from = self.output_files(index).map(|file| {
            std::fs::metadata(file)
                .map(|metadata| metadata.len())
                .unwrap_or(0)
        });
        let child = spawn_tied(command).expect("start the Kafka broker (java)");
        let node = &mut self.nodes[index];
        node.child = Some(child);
        node.launched = Some(Instant::now());
        node.output_from = output_from;
    }

    /// The node's standard output and error, and its log.
    fn output_files(&self, index: usize) -> [PathBuf; 2] {
        let id = self.nodes[index].id;
        [
            self.dir.join(format!("node-{id}.out")),
            self.dir.join(format!("node-{id}.log")),
        ]
    }

    /// What the node's current process wrote to its output and log.
    fn output_since_launch(&self, index: usize) -> String {
        let mut text = String::new();
        for (file, from) in self
            .output_files(index)
            .iter()
            .zip(self.nodes[index].output_from)
        {
            let bytes = std::fs::read(file).unwrap_or_default();
            let from = (from as usize).min(bytes.len());
            text.push_str(&String::from_utf8_lossy(&bytes[from..]));
        }
        text
    }

    /// PLAINTEXT bootstrap servers of every node.
    pub fn brokers(&self) -> String {
        self.nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Bootstrap servers of the secured listener `secured` (as given in `Options::secured`).
    pub fn secured_brokers(&self, which: usize) -> String {
        self.nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.secured_ports[which]))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node ids, in order.
    pub fn node_ids(&self) -> Vec<u32> {
        self.nodes.iter().map(|node| node.id).collect()
    }

    fn index_of(&self, id: u32) -> usize {
        self.nodes
            .iter()
            .position(|node| node.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// Waits until a metadata request lists every running node; panics with the log tail if
    /// that does not happen within `deadline`, or if a node exits. A node (started again)
    /// that could not bind its ports, taken since, is launched again on them.
    pub fn wait_ready(&mut self, deadline: Duration) {
        if let Err(clash) = self.wait_answering(deadline, OnClash::Relaunch) {
            panic!("{clash}");
        }
    }

    /// [`ApacheKafka::wait_ready`], which gives up on a port clash when `on_clash` says so
    /// (and returns what clashed).
    fn wait_answering(&mut self, deadline: Duration, on_clash: OnClash) -> Result<(), String> {
        let started = Instant::now();
        let client: BaseConsumer = self.client().create().expect("metadata client");
        while started.elapsed() < deadline {
            for index in 0..self.nodes.len() {
                let exited = match self.nodes[index].child.as_mut().map(Child::try_wait) {
                    Some(Ok(Some(status))) => status,
                    _ => continue,
                };
                let output = self.output_since_launch(index);
                let id = self.nodes[index].id;
                if !output.contains("Address already in use") {
                    panic!(
                        "Apache Kafka node {id} exited ({exited}):\n{}",
                        self.log_tail(40)
                    );
                }
                self.port_clashes += 1;
                let clash = format!(
                    "Apache Kafka node {id} could not bind one of its ports (taken since they \
                     were picked): {}",
                    output
                        .lines()
                        .find(|line| line.contains("Address already in use"))
                        .unwrap_or_default()
                        .trim()
                );
                self.nodes[index].child = None;
                match on_clash {
                    OnClash::GiveUp => return Err(clash),
                    OnClash::Relaunch => {
                        println!("{clash}; launched again on the same ports");
                        // The port is held by another process for a while: a pause, not
                        // a loop of JVM starts.
                        std::thread::sleep(Duration::from_millis(500));
                        self.launch(index);
                    }
                }
            }
            let running = self
                .nodes
                .iter()
                .filter(|node| node.child.is_some())
                .count();
            if let Ok(metadata) = client.fetch_metadata(None, Duration::from_secs(2)) {
                if metadata.brokers().len() >= running {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let running = self
            .nodes
            .iter()
            .filter(|node| node.child.is_some())
            .count();
        panic!(
            "Apache Kafka did not answer metadata with {running} brokers within {deadline:?}:\n{}",
            self.log_tail(40)
        );
    }

    /// A client configuration for the PLAINTEXT listeners.
    pub fn client(&self) -> ClientConfig {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", self.brokers());
        client
    }

    /// SIGKILL one node (no controlled shutdown: its partitions' leadership moves only once the
    /// controller notices, after `broker.session.timeout.ms`).
    pub fn kill(&mut self, id: u32) {
        let index = self.index_of(id);
        if let Some(mut child) = self.nodes[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until `node` is back in the in-sync replicas of every partition of `topics` (so that
    /// the next kill leaves two of three in sync).
    pub async fn wait_in_sync(&self, topics: &[&str], node: u32) -> bool {
        let client: BaseConsumer = self.client().create().expect("metadata client");
        super::wait_for(Duration::from_secs(90), || {
            let client = &client;
            async move {
                topics.iter().all(|topic| {
                    client
                        .fetch_metadata(Some(topic), Duration::from_secs(5))
                        .is_ok_and(|metadata| {
                            metadata.topics()[0]
                                .partitions()
                                .iter()
                                .all(|partition| partition.isr().contains(&(node as i32)))
                        })
                })
            }
        })
        .await
    }

    /// Kills the node leading `topic`'s `partition`; returns it, how long until another node led
    /// the partition, and how long until `progress` moved past where it was at the kill (`Err`
    /// saying so if it did not within 90 s).
    pub async fn kill_leader<F>(
        &mut self,
        topic: &str,
        partition: i32,
        progress: F,
    ) -> (u32, Duration, Result<Duration, String>)
    where
        F: Fn() -> i64,
    {
        let leader = super::retrying("partition leader", || {
            self.leader(topic, partition)
                .ok_or(rdkafka::error::KafkaError::MetadataFetch(
                    rdkafka::types::RDKafkaErrorCode::LeaderNotAvailable,
                ))
        });
        let before = progress();
        let killed_at = Instant::now();
        self.kill(leader);
        let moved = super::wait_for(Duration::from_secs(60), || async {
            self.leader(topic, partition)
                .is_some_and(|now| now != leader)
        })
        .await;
        assert!(moved, "no new leader for {topic}/{partition}");
        let led_after = killed_at.elapsed();
        let resumed =
            super::wait_for(Duration::from_secs(90), || async { progress() > before }).await;
        let resumed = match resumed {
            true => Ok(killed_at.elapsed()),
            false => Err(format!(
                "{topic}/{partition} made no progress after its leader (node {leader}) died: \
                 {before} then {}\n{}",
                progress(),
                self.log_tail(20)
            )),
        };
        (leader, led_after, resumed)
    }

    /// Starts a node again on its log directory and ports; returns without waiting.
    pub fn start_node(&mut self, id: u32) {
        let index = self.index_of(id);
        assert!(self.nodes[index].child.is_none(), "node {id} is running");
        self.launch(index);
    }

    /// Pid of a running node.
    pub fn pid(&self, id: u32) -> Option<u32> {
        self.nodes[self.index_of(id)].child.as_ref().map(Child::id)
    }

    /// When a node was last launched.
    pub fn launched(&self, id: u32) -> Option<Instant> {
        self.nodes[self.index_of(id)].launched
    }

    /// The leader of a partition, as metadata says now.
    pub fn leader(&self, topic: &str, partition: i32) -> Option<u32> {
        let client = self.metadata.get_or_init(|| {
            self.client()
                .create()
                .expect("a metadata client for the cluster")
        });
        let metadata = client
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()?;
        let leader = metadata
            .topics()
            .first()?
            .partitions()
            .iter()
            .find(|p| p.id() == partition)?
            .leader();
        (leader >= 0).then_some(leader as u32)
    }

    /// Runs a Kafka command-line tool class (e.g. `org.apache.kafka.tools.AclCommand`) with
    /// `args`; panics with its output if it fails.
    pub fn tool(&self, class: &str, args: &[&str]) -> String {
        let output = self
            .java(&kafka_libs())
            .arg(class)
            .args(args)
            .output()
            .expect("run a kafka tool");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "{class} {args:?}: {text}");
        text
    }

    /// Resident memory (bytes) and CPU time used so far of a node's process, from /proc.
    pub fn usage(&self, id: u32) -> Option<(u64, Duration)> {
        let pid = self.pid(id)?;
        let process = procfs::process::Process::new(pid as i32).ok()?;
        let stat = process.stat().ok()?;
        let ticks = procfs::ticks_per_second() as f64;
        let page = procfs::page_size();
        Some((
            stat.rss * page,
            Duration::from_secs_f64((stat.utime + stat.stime) as f64 / ticks),
        ))
    }

    /// The last `lines` lines of every node's log (for failure messages).
    pub fn log_tail(&self, lines: usize) -> String {
        let mut tail = String::new();
        for node in &self.nodes {
            for name in [
                format!("node-{}.out", node.id),
                format!("node-{}.log", node.id),
            ] {
                let text = std::fs::read_to_string(self.dir.join(&name)).unwrap_or_default();
                let all: Vec<&str> = text.lines().collect();
                tail.push_str(&format!("--- {name}\n"));
                for line in &all[all.len().saturating_sub(lines)..] {
                    tail.push_str(line);
                    tail.push('\n');
                }
            }
        }
        tail
    }

    /// The cluster's folder (log directories, configuration, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for ApacheKafka {
    fn drop(&mut self) {
        // The client goes first, while its brokers still answer.
        drop(self.metadata.take());
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// What [`ApacheKafka::wait_answering`] does when a node could not bind a port.
#[derive(Clone, Copy)]
enum OnClash {
    /// Returns the clash: the cluster starts again on other ports.
    GiveUp,
    /// Launches the node again on its ports (a node started again: the others know them).
    Relaunch,
}

/// Broker logs at WARN (or `LOGBRIDGE_KAFKA_LOG`, e.g. INFO) in one file per node.
fn log4j_config(dir: &Path) -> String {
    format!(
        r#"status = error
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = {dir}/node-${{sys:logbridge.node:-all}}.log
appender.file.filePattern = {dir}/node-${{sys:logbridge.node:-all}}.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
rootLogger.level = ${{env:LOGBRIDGE_KAFKA_LOG:-WARN}}
rootLogger.appenderRef.file.ref = FILE
"#,
        dir = dir.display()
    )
}

/// A folder for files a cluster is started with (its certificates), removed like a cluster's
/// folder once this test process is gone.
pub fn files_dir() -> PathBuf {
    cluster_dir()
}

/// One single-node broker for this test binary, started on first use and killed when the
/// test process ends (see [`spawn_tied`]). Tests on it use their own topics and groups.
pub fn shared() -> &'static ApacheKafka {
    static SHARED: OnceLock<ApacheKafka> = OnceLock::new();
    SHARED.get_or_init(ApacheKafka::start)
}
