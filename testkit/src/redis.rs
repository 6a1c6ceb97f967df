//! A dSSM-like topology on loopback addresses (127.0.0.0/8) from Debian's `redis-server` and `redis-sentinel`: one
//! primary, two replicas, three sentinels (quorum 2), TLS only, client certificates required,
//! TLS replication, each process with its own copy of the four files as a Secret volume mounts
//! them. Each process has a loopback IP of its own, a new one when it is recreated, and a fresh
//! config then (as a pod of a StatefulSet without volumes for it): a DB finds its primary by
//! asking the sentinels. Every process is killed when the topology is dropped, also when a test
//! fails.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;

pub const MASTER: &str = "mymaster";

/// Waits for `f` to return Some, polling; panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    wait_polling_every(Duration::from_millis(50), what, timeout, f)
}

/// `wait_for`, polling every `every`: a poll that runs several redis-cli (each a process and a
/// TLS handshake on a 4096-bit key) takes the CPU the processes it waits for need.
pub fn wait_polling_every<T>(
    every: Duration,
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(every);
    }
}

fn require(binary: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = Path::new(dir).join(binary);
        if p.exists() {
            return p;
        }
    }
    panic!("{binary} is not installed: run scripts/setup (apt-get install redis-server redis-sentinel)");
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes the Secrets' `data` into `dir` as a Secret volume would: one file per key, the bytes
/// base64-decoded from the manifests `generate` wrote (what `kubectl apply` stores).
pub fn mount_from_manifests(manifests: &Path, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    for manifest in ["certs-secret.yaml", "keys-secret.yaml"] {
        let doc: serde_json::Value =
            serde_yaml::from_slice(&std::fs::read(manifests.join(manifest)).unwrap()).unwrap();
        for (key, value) in doc["data"].as_object().unwrap() {
            let bytes = b64.decode(value.as_str().unwrap()).unwrap();
            std::fs::write(dir.join(key), bytes).unwrap();
        }
    }
    for f in [
        "dssm-ca.crt",
        "dssm-cert.crt",
        "dssm-key.key",
        "dhparam2048.pem",
    ] {
        assert!(dir.join(f).exists(), "{f} missing from the Secrets");
    }
    dir.to_path_buf()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Db,
    Sentinel,
}

pub struct Proc {
    pub name: String,
    pub role: Role,
    /// Its pod IP: a loopback address of its own, a new one each time it is recreated (unless
    /// the topology keeps addresses, see `Topology::new_ip_on_restart`).
    pub ip: String,
    /// Its port, the same for the life of the topology (a pod's container port).
    pub port: u16,
    pub dir: PathBuf,
    pub mount: PathBuf,
    child: Option<Child>,
}

impl Proc {
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// `ip:port`, where Redis and Sentinel (and the tool) reach it now.
    pub fn endpoint(&self) -> String {
        dssm_certs::redis::join_host_port(&self.ip, self.port)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Port → the IP its process has now: the tests' DNS (ports are unique per process, IPs change).
fn addresses() -> &'static Mutex<HashMap<u16, String>> {
    static A: OnceLock<Mutex<HashMap<u16, String>>> = OnceLock::new();
    A.get_or_init(Default::default)
}

/// The IP of the test process listening on `port` now (127.0.0.1 for one outside a topology).
pub fn ip_of(port: u16) -> String {
    addresses()
        .lock()
        .unwrap()
        .get(&port)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1".into())
}

/// `ip:port` of the test process listening on `port` now.
pub fn endpoint(port: u16) -> String {
    dssm_certs::redis::join_host_port(&ip_of(port), port)
}

fn register(p: &Proc) {
    addresses().lock().unwrap().insert(p.port, p.ip.clone());
}

/// A loopback address no other process of this machine's tests uses: 127.X.Y.Z with X from
/// this test process's id (never 127.0.*.*), Y.Z counting up.
fn new_ip() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let c = NEXT.fetch_add(1, Ordering::Relaxed);
    let x = 1 + std::process::id() % 254;
    format!("127.{x}.{}.{}", (c / 254) % 256, 1 + c % 254)
}

fn tls_lines(mount: &Path) -> String {
    format!(
        "tls-cert-file {m}/dssm-cert.crt\ntls-key-file {m}/dssm-key.key\ntls-ca-cert-file {m}/dssm-ca.crt\n\
         tls-dh-params-file {m}/dhparam2048.pem\ntls-auth-clients yes\ntls-replication yes\n",
        m = mount.display()
    )
}

/// A sentinel's or replica's entry as `SENTINEL SENTINELS|REPLICAS` lists it (redis-cli output).
pub type Entry = BTreeMap<String, String>;

/// Parses redis-cli's flat output of `SENTINEL SENTINELS|REPLICAS`: each entry starts at `name`.
pub fn entries(reply: &str) -> Vec<Entry> {
    let lines: Vec<&str> = reply.lines().map(str::trim).collect();
    let mut out: Vec<Entry> = Vec::new();
    for kv in lines.chunks(2) {
        let [k, v] = kv else { break };
        if *k == "name" {
            out.push(Entry::new());
        }
        if let Some(e) = out.last_mut() {
            e.insert(k.to_string(), v.to_string());
        }
    }
    out
}

/// Not flagged down nor disconnected.
pub fn healthy(e: &Entry) -> bool {
    !e.get("flags").is_some_and(|f| {
        f.split(',')
            .any(|f| matches!(f, "s_down" | "o_down" | "disconnected"))
    })
}

pub struct Topology {
    pub root: tempfile::TempDir,
    pub procs: Vec<Proc>,
    pub primary_port: u16,
    /// Whether a recreated process gets a new IP, as a recreated pod does (the default). The
    /// test cluster's bed keeps them: the tool reaches its pods at fixed `--redis-endpoint`s.
    pub new_ip_on_restart: bool,
    /// Every process on `::1` (distinct ports): IPv6 pod IPs.
    pub ipv6: bool,
    /// Process starts after the first one of each (restarts, recreations), per kind.
    pub db_starts: usize,
    pub sentinel_starts: usize,
    /// `CONFIG SET` calls (TLS reloads) of DB processes since stopped, read before each stop.
    reloads_of_stopped: u64,
}

impl Topology {
    /// Starts primary, two replicas and three sentinels, each with its own copy of `mount`'s
    /// files, and waits until replication is up and every sentinel sees the whole topology.
    pub fn start(mount: &Path) -> Topology {
        Self::start_with(|_, own_mount| copy_mount(mount, own_mount))
    }

    /// Like `start`, with `make_mount(name, dir)` laying out each process's mount at `dir`.
    /// Each process has its own loopback IP (and answers on 127.0.0.1 too, at its port).
    pub fn start_with(make_mount: impl FnMut(&str, &Path)) -> Topology {
        Self::start_on(false, make_mount)
    }

    /// `start_with`, every process on `::1` if `ipv6` (IPv6 pod IPs: Sentinel and INFO then
    /// answer bare IPv6 addresses, a socket address needs brackets).
    pub fn start_on(ipv6: bool, mut make_mount: impl FnMut(&str, &Path)) -> Topology {
        let root = tempfile::Builder::new()
            .prefix("dssm-redis")
            .tempdir()
            .unwrap();
        let primary_port = free_port();
        let mut t = Topology {
            root,
            procs: Vec::new(),
            primary_port,
            new_ip_on_restart: true,
            ipv6,
            db_starts: 0,
            sentinel_starts: 0,
            reloads_of_stopped: 0,
        };
        let mut seed_primary = None;
        for (name, role) in [
            ("db-0", Role::Db),
            ("db-1", Role::Db),
            ("db-2", Role::Db),
            ("sentinel-0", Role::Sentinel),
            ("sentinel-1", Role::Sentinel),
            ("sentinel-2", Role::Sentinel),
        ] {
            let dir = t.root.path().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            let own_mount = dir.join("mount");
            make_mount(name, &own_mount);
            let port = if name == "db-0" {
                primary_port
            } else {
                free_port()
            };
            let mut p = Proc {
                name: name.into(),
                role,
                ip: t.new_ip(),
                port,
                dir,
                mount: own_mount,
                child: None,
            };
            register(&p);
            let primary = seed_primary.get_or_insert_with(|| (p.ip.clone(), p.port));
            write_config(&p, Some(primary.clone()));
            spawn(&mut p);
            t.procs.push(p);
        }
        t.wait_healthy(Duration::from_secs(60));
        t
    }

    fn new_ip(&self) -> String {
        if self.ipv6 {
            "::1".into()
        } else {
            new_ip()
        }
    }

    pub fn get(&self, name: &str) -> &Proc {
        self.procs.iter().find(|p| p.name == name).unwrap()
    }

    pub fn dbs(&self) -> impl Iterator<Item = &Proc> {
        self.procs.iter().filter(|p| p.role == Role::Db)
    }

    pub fn sentinels(&self) -> impl Iterator<Item = &Proc> {
        self.procs.iter().filter(|p| p.role == Role::Sentinel)
    }

    /// The longest any sentinel went without its replicas after a `SENTINEL RESET`: from a
    /// `+reset-master` in its log (which every start of it appends to) to its next `+slave`, when
    /// it relearned them from the primary's `INFO`. None if no sentinel was reset.
    pub fn longest_without_replicas_after_reset(&self) -> Option<Duration> {
        self.sentinels()
            .flat_map(|p| blind_after_resets(&p.log()))
            .max()
    }

    /// redis-cli against `port`, as a client holding the files in `mount`.
    pub fn cli(&self, mount: &Path, port: u16, args: &[&str]) -> String {
        cli_with(mount, port, args)
    }

    /// The primary as all sentinels agree on it, once they do.
    pub fn agreed_primary(&self) -> Option<u16> {
        let answers: Vec<String> = self
            .sentinels()
            .map(|s| {
                cli_with(
                    &s.mount,
                    s.port,
                    &["SENTINEL", "get-master-addr-by-name", MASTER],
                )
            })
            .filter(|a: &String| !a.trim().is_empty()) // a sentinel down (being restarted)
            .collect();
        let first = answers.first()?.clone();
        if answers.len() >= 2 && answers.iter().all(|a| *a == first) {
            first.lines().nth(1).and_then(|p| p.trim().parse().ok())
        } else {
            None
        }
    }

    /// The primary as the first running sentinel that knows one names it (`ip`, `port`): what a
    /// dSSM pod's start-up asks before it writes its config.
    pub fn primary_from_sentinels(&self) -> Option<(String, u16)> {
        self.sentinels()
            .filter(|s| s.child.is_some())
            .find_map(|s| {
                let a = cli_with(
                    &s.mount,
                    s.port,
                    &["SENTINEL", "get-master-addr-by-name", MASTER],
                );
                let mut lines = a.lines().map(str::trim);
                let ip = lines.next().filter(|l| !l.is_empty())?.to_string();
                Some((ip, lines.next()?.parse().ok()?))
            })
    }

    /// What sentinel `name` knows: the other sentinels and the replicas (every entry, down or not).
    pub fn sentinel_knows(&self, name: &str) -> (Vec<Entry>, Vec<Entry>) {
        let s = self.get(name);
        let ask = |what: &str| entries(&cli_with(&s.mount, s.port, &["SENTINEL", what, MASTER]));
        (ask("sentinels"), ask("replicas"))
    }

    fn replicas_up(&self, primary: u16) -> bool {
        self.dbs().filter(|d| d.port != primary).all(|d| {
            let info = cli_with(&d.mount, d.port, &["INFO", "replication"]);
            info.contains("role:slave")
                && info.contains(&format!("master_port:{primary}"))
                && info.contains("master_link_status:up")
        })
    }

    /// Every sentinel sees two healthy replicas and the two other sentinels healthy (entries of
    /// processes since recreated elsewhere may linger: Sentinel never forgets a peer by itself).
    fn sentinels_complete(&self) -> bool {
        self.sentinels().all(|s| {
            let (sentinels, replicas) = self.sentinel_knows(&s.name);
            let n = |v: &[Entry]| v.iter().filter(|e| healthy(e)).count();
            n(&sentinels) >= 2 && n(&replicas) >= 2
        })
    }

    /// Replicas linked to the agreed primary, and every sentinel sees two replicas and the two
    /// other sentinels healthy.
    pub fn wait_healthy(&self, timeout: Duration) -> u16 {
        // Up to eleven redis-cli a poll: every 250 ms, not every 50.
        let every = Duration::from_millis(250);
        wait_polling_every(
            every,
            "replication up and sentinels agreeing",
            timeout,
            || {
                let primary = self.agreed_primary()?;
                (self.replicas_up(primary) && self.sentinels_complete()).then_some(primary)
            },
        )
    }

    /// Stops `name` and starts it again with its own mount replaced by `mount`'s files.
    pub fn restart_with(&mut self, name: &str, mount: &Path) {
        copy_mount(mount, &self.get(name).mount.clone());
        self.restart(name);
    }

    /// Recreates `name` as a pod of a StatefulSet without volumes for its config: stopped, then
    /// started on its mount's current files, at a new IP, with a fresh config (a sentinel a new
    /// ID), a DB as a replica of the primary the sentinels name (see `start_proc`).
    pub fn restart(&mut self, name: &str) {
        self.stop_proc(name);
        self.start_proc(name);
    }

    /// Stops `name`'s process (its pod is being deleted); `start_proc` runs it again.
    pub fn stop_proc(&mut self, name: &str) {
        let idx = self.procs.iter().position(|p| p.name == name).unwrap();
        self.reloads_of_stopped += config_sets(&self.procs[idx]);
        self.procs[idx].stop();
    }

    /// DB TLS reloads so far: `CONFIG SET` calls (`INFO commandstats`) summed over every DB
    /// process that ran, the stopped ones counted before they stopped.
    pub fn db_reloads(&self) -> u64 {
        self.reloads_of_stopped + self.procs.iter().map(config_sets).sum::<u64>()
    }

    fn count_start(&mut self, role: Role) {
        match role {
            Role::Db => self.db_starts += 1,
            Role::Sentinel => self.sentinel_starts += 1,
        }
    }

    /// Sends `name`'s process `signal` (`STOP`: it freezes, a replica lags; `CONT`: it resumes).
    pub fn signal(&self, name: &str, signal: &str) {
        let pid = self.get(name).child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {name}");
    }

    /// Whether `name`'s process was started and not stopped since.
    pub fn running(&self, name: &str) -> bool {
        self.get(name).child.is_some()
    }

    /// Starts a stopped `name` on its mount's current files, at a new IP (if the topology gives
    /// new ones), with a fresh config written from what the running sentinels say: a DB as a
    /// replica of the primary they name (as the primary if they name it), a sentinel monitoring
    /// that primary. If no sentinel answers, the seed's primary (db-0). Waits for PING.
    pub fn start_proc(&mut self, name: &str) {
        let primary = self.primary_from_sentinels().or_else(|| {
            let p = self.get("db-0");
            Some((p.ip.clone(), p.port))
        });
        let fresh_ip = self.new_ip_on_restart.then(|| self.new_ip());
        let idx = self.procs.iter().position(|p| p.name == name).unwrap();
        self.count_start(self.procs[idx].role);
        let p = &mut self.procs[idx];
        if let Some(ip) = fresh_ip {
            p.ip = ip;
            register(p);
        }
        write_config(p, primary);
        spawn(p);
    }

    /// Stops every process, then starts them all again on their mounts' current files: what
    /// deleting every dSSM pod at once does. The DBs come back empty (no persistence), the
    /// last primary as primary again (no sentinel is left to ask).
    pub fn restart_all(&mut self) {
        let primary = self.agreed_primary().unwrap_or(self.primary_port);
        self.reloads_of_stopped += self.procs.iter().map(config_sets).sum::<u64>();
        let mut procs = std::mem::take(&mut self.procs);
        for p in &mut procs {
            self.count_start(p.role);
            p.stop();
            if self.new_ip_on_restart {
                p.ip = self.new_ip();
                register(p);
            }
        }
        let at = procs
            .iter()
            .find(|p| p.port == primary)
            .map(|p| (p.ip.clone(), p.port));
        for p in &mut procs {
            write_config(p, at.clone());
            spawn(p);
        }
        self.procs = procs;
    }
}

/// A fresh config for `p`: a DB replica of `primary` (unless it is `p`), a sentinel monitoring
/// it. It listens on its own IP (and on 127.0.0.1, for tests that reach it there) and connects
/// from its own IP, so that the others see it at its pod IP, as in a cluster (protected mode
/// off: it would refuse peers from other addresses than 127.0.0.1; client certificates guard).
fn write_config(p: &Proc, primary: Option<(String, u16)>) {
    // IPv6: `::1` only (nothing reaches it over IPv4 by accident).
    let also = if p.ip.contains(':') { "" } else { " 127.0.0.1" };
    let mut conf = format!(
        "port 0\ntls-port {}\nbind {ip}{also}\nbind-source-addr {ip}\nprotected-mode no\ndir {}\nlogfile {}\nsave \"\"\nappendonly no\n",
        p.port,
        p.dir.display(),
        p.dir.join("log").display(),
        ip = p.ip,
    );
    conf.push_str(&tls_lines(&p.mount));
    match (p.role, primary) {
        (Role::Db, Some((ip, port))) if port != p.port => {
            conf.push_str(&format!("replicaof {ip} {port}\n"))
        }
        (Role::Db, _) => {}
        (Role::Sentinel, primary) => {
            let (ip, port) = primary.expect("a primary for the sentinel to monitor");
            conf.push_str(&format!(
                "sentinel monitor {MASTER} {ip} {port} 2\nsentinel down-after-milliseconds {MASTER} 2000\n\
                 sentinel failover-timeout {MASTER} 10000\nsentinel parallel-syncs {MASTER} 1\n"
            ))
        }
    }
    std::fs::write(p.dir.join("redis.conf"), conf).unwrap();
}

/// Starts `p`'s process on its config and waits until it answers PING over TLS.
fn spawn(p: &mut Proc) {
    let bin = match p.role {
        Role::Db => require("redis-server"),
        Role::Sentinel => require("redis-sentinel"),
    };
    let child = Command::new(bin)
        .arg(p.dir.join("redis.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    p.child = Some(child);
    let (port, mount) = (p.port, p.mount.clone());
    wait_for(
        &format!("{} to answer PING", p.name),
        Duration::from_secs(20),
        || {
            // A DB that requires a password answers too: NOAUTH.
            let pong = cli_with(&mount, port, &["PING"]);
            (pong.trim() == "PONG" || pong.contains("NOAUTH")).then_some(())
        },
    );
}

/// One TLS-only DB (no replicas, no sentinels) running from `mount`, in `dir`.
pub fn start_db(dir: &Path, mount: &Path) -> Proc {
    start_db_with(dir, mount, "")
}

/// `start_db` with `extra` config lines (e.g. `rename-command CONFIG ""`, `requirepass x`).
pub fn start_db_with(dir: &Path, mount: &Path, extra: &str) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    let mut p = Proc {
        name: "db".into(),
        role: Role::Db,
        ip: "127.0.0.1".into(),
        port: free_port(),
        dir: dir.to_path_buf(),
        mount: mount.to_path_buf(),
        child: None,
    };
    let mut conf = format!(
        "port 0\ntls-port {}\nbind 127.0.0.1\ndir {}\nlogfile {}\nsave \"\"\nappendonly no\n",
        p.port,
        p.dir.display(),
        p.dir.join("log").display()
    );
    conf.push_str(&tls_lines(mount));
    conf.push_str(extra);
    std::fs::write(p.dir.join("redis.conf"), conf).unwrap();
    spawn(&mut p);
    p
}

/// A running DB's `CONFIG SET` calls (`cmdstat_config|set` of `INFO commandstats`); 0 for a
/// sentinel or a stopped process.
fn config_sets(p: &Proc) -> u64 {
    if p.role != Role::Db || p.child.is_none() {
        return 0;
    }
    let stats = cli_with(&p.mount, p.port, &["INFO", "commandstats"]);
    stats
        .lines()
        .find_map(|l| l.trim().strip_prefix("cmdstat_config|set:calls="))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

fn count_field(reply: &str, field: &str) -> usize {
    reply.lines().filter(|l| l.trim() == field).count()
}

fn copy_mount(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in [
        "dssm-ca.crt",
        "dssm-cert.crt",
        "dssm-key.key",
        "dhparam2048.pem",
    ] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// redis-cli over TLS with the client certificate in `mount` (empty output on refusal).
pub fn cli_with(mount: &Path, port: u16, args: &[&str]) -> String {
    let out = Command::new(require("redis-cli"))
        .args(["-h", &ip_of(port), "-p", &port.to_string(), "--tls"])
        .arg("--cert")
        .arg(mount.join("dssm-cert.crt"))
        .arg("--key")
        .arg(mount.join("dssm-key.key"))
        .arg("--cacert")
        .arg(mount.join("dssm-ca.crt"))
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A TCP proxy in front of a test process that can go silent: from `go_silent` on it accepts
/// connections and reads nothing, forwards nothing, answers nothing, closes nothing (a
/// blackholed peer, as a partitioned or frozen pod is to its clients). Stops when dropped.
pub struct SilentProxy {
    pub endpoint: String,
    silent: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl SilentProxy {
    /// A proxy on 127.0.0.1 (a port of its own) forwarding to `to` (`ip:port`).
    pub fn start(to: &str) -> SilentProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = listener.local_addr().unwrap().to_string();
        let (silent, stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (s2, st2, to) = (silent.clone(), stop.clone(), to.to_string());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !st2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) if s2.load(Ordering::Relaxed) => held.push(client),
                    Ok((client, _)) => {
                        let Ok(upstream) = std::net::TcpStream::connect(&to) else {
                            continue;
                        };
                        for (from, into) in [
                            (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                            (upstream, client),
                        ] {
                            let (s3, st3) = (s2.clone(), st2.clone());
                            std::thread::spawn(move || pipe(from, into, &s3, &st3));
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        SilentProxy {
            endpoint,
            silent,
            stop,
        }
    }

    pub fn go_silent(&self) {
        self.silent.store(true, Ordering::Relaxed);
    }
}

impl Drop for SilentProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn pipe(
    mut from: std::net::TcpStream,
    mut into: std::net::TcpStream,
    silent: &AtomicBool,
    stop: &AtomicBool,
) {
    use std::io::{Read, Write};
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        if silent.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if into.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// From a sentinel's log, each time from a `+reset-master` to the next `+slave` (a reset never
/// followed by one is left out: the roll waits for it, and a test that stops earlier says so).
fn blind_after_resets(log: &str) -> Vec<Duration> {
    // `pid:X 07 Dec 2026 21:33:04.123 # +reset-master master ...`: the time of day, in ms.
    let at = |line: &str| -> Option<u64> {
        let t = line.split_whitespace().nth(4)?;
        let (hms, ms) = t.split_once('.')?;
        let mut parts = hms.split(':').map(|x| x.parse::<u64>().ok());
        let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
        Some(((h * 60 + m) * 60 + s) * 1000 + ms.parse::<u64>().ok()?)
    };
    let mut out = Vec::new();
    let mut reset_at = None;
    for line in log.lines() {
        if line.contains(" +reset-master ") {
            reset_at = at(line);
        } else if line.contains(" +slave ") {
            if let (Some(r), Some(s)) = (reset_at.take(), at(line)) {
                const DAY: u64 = 24 * 3600 * 1000;
                out.push(Duration::from_millis((s + DAY - r) % DAY));
            }
        }
    }
    out
}
