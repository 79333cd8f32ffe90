//! Plain HTTP/1.1 requests to a Tessera process, as any HTTP client sends them.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GETs `path` from `http_addr` with `token` as the Basic user; returns the status, the headers and the JSON body.
pub async fn get(http_addr: &str, path: &str, token: Option<&str>) -> (u16, String, Value) {
    let auth = token
        .map(|t| {
            format!(
                "Authorization: Basic {}\r\n",
                STANDARD.encode(format!("{t}:"))
            )
        })
        .unwrap_or_default();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {http_addr}\r\n{auth}Connection: close\r\n\r\n");
    let mut stream = tokio::net::TcpStream::connect(http_addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    (status, head.to_lowercase(), json)
}
