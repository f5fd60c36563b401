//! Test harness: private PostgreSQL clusters and fresh databases for integration tests.
//!
//! A [`Cluster`] is a data directory of its own under `$KEYPOOL_CLUSTER_ROOT` (owned by the
//! postgres user, since PostgreSQL refuses to run as root), listening on a free loopback port,
//! with pg_keypool preloaded. It is stopped by its data directory when dropped. Most tests share
//! one cluster ([`shared`]) and get a fresh database each ([`Cluster::fresh_db`]); tests that
//! restart or crash a server start their own.
//!
//! The extension must be installed in the system PostgreSQL directories first (the test command
//! does that).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

/// The PostgreSQL binaries the clusters run: `KEYPOOL_PG_BIN` (scripts/lib.sh sets it for the
/// major under test), else Debian's PostgreSQL 15.
pub fn pg_bin() -> String {
    std::env::var("KEYPOOL_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".to_string())
}

pub fn cluster_root() -> PathBuf {
    std::env::var_os("KEYPOOL_CLUSTER_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/pg_keypool-tests"))
}

fn as_postgres(program: &str, args: &[&str]) -> Output {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--", program])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} as postgres: {e}"));
    out
}

fn check(what: &str, out: Output) {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("no free loopback port");
    listener.local_addr().expect("bound listener has an address").port()
}

/// An empty directory `name` for a cluster, owned by postgres.
fn new_cluster_dir(name: &str) -> PathBuf {
    let dir = cluster_root().join(format!("it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("cannot create the cluster directory");
    check(
        "chown",
        Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .output()
            .expect("chown"),
    );
    dir
}

/// A private PostgreSQL cluster.
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    settings: Vec<String>,
}

impl Cluster {
    /// Creates (or reuses) the data directory `name` and starts the server. `settings` are extra
    /// postgresql.conf lines; pg_keypool is preloaded unless one of them sets
    /// `shared_preload_libraries` itself.
    pub fn start(name: &str, settings: &[&str]) -> Cluster {
        let dir = new_cluster_dir(name);
        let data = dir.join("data");
        check(
            "initdb",
            as_postgres(
                &format!("{}/initdb", pg_bin()),
                &[
                    "-D",
                    path(&data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                    "--no-sync",
                ],
            ),
        );
        let cluster = Cluster {
            dir,
            port: free_port(),
            settings: settings.iter().map(|s| s.to_string()).collect(),
        };
        cluster.write_config();
        cluster.pg_ctl(&["start", "-w", "-t", "60", "-l", path(&cluster.dir.join("log"))]);
        cluster
    }

    /// Replaces the settings given at start (takes effect at the next start).
    pub fn reconfigure(&mut self, settings: &[&str]) {
        self.settings = settings.iter().map(|s| s.to_string()).collect();
        self.write_config();
    }

    fn write_config(&self) {
        let mut conf = vec![
            format!("port = {}", self.port),
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("unix_socket_directories = '{}'", self.dir.display()),
            "max_connections = 250".to_string(),
            "fsync = off".to_string(),
        ];
        if !self.settings.iter().any(|s| s.starts_with("shared_preload_libraries")) {
            conf.push("shared_preload_libraries = 'pg_keypool'".to_string());
        }
        conf.extend(self.settings.iter().cloned());
        let file = self.dir.join("data").join("postgresql.auto.conf");
        std::fs::write(&file, conf.join("\n") + "\n").expect("cannot write postgresql.auto.conf");
        check(
            "chown",
            Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&file)
                .output()
                .expect("chown"),
        );
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.dir.join("data");
        let mut all = vec!["-D", path(&data)];
        all.extend_from_slice(args);
        check("pg_ctl", as_postgres(&format!("{}/pg_ctl", pg_bin()), &all));
    }

    /// A clean restart (fast shutdown, then start).
    pub fn restart(&self) {
        self.pg_ctl(&[
            "restart",
            "-m",
            "fast",
            "-w",
            "-t",
            "60",
            "-l",
            path(&self.dir.join("log")),
        ]);
    }

    /// Starts the server again after [`Cluster::stop`].
    pub fn start_again(&self) {
        self.pg_ctl(&["start", "-w", "-t", "60", "-l", path(&self.dir.join("log"))]);
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// `pg_dump` of database `db` (plain SQL), as the postgres user.
    pub fn pg_dump(&self, db: &str) -> String {
        let out = as_postgres(
            &format!("{}/pg_dump", pg_bin()),
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
            ],
        );
        let dump = String::from_utf8_lossy(&out.stdout).into_owned();
        check("pg_dump", out);
        dump
    }

    /// Runs `sql` (a script such as a dump) with psql in database `db`, stopping at the first
    /// error.
    pub fn psql_script(&self, db: &str, sql: &str) {
        let file = self.dir.join(format!("script-{}.sql", std::process::id()));
        std::fs::write(&file, sql).expect("write the script");
        check(
            "chown",
            Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&file)
                .output()
                .expect("chown"),
        );
        let out = as_postgres(
            &format!("{}/psql", pg_bin()),
            &[
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-f",
                path(&file),
            ],
        );
        let _ = std::fs::remove_file(&file);
        check("psql", out);
    }

    pub fn stop(&self) {
        if self.dir.join("data").join("postmaster.pid").exists() {
            let data = self.dir.join("data");
            let _ = as_postgres(
                &format!("{}/pg_ctl", pg_bin()),
                &["-D", path(&data), "stop", "-m", "fast", "-w", "-t", "60"],
            );
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    pub fn conninfo(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db} connect_timeout=10",
            self.port
        )
    }

    pub async fn connect(&self, db: &str) -> Client {
        connect(&self.conninfo(db))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {db}: {e}"))
    }

    /// Kills backend `victim` with SIGKILL and waits for the crash reset to finish: first for
    /// `witness` (another connection of the old server generation) to be closed by the reset,
    /// which proves it began, then for a query on a new connection. Connecting before the reset
    /// began could reach the old generation, whose connections the reset then closes.
    pub async fn crash_backend(&self, db: &str, victim: i32, witness: &Client) -> Client {
        assert_eq!(unsafe { libc::kill(victim, libc::SIGKILL) }, 0, "kill -9 {victim}");
        let deadline = Instant::now() + Duration::from_secs(60);
        while witness.simple_query("SELECT 1").await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "the crash of {victim} did not reset the server within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.wait_ready(db).await
    }

    /// Waits until the server accepts connections and answers a query. Only for a server whose
    /// old connections are known to be gone (a new postmaster, or see [`Cluster::crash_backend`]).
    pub async fn wait_ready(&self, db: &str) -> Client {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(client) = connect(&self.conninfo(db)).await {
                if client.simple_query("SELECT 1").await.is_ok() {
                    return client;
                }
            }
            assert!(Instant::now() < deadline, "server did not come back within 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A streaming standby of `primary`, made with `pg_basebackup -R` and started. `settings`
    /// are extra postgresql.conf lines, as for [`Cluster::start`].
    pub fn standby_of(primary: &Cluster, name: &str, settings: &[&str]) -> Cluster {
        let dir = new_cluster_dir(name);
        let data = dir.join("data");
        check(
            "pg_basebackup",
            as_postgres(
                &format!("{}/pg_basebackup", pg_bin()),
                &[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &primary.port.to_string(),
                    "-U",
                    "postgres",
                    "-D",
                    path(&data),
                    "-R",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                    "--no-sync",
                ],
            ),
        );
        let cluster = Cluster {
            dir,
            port: free_port(),
            settings: settings.iter().map(|s| s.to_string()).collect(),
        };
        // pg_basebackup -R wrote primary_conninfo into postgresql.auto.conf: keep it.
        let auto = std::fs::read_to_string(data.join("postgresql.auto.conf")).unwrap_or_default();
        let conninfo: Vec<&str> = auto.lines().filter(|l| l.starts_with("primary_conninfo")).collect();
        cluster.write_config();
        let file = data.join("postgresql.auto.conf");
        let mut conf = std::fs::read_to_string(&file).expect("read postgresql.auto.conf");
        for line in conninfo {
            conf.push_str(line);
            conf.push('\n');
        }
        std::fs::write(&file, conf).expect("write postgresql.auto.conf");
        cluster.pg_ctl(&["start", "-w", "-t", "60", "-l", path(&cluster.dir.join("log"))]);
        cluster
    }

    /// Promotes a standby and waits until it accepts writes.
    pub fn promote(&self) {
        self.pg_ctl(&["promote", "-w", "-t", "60"]);
    }

    /// An immediate restart: the server stops as if it crashed (no shutdown checkpoint, no final
    /// state file), then starts and recovers.
    pub fn restart_immediately(&self) {
        self.stop_immediately();
        self.start_again();
    }

    /// Stops the server the way a lost machine does: no shutdown checkpoint, no final state.
    pub fn stop_immediately(&self) {
        self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "60"]);
    }

    /// Waits until standby `self` has replayed everything `primary` had written when this was
    /// called.
    pub async fn wait_replayed(&self, primary: &Client, standby: &Client) {
        let target: String = primary
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("pg_current_wal_lsn")
            .get(0);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let caught_up: bool = standby
                .query_one(
                    "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                    &[&target],
                )
                .await
                .expect("pg_last_wal_replay_lsn")
                .get(0);
            if caught_up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the standby did not replay {target} within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A new database with the extension created in it, dropped when the handle is dropped.
    pub async fn fresh_db(&self) -> TestDb<'_> {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let name = format!("t{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let admin = self.connect("postgres").await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("CREATE DATABASE");
        let client = self.connect(&name).await;
        client
            .batch_execute("CREATE EXTENSION pg_keypool")
            .await
            .expect("CREATE EXTENSION");
        TestDb {
            cluster: self,
            name,
            client,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
        // A failed test leaves its cluster (and log) behind for inspection.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("cluster paths are UTF-8")
}

pub async fn connect(conninfo: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Runs `sql` (one or more statements); panics with the statement and the server's message.
pub async fn exec(client: &Client, sql: &str) {
    client.batch_execute(sql).await.unwrap_or_else(|e| {
        panic!(
            "{sql}: {}",
            e.as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string())
        )
    });
}

/// Reservations granted out of `attempts` in `pool`, each for another user (`u0`, `u1`, ...).
pub async fn granted_of(client: &Client, pool: &str, attempts: usize) -> usize {
    let stmt = client
        .prepare("SELECT granted FROM keypool_reserve($1, $2)")
        .await
        .expect("prepare keypool_reserve");
    let mut granted = 0;
    for i in 0..attempts {
        let row = client
            .query_one(&stmt, &[&format!("u{i}"), &pool])
            .await
            .expect("keypool_reserve");
        granted += row.get::<_, bool>(0) as usize;
    }
    granted
}

/// A time zone in which it is about noon now, so that a test never crosses a daily reset.
pub fn zone_at_noon() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs();
    let hour = ((secs / 3600) % 24) as i32;
    let mut offset = 12 - hour;
    if offset > 14 {
        offset -= 24;
    }
    if offset < -12 {
        offset += 24;
    }
    // POSIX-style names: Etc/GMT-3 is three hours ahead of UTC.
    if offset >= 0 {
        format!("Etc/GMT-{offset}")
    } else {
        format!("Etc/GMT+{}", -offset)
    }
}

/// The first column of the one row `sql` returns.
pub async fn one<T: for<'a> tokio_postgres::types::FromSql<'a>>(client: &Client, sql: &str) -> T {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0)
}

/// A database of its own for one test.
pub struct TestDb<'c> {
    pub cluster: &'c Cluster,
    pub name: String,
    pub client: Client,
}

impl TestDb<'_> {
    pub async fn connect(&self) -> Client {
        self.cluster.connect(&self.name).await
    }
}

impl Drop for TestDb<'_> {
    fn drop(&mut self) {
        // Dropping happens outside the test's runtime: use a synchronous psql call.
        let _ = Command::new(format!("{}/psql", pg_bin()))
            .args([
                "-X",
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &self.cluster.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
            ])
            .arg(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
            .output();
    }
}

static SHARED: OnceLock<Mutex<Option<Cluster>>> = OnceLock::new();

extern "C" fn stop_shared_cluster() {
    if let Some(cell) = SHARED.get() {
        if let Ok(mut guard) = cell.lock() {
            guard.take();
        }
    }
}

/// The cluster shared by the tests of one test binary, started on first use and stopped when
/// the process exits.
pub fn shared() -> &'static Cluster {
    let cell = SHARED.get_or_init(|| {
        let cluster = Cluster::start("shared", &[]);
        unsafe { libc::atexit(stop_shared_cluster) };
        Mutex::new(Some(cluster))
    });
    let guard = cell.lock().expect("shared cluster lock");
    let cluster: *const Cluster = guard.as_ref().expect("shared cluster is running");
    // SAFETY: the cluster lives until the process exits (atexit takes it out then).
    unsafe { &*cluster }
}
