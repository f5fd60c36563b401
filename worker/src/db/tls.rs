//! TLS to PostgreSQL the way libpq does it. `sslmode` and `sslrootcert` are read from
//! KEYPOOL_DATABASE_URL (URL or key=value form), else from PGSSLMODE / PGSSLROOTCERT:
//!
//! - `disable`: no TLS; `allow` and `prefer` (the default): TLS when the server offers it,
//!   the certificate not checked; `require`: TLS or no connection, the certificate not checked
//!   (unless a root certificate file exists: then as `verify-ca`, as libpq does);
//! - `verify-ca`: the server's certificate must chain to a certificate in `sslrootcert`
//!   (default `~/.postgresql/root.crt`); `verify-full`: and name the host connected to;
//! - `sslrootcert=system`: the system's trusted roots (only with `verify-full`);
//! - Unix-domain sockets never use TLS.
//!
//! TLS is rustls with ring (tokio-postgres-rustls), channel binding included.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::Host;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::Socket;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The connector every connection of the worker is made with.
pub type Tls = MakeRustlsConnect;
/// A connection made with it.
pub type Connection = tokio_postgres::Connection<Socket, <Tls as MakeTlsConnect<Socket>>::Stream>;

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "invalid sslmode {other:?}: use disable, allow, prefer, require, verify-ca or verify-full"
                ))
            }
        })
    }
}

/// Where the trusted root certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Roots {
    /// `sslrootcert=system`.
    System,
    /// A PEM file; `explicit` when the connection string or PGSSLROOTCERT named it.
    File { path: PathBuf, explicit: bool },
}

/// The TLS options taken out of a connection string.
#[derive(Debug, Default, PartialEq, Eq)]
struct SslOptions {
    mode: Option<String>,
    root_cert: Option<String>,
}

/// Options libpq knows that the worker does not support; named, so that the error says so.
const UNSUPPORTED: &[&str] = &["sslcert", "sslkey", "sslpassword", "sslcrl", "sslcrldir", "sslcertmode"];

/// Parses a connection string (URL or key=value) into tokio-postgres' config and the TLS
/// connector its `sslmode` asks for. Errors say what to change.
pub fn configure(conn: &str) -> Result<(tokio_postgres::Config, Tls, SslMode), String> {
    let (rest, options) = take_ssl_options(conn)?;
    let mut config = tokio_postgres::Config::from_str(&rest)
        .map_err(|e| format!("KEYPOOL_DATABASE_URL is not a valid PostgreSQL connection string: {e}"))?;
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let mode: SslMode = options
        .mode
        .or_else(|| env("PGSSLMODE"))
        .as_deref()
        .unwrap_or("prefer")
        .parse()?;
    let roots = match options.root_cert.or_else(|| env("PGSSLROOTCERT")) {
        Some(r) if r == "system" => Roots::System,
        Some(path) => Roots::File {
            path: PathBuf::from(path),
            explicit: true,
        },
        None => Roots::File {
            path: default_root_cert(),
            explicit: false,
        },
    };
    if roots == Roots::System && mode != SslMode::VerifyFull && mode != SslMode::Disable {
        return Err(format!(
            "weak sslmode \"{}\" may not be used with sslrootcert=system (use \"verify-full\")",
            mode_name(mode)
        ));
    }
    // libpq: with a root certificate file present, `require` verifies the chain.
    let mode = match (&mode, &roots) {
        (SslMode::Require, Roots::File { path, explicit }) if *explicit || path.exists() => SslMode::VerifyCa,
        _ => mode,
    };
    let unix_only = !config.get_hosts().is_empty() && config.get_hosts().iter().all(|h| matches!(h, Host::Unix(_)));
    config.ssl_mode(match mode {
        _ if unix_only => tokio_postgres::config::SslMode::Disable,
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
    });
    let tls = connector(mode, &roots)?;
    Ok((config, tls, mode))
}

pub fn mode_name(mode: SslMode) -> &'static str {
    match mode {
        SslMode::Disable => "disable",
        SslMode::Allow => "allow",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    }
}

fn default_root_cert() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".postgresql").join("root.crt")
}

fn connector(mode: SslMode, roots: &Roots) -> Result<Tls, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::Disable | SslMode::Allow | SslMode::Prefer | SslMode::Require => {
            Arc::new(AnyCertificate(provider.clone()))
        }
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let store = root_store(roots)?;
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                .build()
                .map_err(|e| format!("cannot use the root certificates: {e}"))?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

fn root_store(roots: &Roots) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = store.add(cert);
            }
            if store.is_empty() {
                return Err("sslrootcert=system: the system has no trusted root certificates".into());
            }
        }
        Roots::File { path, .. } => {
            if !path.exists() {
                return Err(format!(
                    "root certificate file \"{}\" does not exist; either provide the file, use the system's \
                     trusted roots with sslrootcert=system, or change sslmode to disable server certificate \
                     verification",
                    path.display()
                ));
            }
            for cert in read_certificates(path)? {
                store
                    .add(cert)
                    .map_err(|e| format!("root certificate file \"{}\": {e}", path.display()))?;
            }
            if store.is_empty() {
                return Err(format!(
                    "root certificate file \"{}\" holds no PEM certificate",
                    path.display()
                ));
            }
        }
    }
    Ok(store)
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read root certificate file \"{}\": {e}", path.display()))
}

/// `prefer` and `require`: encrypted, but any certificate is accepted (libpq's behaviour);
/// the handshake's signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the host name is not compared.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the name only after the chain: a name error means the chain is good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Splits `sslmode` and `sslrootcert` off a connection string, returning the rest for
/// tokio-postgres (which knows neither `verify-*` nor `sslrootcert`).
fn take_ssl_options(conn: &str) -> Result<(String, SslOptions), String> {
    let mut options = SslOptions::default();
    let mut take = |key: &str, value: String| -> Result<bool, String> {
        if UNSUPPORTED.contains(&key) {
            return Err(format!(
                "{key} is not supported by keypool-worker (client certificates and CRLs are not implemented)"
            ));
        }
        match key {
            "sslmode" => options.mode = Some(value),
            "sslrootcert" => options.root_cert = Some(value),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let trimmed = conn.trim();
    let rest = if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        let (base, query) = trimmed.split_once('?').unwrap_or((trimmed, ""));
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(&percent_decode(k)?, percent_decode(v)?)? {
                kept.push(pair);
            }
        }
        if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else {
        let mut kept = Vec::new();
        for (k, v) in key_values(trimmed)? {
            if !take(&k, v.clone())? {
                kept.push(format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")));
            }
        }
        kept.join(" ")
    };
    Ok((rest, options))
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("invalid percent-encoding in the connection URL near {:?}", &s[i..]))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the connection URL decodes to invalid UTF-8".to_string())
}

/// libpq's key=value syntax: values may be single-quoted, with `\'` and `\\` escapes.
fn key_values(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!("connection option {key:?} has no value (expected {key}=value)"));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => value.push(chars.next().ok_or("unterminated quoted connection option")?),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err("unterminated quoted connection option".into()),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> (String, Option<String>, Option<String>) {
        let (rest, o) = take_ssl_options(s).unwrap();
        (rest, o.mode, o.root_cert)
    }

    #[test]
    fn ssl_options_are_taken_out_of_urls() {
        assert_eq!(
            split("postgres://u:p@db:5433/app?sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20x.pem&application_name=w"),
            (
                "postgres://u:p@db:5433/app?application_name=w".to_string(),
                Some("verify-full".into()),
                Some("/etc/ca x.pem".into())
            )
        );
        assert_eq!(
            split("postgresql://db/app?sslmode=require"),
            ("postgresql://db/app".to_string(), Some("require".into()), None)
        );
        assert_eq!(
            split("postgres://db/app"),
            ("postgres://db/app".to_string(), None, None)
        );
        assert!(take_ssl_options("postgres://db/app?sslcert=/x")
            .unwrap_err()
            .contains("sslcert"));
        assert!(take_ssl_options("postgres://db/app?sslmode=%zz").is_err());
    }

    #[test]
    fn ssl_options_are_taken_out_of_key_values() {
        let (rest, mode, root) = split("host=db  sslmode = verify-ca sslrootcert='/tmp/my ca\\'s.pem' password='a b'");
        assert_eq!(rest, "host='db' password='a b'");
        assert_eq!(mode.as_deref(), Some("verify-ca"));
        assert_eq!(root.as_deref(), Some("/tmp/my ca's.pem"));
        assert!(take_ssl_options("host=db sslmode").is_err());
        assert!(take_ssl_options("host='db").is_err());
        // What is left parses as before.
        let c = tokio_postgres::Config::from_str(&rest).unwrap();
        assert_eq!(c.get_password(), Some(&b"a b"[..]));
    }

    #[test]
    fn modes_follow_libpq() {
        let mode = |s: &str| configure(s).map(|(c, _, m)| (c.get_ssl_mode(), m));
        use tokio_postgres::config::SslMode as Wire;
        assert_eq!(
            mode("host=db sslmode=disable").unwrap(),
            (Wire::Disable, SslMode::Disable)
        );
        assert_eq!(
            mode("host=db sslmode=verify-full sslrootcert=system").unwrap().1,
            SslMode::VerifyFull
        );
        assert!(mode("host=db sslmode=require sslrootcert=system")
            .unwrap_err()
            .contains("verify-full"));
        assert!(mode("host=db sslmode=sometimes")
            .unwrap_err()
            .contains("invalid sslmode"));
        // A root file named but missing: libpq's message.
        let err = mode("host=db sslmode=verify-ca sslrootcert=/nonexistent/root.crt").unwrap_err();
        assert!(err.contains("does not exist"), "{err}");
        // `require` with a named root file verifies the chain, as libpq does.
        assert!(mode("host=db sslmode=require sslrootcert=/nonexistent/root.crt")
            .unwrap_err()
            .contains("does not exist"));
        // Unix-domain sockets never use TLS.
        assert_eq!(mode("host=/tmp sslmode=require").unwrap().0, Wire::Disable);
    }
}
