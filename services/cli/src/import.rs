//! `tessera import FILE`: a bulk load of Segment-format JSON lines (plain or gzip) over the
//! StreamIngestEvents gRPC stream, resumable without duplicates.
//!
//! The file is sent in segments of `--batch` × [`SEGMENT_BATCHES`] lines, one stream call each.
//! Once a segment's response is in (its events are durable), the checkpoint `FILE.tessera-import`
//! records the last line covered, so a re-run after an interruption skips ahead. Lines acknowledged
//! by the server but not yet checkpointed are sent again on a re-run; they are duplicates because a
//! line without `messageId` gets one derived from the file's path and the line number.

// The CLI's output is its interface.
#![allow(clippy::print_stdout)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tessera_proto::common::v1 as common;
use tessera_proto::ingestion::v1 as pb;
use tessera_proto::ingestion::v1::ingestion_service_client::IngestionServiceClient;
use tonic::transport::Channel;

use crate::sources::WriteKeyArg;

/// Stream messages per stream call: the unit of acknowledgement and checkpointing.
const SEGMENT_BATCHES: usize = 20;
/// The most rejected lines kept for the summary; the count covers them all.
const MAX_LISTED_REJECTIONS: usize = 1_000;
/// Retries of a segment refused as over the rate limit or unavailable.
const MAX_RETRIES: u32 = 8;

/// Options of `tessera import`.
#[derive(Debug, clap::Args)]
pub(crate) struct ImportArgs {
    /// A file of Segment-format messages, one JSON object per line, optionally gzip-compressed
    /// (detected by its content, not its name).
    file: PathBuf,
    /// The gRPC address of the ingestion service (or of `tessera dev`).
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:50051")]
    target: String,
    #[command(flatten)]
    tls: crate::client_tls::ClientTlsArgs,
    /// The write key of the source to import into [env: TESSERA_WRITE_KEY].
    #[arg(long, value_name = "KEY")]
    pub(crate) write_key: Option<WriteKeyArg>,
    /// Events per stream message.
    #[arg(long, value_name = "N", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=2_500))]
    batch: u32,
}

/// A line that was not imported, and why.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct RejectedLine {
    line: u64,
    reason: String,
}

/// What `FILE.tessera-import` records: progress and the tallies of the lines it covers.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Checkpoint {
    /// Every line up to this one (from 1) is acknowledged or rejected.
    line: u64,
    accepted: u64,
    duplicates: u64,
    rejected: u64,
    rejections: Vec<RejectedLine>,
}

impl Checkpoint {
    fn reject(&mut self, line: u64, reason: String) {
        self.rejected += 1;
        if self.rejections.len() < MAX_LISTED_REJECTIONS {
            self.rejections.push(RejectedLine { line, reason });
        }
    }

    fn load(path: &Path) -> anyhow::Result<Option<Self>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("unreadable checkpoint {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Written to a temporary file and renamed, so an interruption leaves the old or the new.
    fn save(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("tessera-import.tmp");
        std::fs::write(&tmp, serde_json::to_vec(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }
}

/// Counts the bytes read from the file, for the progress bar's ETA.
struct Counting<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// The lines of `path`, decompressed when it starts with the gzip magic bytes.
fn open(path: &Path, read: Arc<AtomicU64>) -> anyhow::Result<Box<dyn BufRead + Send>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut raw = BufReader::new(Counting { inner: file, read });
    let gzip = raw.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    Ok(if gzip {
        Box::new(BufReader::new(flate2::bufread::MultiGzDecoder::new(raw)))
    } else {
        Box::new(raw)
    })
}

/// The message id of a line without one: stable across runs for the same file and line.
fn line_message_id(file: &str, line: u64) -> String {
    let digest = Sha256::digest(format!("{file}\n{line}").as_bytes());
    format!("import-{}", hex::encode(&digest[..16]))
}

fn describe(violations: &[impl std::fmt::Display]) -> String {
    violations
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The proto event of one line; why not otherwise.
fn convert(line: &[u8], message_id: impl FnOnce() -> String) -> Result<common::Event, String> {
    let mut value: Value =
        serde_json::from_slice(line).map_err(|e| format!("not a JSON message: {e}"))?;
    if let Value::Object(map) = &mut value {
        let missing = match map.get("messageId") {
            None | Some(Value::Null) => true,
            Some(Value::String(s)) => s.is_empty(),
            Some(_) => false,
        };
        if missing {
            map.insert("messageId".to_owned(), Value::String(message_id()));
        }
    }
    let mut event = tessera_ingestion::segment_message(value)
        .map_err(|vs| describe(&vs.iter().map(Violation).collect::<Vec<_>>()))?;
    // Historical data keeps its recorded time: the clock-skew correction (receivedAt − (sentAt −
    // originalTimestamp)) is for live sends and would move every event to the import's time.
    event.sent_at = None;
    Ok(tessera_proto::convert::event_to_pb(&event))
}

/// A violation as the summary shows it.
struct Violation<'a>(&'a tessera_core::FieldViolation);

impl std::fmt::Display for Violation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.field.is_empty() {
            f.write_str(&self.0.description)
        } else {
            write!(f, "{}: {}", self.0.field, self.0.description)
        }
    }
}

/// Sends one segment as one stream call, retrying while the server asks to wait.
async fn send(
    client: &mut IngestionServiceClient<Channel>,
    write_key: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    chunks: &[pb::StreamIngestEventsRequest],
) -> anyhow::Result<pb::StreamIngestEventsResponse> {
    let mut attempt = 0;
    loop {
        let mut request = tonic::Request::new(futures::stream::iter(chunks.to_vec()));
        request
            .metadata_mut()
            .insert("x-tessera-write-key", write_key.clone());
        match client.stream_ingest_events(request).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status)
                if attempt < MAX_RETRIES
                    && matches!(
                        status.code(),
                        tonic::Code::ResourceExhausted | tonic::Code::Unavailable
                    )
                    // A chunk over the server's batch limit fails the same way each time.
                    && !status.message().contains("exceed the limit") =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(250 << attempt.min(5))).await;
            }
            Err(status) => {
                return Err(anyhow::anyhow!(
                    "the server refused the import: {:?}: {}",
                    status.code(),
                    status.message()
                ));
            }
        }
    }
}

/// The segment being read: events to send and the line of each.
#[derive(Default)]
struct Segment {
    events: Vec<common::Event>,
    lines: Vec<u64>,
}

/// Runs `tessera import`.
pub(crate) async fn run(args: ImportArgs) -> anyhow::Result<()> {
    let write_key: tonic::metadata::MetadataValue<tonic::metadata::Ascii> = args
        .write_key
        .as_ref()
        .context(
            "a write key is required: --write-key or TESSERA_WRITE_KEY (`tessera dev` prints \
             one on first start)",
        )?
        .0
        .parse()
        .context("the write key is not valid ASCII")?;
    let batch = args.batch as usize;
    let canonical = std::fs::canonicalize(&args.file)
        .with_context(|| format!("cannot open {}", args.file.display()))?;
    let id_seed = canonical.to_string_lossy().into_owned();
    let mut checkpoint_path = args.file.clone().into_os_string();
    checkpoint_path.push(".tessera-import");
    let checkpoint_path = PathBuf::from(checkpoint_path);
    let mut checkpoint = Checkpoint::load(&checkpoint_path)?.unwrap_or_default();
    let resumed_after = checkpoint.line;

    if resumed_after > 0 {
        eprintln!(
            "tessera import: resuming after line {resumed_after} ({})",
            checkpoint_path.display()
        );
    }

    let channel = crate::client_tls::endpoint(&args.target, &args.tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {}", args.target))?;
    let mut client = IngestionServiceClient::new(channel)
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(64 * 1024 * 1024);

    let size = std::fs::metadata(&args.file)?.len();
    let read = Arc::new(AtomicU64::new(0));
    let mut lines = open(&args.file, read.clone())?;
    let progress = ProgressBar::new(size);
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] [{wide_bar}] {percent}% ETA {eta} {msg}",
        )?
        .progress_chars("=> "),
    );
    progress.enable_steady_tick(Duration::from_millis(200));
    let started = Instant::now();
    let mut sent_lines: u64 = 0;
    let mut line_no: u64 = 0;
    let mut segment = Segment::default();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let eof = lines
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("reading {}", args.file.display()))?
            == 0;
        if !eof {
            line_no += 1;
            if line_no > checkpoint.line && !buf.trim_ascii().is_empty() {
                sent_lines += 1;
                match convert(buf.trim_ascii(), || line_message_id(&id_seed, line_no)) {
                    Ok(event) => {
                        segment.events.push(event);
                        segment.lines.push(line_no);
                    }
                    Err(reason) => checkpoint.reject(line_no, reason),
                }
            }
        }
        if eof || segment.events.len() >= batch * SEGMENT_BATCHES {
            let events = std::mem::take(&mut segment.events);
            let chunk_lines = std::mem::take(&mut segment.lines);
            if !events.is_empty() {
                let chunks: Vec<_> = events
                    .chunks(batch)
                    .map(|c| pb::StreamIngestEventsRequest { events: c.to_vec() })
                    .collect();
                drop(events);
                let response = send(&mut client, &write_key, &chunks).await?;
                checkpoint.accepted += response.accepted;
                checkpoint.duplicates += response.duplicates;
                let listed = response.rejections.len() as u64;
                for r in response.rejections {
                    let line = usize::try_from(r.index)
                        .ok()
                        .and_then(|i| chunk_lines.get(i).copied())
                        .unwrap_or_default();
                    let reason = describe(
                        &r.violations
                            .iter()
                            .map(|v| format!("{}: {}", v.field, v.description))
                            .collect::<Vec<_>>(),
                    );
                    checkpoint.reject(line, reason);
                }
                // Rejections the server counted but did not list.
                checkpoint.rejected += response.rejected.saturating_sub(listed);
            }
            checkpoint.line = line_no;
            checkpoint.save(&checkpoint_path)?;
            // Acknowledged progress, not read progress: reading runs a segment ahead.
            progress.set_position(read.load(Ordering::Relaxed));
            let rate = sent_lines as f64 / started.elapsed().as_secs_f64().max(1e-3);
            progress.set_message(format!("{line_no} lines, {rate:.0} lines/s"));
        }
        if eof {
            break;
        }
    }
    progress.finish_and_clear();

    checkpoint.rejections.sort_by_key(|r| r.line);
    println!(
        "imported {}: {line_no} lines, {} accepted, {} duplicates, {} rejected",
        args.file.display(),
        checkpoint.accepted,
        checkpoint.duplicates,
        checkpoint.rejected
    );
    for r in &checkpoint.rejections {
        println!("  line {}: {}", r.line, r.reason);
    }
    if checkpoint.rejected > checkpoint.rejections.len() as u64 {
        println!(
            "  … and {} more",
            checkpoint.rejected - checkpoint.rejections.len() as u64
        );
    }
    // Done: a re-run starts over, sending only duplicates (and any lines fixed since).
    std::fs::remove_file(&checkpoint_path)
        .with_context(|| format!("removing {}", checkpoint_path.display()))?;
    if checkpoint.rejected > 0 {
        anyhow::bail!("{} lines rejected", checkpoint.rejected);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_ids_are_stable_and_distinct() {
        assert_eq!(line_message_id("/a", 1), line_message_id("/a", 1));
        assert_ne!(line_message_id("/a", 1), line_message_id("/a", 2));
        assert_ne!(line_message_id("/a", 1), line_message_id("/b", 1));
    }

    #[test]
    fn lines_convert_with_a_derived_id_or_a_reason() {
        let event = convert(br#"{"type":"track","userId":"u1","event":"E"}"#, || {
            "derived".into()
        })
        .unwrap();
        assert_eq!(event.message_id, "derived");
        assert_eq!(event.user_id, "u1");
        let kept = convert(
            br#"{"type":"track","userId":"u1","event":"E","messageId":"m"}"#,
            || "derived".into(),
        )
        .unwrap();
        assert_eq!(kept.message_id, "m");
        let reason = convert(br#"{"type":"track","event":"E"}"#, || "x".into()).unwrap_err();
        assert!(reason.contains("userId"), "{reason}");
        assert!(convert(b"{not json", || "x".into()).is_err());
    }

    #[test]
    fn the_write_key_comes_from_the_flag_or_the_environment() {
        use clap::Parser as _;
        let key = |args: &[&str], env: &[(&str, &str)]| {
            let cli = crate::Cli::try_parse_from(args).unwrap();
            let env = env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            match crate::run::plan(cli.command, &env).unwrap() {
                crate::run::Plan::Import(args) => args.write_key.map(|k| k.0),
                crate::run::Plan::Serve { .. }
                | crate::run::Plan::Migrate { .. }
                | crate::run::Plan::DevCerts(_)
                | crate::run::Plan::Bench(_)
                | crate::run::Plan::BenchReads(_)
                | crate::run::Plan::Sources(_)
                | crate::run::Plan::Profiles(_)
                | crate::run::Plan::Definitions(_)
                | crate::run::Plan::Tokens { .. }
                | crate::run::Plan::Audit { .. } => panic!("import"),
            }
        };
        let env = [("TESSERA_WRITE_KEY", "env-key-123")];
        assert_eq!(
            key(&["tessera", "import", "f.jsonl"], &env).as_deref(),
            Some("env-key-123")
        );
        assert_eq!(
            key(
                &[
                    "tessera",
                    "import",
                    "f.jsonl",
                    "--write-key",
                    "flag-key-123"
                ],
                &env
            )
            .as_deref(),
            Some("flag-key-123")
        );
        assert_eq!(key(&["tessera", "import", "f.jsonl"], &[]), None);
    }
}
