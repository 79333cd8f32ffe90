//! Running `tessera` subcommands as child processes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

/// The `tessera` binary under test: `TESSERA_BIN`, else `target/<profile>/tessera` beside the
/// test executable.
pub fn tessera_bin() -> PathBuf {
    if let Ok(path) = std::env::var("TESSERA_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/e2e-<hash> -> target/debug/tessera
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("tessera"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} does not exist: build it first with `cargo build --bin tessera` (scripts/test does), \
         or set TESSERA_BIN",
        bin.display()
    );
    bin
}

/// The start of the line where `tessera dev` prints the key of its source `default`.
const DEV_KEY_LINE: &str = "tessera: write key for source default: ";

/// Runs `tessera sources ARGS --target TARGET` to its end.
pub async fn sources_command(target: &str, args: &[&str]) -> std::process::Output {
    Command::new(tessera_bin())
        .arg("sources")
        .args(args)
        .args(["--target", target])
        .env_clear()
        .env("TESSERA_ACCESS_TOKEN", crate::auth::E2E_TOKEN)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run tessera sources")
}

/// The write key of `source` in the output of `tessera sources create|rotate-key`.
pub fn key_in(stdout: &str, source: &str) -> Option<String> {
    let prefix = format!("tessera: write key for source {source}: ");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|k| k.trim().to_owned())
}

/// How to start one `tessera` process.
#[derive(Debug, Clone)]
pub struct TesseraBuilder {
    args: Vec<String>,
    env: HashMap<String, String>,
    /// Where the process's stderr (its logs) goes; inherited when unset.
    stderr: Option<PathBuf>,
}

impl TesseraBuilder {
    /// `tessera <subcommand>` listening on free loopback ports.
    pub fn new(subcommand: &str) -> Self {
        let mut env = HashMap::new();
        env.insert(
            "TESSERA__TELEMETRY__LOG_FILTER".to_owned(),
            "warn,tessera=info".to_owned(),
        );
        // Every process takes the harness's token (every scope) besides its own.
        env.insert(
            "TESSERA__AUTH__BOOTSTRAP_TOKEN".to_owned(),
            crate::auth::E2E_TOKEN.to_owned(),
        );
        Self {
            args: vec![
                subcommand.to_owned(),
                "--grpc-addr".to_owned(),
                "127.0.0.1:0".to_owned(),
                "--http-addr".to_owned(),
                "127.0.0.1:0".to_owned(),
            ],
            env,
            stderr: None,
        }
    }

    /// Writes the process's stderr (its logs) to `path` instead of the test's stderr.
    pub fn stderr_to(mut self, path: impl Into<PathBuf>) -> Self {
        self.stderr = Some(path.into());
        self
    }

    /// Adds command-line arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The subcommand: `dev`, `ingestion`, `identity`, ...
    pub fn subcommand(&self) -> &str {
        &self.args[0]
    }

    /// Sets an environment variable of the process.
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.insert(key.to_owned(), value.into());
        self
    }

    /// Starts the process and waits until it listens.
    pub async fn start(self) -> Tessera {
        let mut command = Command::new(tessera_bin());
        command
            .args(&self.args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(match &self.stderr {
                Some(path) => {
                    Stdio::from(std::fs::File::create(path).expect("create the log file"))
                }
                None => Stdio::inherit(),
            })
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn tessera");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut write_key = None;
        let mut access_token = None;
        let line = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                if line.starts_with("tessera: listening ") {
                    return line;
                }
                if let Some(key) = line.strip_prefix(DEV_KEY_LINE) {
                    write_key = Some(key.trim().to_owned());
                }
                if let Some(token) = line.strip_prefix("tessera: profile api access token ") {
                    access_token = Some(token.trim().to_owned());
                }
            }
            panic!("tessera {:?} exited before listening", self.args);
        })
        .await
        .unwrap_or_else(|_| panic!("tessera {:?} did not start within 120 s", self.args));
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let field = |name: &str| -> String {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
                .to_owned()
        };
        Tessera {
            child,
            grpc_addr: field("grpc"),
            http_addr: field("http"),
            write_key,
            access_token,
            builder: self,
        }
    }
}

/// A running `tessera` process, killed when dropped.
#[derive(Debug)]
pub struct Tessera {
    child: Child,
    /// The gRPC address, `host:port`.
    pub grpc_addr: String,
    /// The HTTP address, `host:port`.
    pub http_addr: String,
    /// The write key of the source `default` that `tessera dev` printed, when it printed one
    /// (on first start, or when the key is fixed).
    pub write_key: Option<String>,
    /// The Profile API access token `tessera dev` printed.
    pub access_token: Option<String>,
    builder: TesseraBuilder,
}

impl Tessera {
    /// The CA of the process's TLS (`TESSERA__TLS__CA_FILE`), when it serves TLS.
    pub fn tls_ca_file(&self) -> Option<&str> {
        self.builder
            .env
            .get("TESSERA__TLS__CA_FILE")
            .map(String::as_str)
    }

    /// `https` when the process serves TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls_ca_file().is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The gRPC URL, `http://host:port` (`https://` when it serves TLS).
    pub fn grpc_url(&self) -> String {
        format!("{}://{}", self.scheme(), self.grpc_addr)
    }

    /// A channel to the process's gRPC port whose calls carry the harness's token (every
    /// scope); over TLS with its CA (and no client certificate) when it serves TLS.
    pub async fn channel(&self) -> crate::auth::Channel {
        crate::auth::authorized(self.raw_channel().await)
    }

    /// A channel to the process's gRPC port without a token.
    pub async fn raw_channel(&self) -> Channel {
        let mut endpoint = Channel::from_shared(self.grpc_url()).expect("url");
        if let Some(ca) = self.tls_ca_file() {
            let ca = std::fs::read(ca).expect("read the CA");
            endpoint = endpoint
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
                )
                .expect("TLS config");
        }
        endpoint.connect().await.expect("connect to tessera")
    }

    /// The write key `tessera dev` printed for the source `default`; panics when it printed none.
    pub fn dev_write_key(&self) -> &str {
        self.write_key
            .as_deref()
            .expect("tessera dev printed no write key (only on first start or with --write-key)")
    }

    /// Creates a source on this process with `tessera sources create NAME` and returns its
    /// write key.
    pub async fn create_source(&self, name: &str) -> String {
        let mut args = vec!["create", name];
        if let Some(ca) = self.tls_ca_file() {
            args.extend(["--ca-file", ca]);
        }
        let out = sources_command(&self.grpc_url(), &args).await;
        assert!(
            out.status.success(),
            "tessera sources create {name}: {out:?}"
        );
        key_in(&String::from_utf8_lossy(&out.stdout), name)
            .unwrap_or_else(|| panic!("no write key in the output of sources create: {out:?}"))
    }

    /// Kills the process at once (SIGKILL) and waits for it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Sends SIGTERM and waits for a graceful exit; returns whether it exited successfully.
    pub async fn terminate(&mut self) -> bool {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(Ok(status)) => status.success(),
            _ => false,
        }
    }

    /// The builder that started this process, to start it again.
    pub fn builder(&self) -> &TesseraBuilder {
        &self.builder
    }
}
