//! TLS to PostgreSQL (issue 12): a private cluster with `ssl = on` that accepts TCP connections
//! over TLS only (`hostssl`), a CA and a server certificate for `localhost` made here with the
//! openssl command, and the worker connecting with libpq's sslmode values.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use keypool_tests::{cluster_root, connect, Cluster};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for DNS name `localhost` signed by it, and an unrelated CA.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn make() -> Pki {
        let dir = cluster_root().join(format!("tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("PKI directory");
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        for ca in ["ca", "other-ca"] {
            let mut args = vec!["req", "-x509", "-days", "2", "-keyout"];
            let key = format!("{ca}.key");
            let crt = format!("{ca}.crt");
            let subject = format!("/CN=pg_keypool test {ca}");
            args.extend([key.as_str(), "-out", crt.as_str(), "-subj", subject.as_str()]);
            args.extend(ec);
            args.extend([
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
            openssl(&dir, &args);
        }
        let mut args = vec![
            "req",
            "-new",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ];
        args.extend(ec);
        openssl(&dir, &args);
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("extensions file");
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "server.ext",
                "-out",
                "server.crt",
            ],
        );
        // Only TLS over TCP; the test itself comes in over the Unix socket.
        std::fs::write(
            dir.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
        )
        .expect("pg_hba.conf");
        let chown = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(chown.success());
        let chmod = Command::new("chmod")
            .arg("600")
            .arg(dir.join("server.key"))
            .status()
            .expect("chmod");
        assert!(chmod.success());
        Pki { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs `keypool-worker serve` until it exits (it must, within 60 s); answers its exit code
/// and what it printed.
fn serve_until_exit(url: &str) -> (Option<i32>, String) {
    let mut child = Command::new(bin())
        .args(["serve", "--no-queue", "--listen", "127.0.0.1:0"])
        .env("KEYPOOL_DATABASE_URL", url)
        .env("KEYPOOL_API_TOKENS", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start keypool-worker");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the worker did not exit with {url}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_connects_to_postgresql_over_tls_as_libpq_would() {
    let pki = Pki::make();
    let cluster = Cluster::start(
        "tls",
        &[
            "ssl = on",
            &format!("ssl_cert_file = '{}'", pki.path("server.crt")),
            &format!("ssl_key_file = '{}'", pki.path("server.key")),
            &format!("hba_file = '{}'", pki.path("pg_hba.conf")),
        ],
    );
    let local = |db: &str| {
        format!(
            "host={} port={} user=postgres dbname={db}",
            cluster.dir.display(),
            cluster.port
        )
    };
    let admin = connect(&local("postgres")).await.expect("Unix-socket connection");
    admin.batch_execute("CREATE DATABASE tlsdb").await.expect("database");
    let db = connect(&local("tlsdb")).await.expect("tlsdb");
    db.batch_execute("CREATE EXTENSION pg_keypool")
        .await
        .expect("extension");
    let port = cluster.port;
    let ca = pki.path("ca.crt");

    // verify-full: the chain and the host name check out.
    let ok = [
        format!("host=localhost port={port} user=postgres dbname=tlsdb sslmode=verify-full sslrootcert='{ca}'"),
        format!(
            "postgresql://postgres@localhost:{port}/tlsdb?sslmode=verify-full&sslrootcert={}",
            ca.replace('/', "%2F")
        ),
        // verify-ca does not compare the name; require and prefer do not check the chain.
        format!("host=127.0.0.1 port={port} user=postgres dbname=tlsdb sslmode=verify-ca sslrootcert='{ca}'"),
        format!("host=127.0.0.1 port={port} user=postgres dbname=tlsdb sslmode=require"),
        format!("host=127.0.0.1 port={port} user=postgres dbname=tlsdb"),
    ];
    for (i, url) in ok.iter().enumerate() {
        let id = format!("tls-{i}");
        let w = Worker::start(url, &id, &["--no-queue"]).await;
        let r = http().get(format!("{}/healthz", w.url)).send().await.expect("healthz");
        assert_eq!(r.status(), 200, "{url}");
        let encrypted: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
                  WHERE a.application_name = 'keypool-worker' AND a.datname = 'tlsdb' AND s.ssl",
                &[],
            )
            .await
            .expect("pg_stat_ssl")
            .get(0);
        assert!(encrypted >= 1, "{url}: no TLS connection\n{}", w.log());
        drop(w);
    }

    // Refusals at start-up, each saying why.
    let other_ca = pki.path("other-ca.crt");
    let refused = [
        (
            format!("host=127.0.0.1 port={port} user=postgres dbname=tlsdb sslmode=verify-full sslrootcert='{ca}'"),
            "certificate not valid for name \"127.0.0.1\"",
        ),
        (
            format!("host=localhost port={port} user=postgres dbname=tlsdb sslmode=verify-full sslrootcert='{other_ca}'"),
            "UnknownIssuer",
        ),
        (
            format!("host=127.0.0.1 port={port} user=postgres dbname=tlsdb sslmode=verify-ca sslrootcert='{other_ca}'"),
            "UnknownIssuer",
        ),
        (
            format!("host=127.0.0.1 port={port} user=postgres dbname=tlsdb sslmode=disable"),
            "no encryption",
        ),
        (
            format!("host=127.0.0.1 port={port} user=postgres dbname=tlsdb sslmode=verify-ca sslrootcert=/nonexistent/root.crt"),
            "does not exist",
        ),
        (
            format!("host=127.0.0.1 port={port} user=postgres dbname=tlsdb sslmode=maybe"),
            "invalid sslmode",
        ),
    ];
    for (url, why) in &refused {
        let (code, text) = serve_until_exit(url);
        assert_eq!(code, Some(1), "{url}: {text}");
        assert!(text.contains(why), "{url}: expected {why:?} in\n{text}");
        assert!(!text.contains("panicked"), "{text}");
    }
}
