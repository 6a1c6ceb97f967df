//! A dSSM-like topology on 127.0.0.1 from Debian's `redis-server` and `redis-sentinel`: one
//! primary, two replicas, three sentinels (quorum 2), TLS only, client certificates required,
//! TLS replication, each process with its own copy of the four files as a Secret volume mounts
//! them. Every process is killed when the topology is dropped, also when a test fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
    pub port: u16,
    pub dir: PathBuf,
    pub mount: PathBuf,
    child: Option<Child>,
}

impl Proc {
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
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

fn tls_lines(mount: &Path) -> String {
    format!(
        "tls-cert-file {m}/dssm-cert.crt\ntls-key-file {m}/dssm-key.key\ntls-ca-cert-file {m}/dssm-ca.crt\n\
         tls-dh-params-file {m}/dhparam2048.pem\ntls-auth-clients yes\ntls-replication yes\n",
        m = mount.display()
    )
}

pub struct Topology {
    pub root: tempfile::TempDir,
    pub procs: Vec<Proc>,
    pub primary_port: u16,
}

impl Topology {
    /// Starts primary, two replicas and three sentinels, each with its own copy of `mount`'s
    /// files, and waits until replication is up and every sentinel sees the whole topology.
    pub fn start(mount: &Path) -> Topology {
        Self::start_with(|_, own_mount| copy_mount(mount, own_mount))
    }

    /// Like `start`, with `make_mount(name, dir)` laying out each process's mount at `dir`.
    pub fn start_with(mut make_mount: impl FnMut(&str, &Path)) -> Topology {
        let root = tempfile::Builder::new()
            .prefix("dssm-redis")
            .tempdir()
            .unwrap();
        let primary_port = free_port();
        let mut t = Topology {
            root,
            procs: Vec::new(),
            primary_port,
        };
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
                port,
                dir,
                mount: own_mount,
                child: None,
            };
            t.write_config(&p);
            t.spawn(&mut p);
            t.procs.push(p);
        }
        t.wait_healthy(Duration::from_secs(60));
        t
    }

    fn write_config(&self, p: &Proc) {
        let mut conf = format!(
            "port 0\ntls-port {}\nbind 127.0.0.1\ndir {}\nlogfile {}\nsave \"\"\nappendonly no\n",
            p.port,
            p.dir.display(),
            p.dir.join("log").display()
        );
        conf.push_str(&tls_lines(&p.mount));
        match p.role {
            Role::Db if p.port != self.primary_port => {
                conf.push_str(&format!("replicaof 127.0.0.1 {}\n", self.primary_port))
            }
            Role::Db => {}
            Role::Sentinel => conf.push_str(&format!(
                "sentinel monitor {MASTER} 127.0.0.1 {} 2\nsentinel down-after-milliseconds {MASTER} 2000\n\
                 sentinel failover-timeout {MASTER} 10000\nsentinel parallel-syncs {MASTER} 1\n",
                self.primary_port
            )),
        }
        // Sentinel rewrites its config: keep the first one only on the first start.
        let path = p.dir.join("redis.conf");
        if p.role == Role::Db || !path.exists() {
            std::fs::write(path, conf).unwrap();
        }
    }

    fn spawn(&self, p: &mut Proc) {
        spawn(p);
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

    fn replicas_up(&self, primary: u16) -> bool {
        self.dbs().filter(|d| d.port != primary).all(|d| {
            let info = cli_with(&d.mount, d.port, &["INFO", "replication"]);
            info.contains("role:slave")
                && info.contains(&format!("master_port:{primary}"))
                && info.contains("master_link_status:up")
        })
    }

    fn sentinels_complete(&self) -> bool {
        self.sentinels().all(|s| {
            let sentinels = cli_with(&s.mount, s.port, &["SENTINEL", "sentinels", MASTER]);
            let replicas = cli_with(&s.mount, s.port, &["SENTINEL", "replicas", MASTER]);
            count_field(&sentinels, "name") == 2 && count_field(&replicas, "name") == 2
        })
    }

    /// Replicas linked to the agreed primary, and every sentinel knows two replicas and the two
    /// other sentinels.
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

    /// Stops `name` and starts it again on its mount's current files.
    pub fn restart(&mut self, name: &str) {
        let idx = self.procs.iter().position(|p| p.name == name).unwrap();
        let mut p = std::mem::replace(
            &mut self.procs[idx],
            Proc {
                name: String::new(),
                role: Role::Db,
                port: 0,
                dir: PathBuf::new(),
                mount: PathBuf::new(),
                child: None,
            },
        );
        p.stop();
        // A restarted DB comes back as a replica of whoever is primary now.
        follow(&p, self.agreed_primary().unwrap_or(self.primary_port));
        self.spawn(&mut p);
        self.procs[idx] = p;
    }

    /// Stops `name`'s process (its pod is being deleted); `start_proc` runs it again.
    pub fn stop_proc(&mut self, name: &str) {
        let idx = self.procs.iter().position(|p| p.name == name).unwrap();
        self.procs[idx].stop();
    }

    /// Whether `name`'s process was started and not stopped since.
    pub fn running(&self, name: &str) -> bool {
        self.get(name).child.is_some()
    }

    /// Starts a stopped `name` on its mount's current files (a DB as a replica of whoever is
    /// primary now) and waits until it answers PING.
    pub fn start_proc(&mut self, name: &str) {
        let primary = self.agreed_primary().unwrap_or(self.primary_port);
        let idx = self.procs.iter().position(|p| p.name == name).unwrap();
        follow(&self.procs[idx], primary);
        spawn(&mut self.procs[idx]);
    }

    /// Stops every process, then starts them all again on their mounts' current files: what
    /// deleting every dSSM pod at once does. The DBs come back empty (no persistence).
    pub fn restart_all(&mut self) {
        let primary = self.agreed_primary().unwrap_or(self.primary_port);
        let mut procs = std::mem::take(&mut self.procs);
        for p in &mut procs {
            p.stop();
        }
        for p in &mut procs {
            follow(p, primary);
            self.spawn(p);
        }
        self.procs = procs;
    }
}

/// Points a DB's config at `primary` (no `replicaof` if it is the primary).
fn follow(p: &Proc, primary: u16) {
    if p.role != Role::Db {
        return;
    }
    let mut conf = std::fs::read_to_string(p.dir.join("redis.conf")).unwrap();
    conf = conf
        .lines()
        .filter(|l| !l.starts_with("replicaof"))
        .collect::<Vec<_>>()
        .join("\n");
    if p.port != primary {
        conf.push_str(&format!("\nreplicaof 127.0.0.1 {primary}\n"));
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
        || (cli_with(&mount, port, &["PING"]).trim() == "PONG").then_some(()),
    );
}

/// One TLS-only DB (no replicas, no sentinels) running from `mount`, in `dir`.
pub fn start_db(dir: &Path, mount: &Path) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    let mut p = Proc {
        name: "db".into(),
        role: Role::Db,
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
    std::fs::write(p.dir.join("redis.conf"), conf).unwrap();
    spawn(&mut p);
    p
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
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--tls"])
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
