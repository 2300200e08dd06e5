//! The amqps scenario's broker side: stunnel (Debian's stunnel4) terminating
//! TLS in front of the local RabbitMQ with a throwaway CA made by
//! tests/tls/make-certs, as the TLS integration tests do; and the bench
//! client's rustls configuration trusting that CA.

use crate::Ctx;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Terminator {
    child: Child,
    /// Where clients connect with TLS.
    pub addr: SocketAddr,
    pub ca_file: PathBuf,
    pub client_config: Arc<rustls::ClientConfig>,
}

fn find_stunnel() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| [d.join("stunnel4"), d.join("stunnel")])
        .find(|p| p.is_file())
}

impl Terminator {
    /// `None` when stunnel is not installed.
    pub fn start(ctx: &Ctx) -> io::Result<Option<Terminator>> {
        let Some(stunnel) = find_stunnel() else {
            return Ok(None);
        };
        let dir = ctx.target_dir.join("bench-tls");
        let make_certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls/make-certs");
        let status = Command::new(&make_certs).arg(&dir).status()?;
        if !status.success() {
            return Err(io::Error::other(format!(
                "{} {} failed: {status}",
                make_certs.display(),
                dir.display()
            )));
        }
        let port = crate::procfs::free_port()?;
        let conf = dir.join("stunnel.conf");
        std::fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\ndebug = 3\n[amqps]\naccept = 127.0.0.1:{port}\nconnect = {}\ncert = {}\nkey = {}\n",
                ctx.broker,
                dir.join("server.pem").display(),
                dir.join("server-key.pem").display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("stunnel.log"))?;
        let mut child = Command::new(&stunnel)
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = child.try_wait()? {
                return Err(io::Error::other(format!(
                    "stunnel exited with {status} (log: {})",
                    dir.join("stunnel.log").display()
                )));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(io::Error::other("stunnel did not listen within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let ca_file = dir.join("ca.pem");
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&ca_file)
            .map_err(|e| io::Error::other(format!("{}: {e}", ca_file.display())))?
        {
            let cert = cert.map_err(|e| io::Error::other(format!("{}: {e}", ca_file.display())))?;
            roots
                .add(cert)
                .map_err(|e| io::Error::other(format!("{}: {e}", ca_file.display())))?;
        }
        let client_config = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );
        Ok(Some(Terminator {
            child,
            addr,
            ca_file,
            client_config,
        }))
    }
}

impl Drop for Terminator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TLS client session for the terminator's certificate (made for
/// "localhost").
pub fn client(config: &Arc<rustls::ClientConfig>) -> io::Result<rustls::ClientConnection> {
    let name = ServerName::try_from("localhost").map_err(io::Error::other)?;
    rustls::ClientConnection::new(config.clone(), name).map_err(io::Error::other)
}
