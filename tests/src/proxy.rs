//! A TCP proxy of the harness's own, put between a client and a server (two services, a service
//! and Postgres) to make the network between them fail on demand: cut (refuse and close),
//! slow (latency on every chunk), blackholed (bytes held, nothing answers) or its connections
//! dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug)]
struct Shared {
    up: AtomicBool,
    latency_us: AtomicU64,
    /// True while blackholed; forwarding waits for it to turn false.
    blackhole: watch::Sender<bool>,
    /// Bumped to close every open connection.
    cut: watch::Sender<u64>,
    target: Mutex<SocketAddr>,
}

/// Forwards connections from a loopback port to `target` while up; when cut, closes every
/// connection and refuses new ones.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

/// Copies one direction chunk by chunk, applying the proxy's latency and blackhole.
async fn pump(shared: Arc<Shared>, mut from: OwnedReadHalf, mut to: OwnedWriteHalf) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut blackhole = shared.blackhole.subscribe();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let latency = shared.latency_us.load(Ordering::Relaxed);
        if latency > 0 {
            tokio::time::sleep(Duration::from_micros(latency)).await;
        }
        if blackhole.wait_for(|held| !held).await.is_err() {
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Proxy {
    /// Starts a proxy to `target` on a free loopback port.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let shared = Arc::new(Shared {
            up: AtomicBool::new(true),
            latency_us: AtomicU64::new(0),
            blackhole: watch::channel(false).0,
            cut: watch::channel(0u64).0,
            target: Mutex::new(target),
        });
        let accept_shared = shared.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let shared = accept_shared.clone();
                if !shared.up.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut cut_rx = shared.cut.subscribe();
                let target = *shared.target.lock().expect("proxy target");
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    // Without it, small gRPC frames wait on delayed ACKs: ~40 ms per hop.
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    let up = tokio::spawn(pump(shared.clone(), in_read, out_write));
                    let down = tokio::spawn(pump(shared, out_read, in_write));
                    let (up_abort, down_abort) = (up.abort_handle(), down.abort_handle());
                    tokio::select! {
                        _ = async { let _ = tokio::join!(up, down); } => {}
                        _ = cut_rx.changed() => {}
                    }
                    // Dropping the halves closes both sockets.
                    up_abort.abort();
                    down_abort.abort();
                });
            }
        });
        Self { addr, shared }
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.shared.up.store(false, Ordering::SeqCst);
        self.drop_connections();
    }

    /// Closes every open connection (new ones are accepted as before), as a reset network would.
    pub fn drop_connections(&self) {
        self.shared.cut.send_modify(|n| *n += 1);
    }

    /// Forwards new connections to `target` from now on, so a restarted process on a new port
    /// keeps the address its peers know.
    pub fn set_target(&self, target: SocketAddr) {
        *self.shared.target.lock().expect("proxy target") = target;
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.shared.up.store(true, Ordering::SeqCst);
    }

    /// Delays every chunk forwarded, in both directions, by `latency` (zero: none).
    pub fn set_latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.shared.latency_us.store(us, Ordering::Relaxed);
    }

    /// While on, connections are accepted and bytes read, but nothing is forwarded: peers see
    /// silence, as behind a dropped route; when turned off, the held bytes flow again.
    pub fn set_blackhole(&self, on: bool) {
        self.shared.blackhole.send_replace(on);
    }
}
