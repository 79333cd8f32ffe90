//! The tracking API tests' harness: the ingestion service behind the real server edge on
//! loopback ports, a plain HTTP/1.1 client that sends exactly the bytes it is given (so captured
//! requests replay byte for byte), and a look at what the event log stored.

use std::net::SocketAddr;

use serde_json::Value;

pub(crate) use crate::Backend;
use crate::TestDatabase;
use tessera_ingestion::{Ingestion, IngestionSettings, MIGRATIONS, SCHEMA};
use tessera_proto::ingestion::v1::source_service_client::SourceServiceClient;
use tessera_proto::ingestion::v1::{CreateSourceRequest, DisableSourceRequest};
use tessera_server::{EdgeSettings, GrpcServices, Shutdown};
use tessera_store::{Database, DbSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The write key of the source every test server starts with (the fixtures' key).
pub(crate) const KEY: &str = "TEST_WRITE_KEY";

/// The ingestion service served on loopback, with the source `default` keyed [`KEY`].
pub(crate) struct Api {
    /// The HTTP port.
    pub(crate) http: SocketAddr,
    grpc: SocketAddr,
    /// The service's database, for looking at what was stored.
    pub(crate) db: Database,
    shutdown: Shutdown,
    _keep: TestDatabase,
}

impl Api {
    /// Serves a fresh database of `backend` with `settings`.
    pub(crate) async fn start(backend: Backend, settings: IngestionSettings) -> Self {
        let keep = TestDatabase::new(backend).await;
        let url = keep.url();
        let db = Database::connect(&url, SCHEMA, &DbSettings::default())
            .await
            .unwrap();
        db.migrate(MIGRATIONS).await.unwrap();
        let ingestion = Ingestion::new(db.clone(), settings).await.unwrap();
        ingestion.ensure_dev_source(Some(KEY)).await.unwrap();
        let mut services = GrpcServices::default();
        ingestion.register(&mut services);
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
        let shutdown = Shutdown::new();
        let stop = shutdown.clone();
        let routes = ingestion.http_routes();
        tokio::spawn(async move {
            tessera_server::serve(&EdgeSettings::default(), grpc, http, services, routes, stop)
                .await
                .expect("serve");
        });
        Self {
            http: http_addr,
            grpc: grpc_addr,
            db,
            shutdown,
            _keep: keep,
        }
    }

    /// A channel to the gRPC port.
    pub(crate) async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// The admin API of sources.
    pub(crate) async fn sources(&self) -> SourceServiceClient<tonic::transport::Channel> {
        SourceServiceClient::new(self.channel().await)
    }

    /// Creates a source, returning its id and write key.
    pub(crate) async fn create_source(&self, name: &str, rate_limit: u32) -> (String, String) {
        let created = self
            .sources()
            .await
            .create_source(CreateSourceRequest {
                name: name.to_owned(),
                rate_limit_per_second: rate_limit,
                ..CreateSourceRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        (created.source.unwrap().id, created.write_key)
    }

    /// Disables the source called `name`.
    pub(crate) async fn disable_source(&self, name: &str) {
        self.sources()
            .await
            .disable_source(DisableSourceRequest {
                name: name.to_owned(),
            })
            .await
            .unwrap();
    }

    /// POSTs `body` to `path` with `headers` (a Content-Length is added when missing).
    pub(crate) async fn post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        let mut head: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        if !head
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        {
            head.push(("Content-Length".into(), body.len().to_string()));
        }
        self.raw("POST", path, &head, body).await
    }

    /// POSTs JSON to `path` with the write key as the Basic user.
    pub(crate) async fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.post(
            path,
            &[
                ("Content-Type", "application/json"),
                ("Authorization", &basic(KEY)),
            ],
            &serde_json::to_vec(body).unwrap(),
        )
        .await
    }

    /// Sends exactly this request line, these headers and this body; reads one response.
    pub(crate) async fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Reply {
        let mut request = format!("{method} {path} HTTP/1.1\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            request.push_str(&format!("Host: {}\r\n", self.http));
        }
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body);
        let mut stream = TcpStream::connect(self.http).await.unwrap();
        stream.write_all(&bytes).await.unwrap();
        read_reply(&mut stream).await
    }

    /// Every stored event: (source id, message id, payload), in log order.
    pub(crate) async fn stored(&self) -> Vec<(String, String, Value)> {
        let rows: Vec<(String, String, String)> = match &self.db {
            Database::Postgres(pool) => sqlx::query_as(
                "SELECT source_id, message_id, payload::text FROM events ORDER BY seq",
            )
            .fetch_all(pool)
            .await
            .unwrap(),
            Database::Sqlite(pool) => {
                sqlx::query_as("SELECT source_id, message_id, payload FROM events ORDER BY seq")
                    .fetch_all(pool)
                    .await
                    .unwrap()
            }
        };
        rows.into_iter()
            .map(|(s, m, p)| (s, m, serde_json::from_str(&p).unwrap()))
            .collect()
    }

    /// The message ids of the stored events, in log order.
    pub(crate) async fn message_ids(&self) -> Vec<String> {
        self.stored().await.into_iter().map(|(_, m, _)| m).collect()
    }

    /// The stored payload of `message_id`.
    pub(crate) async fn payload(&self, message_id: &str) -> Value {
        self.stored()
            .await
            .into_iter()
            .find(|(_, m, _)| m == message_id)
            .map(|(_, _, p)| p)
            .unwrap_or_else(|| panic!("message {message_id} was not stored"))
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The `Authorization` value the libraries send: Basic with the key as user, empty password.
pub(crate) fn basic(key: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
    )
}

/// Gzips `data`.
pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// One HTTP response.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    /// The body as JSON (panics with the body when it is not).
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// A header's value.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts exactly `200 {"success":true}`.
    pub(crate) fn assert_success(&self) {
        assert_eq!(
            (self.status, self.text().as_str()),
            (200, r#"{"success":true}"#),
            "expected exactly 200 {{\"success\":true}}"
        );
    }

    /// The `(index, field)` of each listed error.
    pub(crate) fn errors(&self) -> Vec<(Option<u64>, String)> {
        self.json()["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("no errors in {}", self.text()))
            .iter()
            .map(|e| {
                (
                    e["index"].as_u64(),
                    e["field"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }
}

async fn read_reply(stream: &mut TcpStream) -> Reply {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = buf[head_end..].to_vec();
    let length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if status == 204 || status == 304 {
        body.clear();
    } else if let Some(length) = length {
        while body.len() < length {
            let mut chunk = [0u8; 8192];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed before the whole body");
            body.extend_from_slice(&chunk[..n]);
        }
        body.truncate(length);
    } else if chunked {
        while !body.ends_with(b"0\r\n\r\n") {
            let mut chunk = [0u8; 8192];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed before the last chunk");
            body.extend_from_slice(&chunk[..n]);
        }
        body = dechunk(&body);
    } else {
        stream.read_to_end(&mut body).await.unwrap();
    }
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(
            std::str::from_utf8(&data[..line_end])
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .trim(),
            16,
        )
        .unwrap();
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}
