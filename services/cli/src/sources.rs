//! `tessera sources`: managing sources (write keys, rate limits, tracking-plan modes) of a running
//! Tessera through the SourceService admin API.

// The CLI's output is its interface.
#![allow(clippy::print_stdout)]

use std::time::Duration;

use anyhow::Context as _;
use tessera_proto::ingestion::v1 as pb;
use tessera_proto::ingestion::v1::source_service_client::SourceServiceClient;

/// Options of `tessera sources`.
#[derive(Debug, clap::Args)]
pub(crate) struct SourcesArgs {
    /// The gRPC address of the ingestion service (or of `tessera dev`).
    #[arg(long, global = true, default_value = "http://127.0.0.1:50051")]
    target: String,
    #[command(flatten)]
    tls: crate::client_tls::ClientTlsArgs,
    #[command(subcommand)]
    command: SourcesCommand,
}

#[derive(Debug, clap::Subcommand)]
enum SourcesCommand {
    /// Create a source and print its write key (shown this once).
    Create {
        /// The source's unique name: letters, digits, '-', '_' or '.'.
        name: String,
        /// Events per second accepted per ingestion replica [default: no limit].
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        rate_limit: Option<u32>,
        /// How the source's tracking plan is enforced [default: allow].
        #[arg(long, value_enum)]
        plan_mode: Option<PlanMode>,
    },
    /// List every source (key prefixes only: keys are never stored).
    List,
    /// Show one source.
    Get {
        /// The source's name.
        name: String,
    },
    /// Disable a source: its write key is refused until it is enabled again.
    Disable {
        /// The source's name.
        name: String,
    },
    /// Enable a disabled source again, with its current write key.
    Enable {
        /// The source's name.
        name: String,
    },
    /// Replace a source's write key and print the new one (shown this once); the old key
    /// stops working.
    RotateKey {
        /// The source's name.
        name: String,
    },
    /// Change a source's rate limit or tracking-plan mode.
    Update {
        /// The source's name.
        name: String,
        /// The new limit in events per second per ingestion replica.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "no_rate_limit")]
        rate_limit: Option<u32>,
        /// Remove the rate limit.
        #[arg(long)]
        no_rate_limit: bool,
        /// The new tracking-plan mode.
        #[arg(long, value_enum)]
        plan_mode: Option<PlanMode>,
    },
}

/// A tracking-plan mode on the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PlanMode {
    /// No checks.
    Allow,
    /// Accept events and record their violations.
    Warn,
    /// Reject violating events into quarantine.
    Block,
}

impl From<PlanMode> for pb::TrackingPlanMode {
    fn from(mode: PlanMode) -> Self {
        match mode {
            PlanMode::Allow => Self::Allow,
            PlanMode::Warn => Self::Warn,
            PlanMode::Block => Self::Block,
        }
    }
}

/// A write key given on the command line or in the environment: never printed by `Debug`.
#[derive(Clone)]
pub(crate) struct WriteKeyArg(pub(crate) String);

impl std::fmt::Debug for WriteKeyArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteKeyArg(<redacted>)")
    }
}

impl std::str::FromStr for WriteKeyArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if tessera_ingestion::is_valid_write_key(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err("a write key is 8 to 256 printable ASCII characters without spaces or ':'".into())
        }
    }
}

/// The line that shows a write key; scripts and tests look for it.
pub(crate) fn key_line(source: &str, key: &str) -> String {
    format!("tessera: write key for source {source}: {key}")
}

/// Runs `tessera sources`.
pub(crate) async fn run(args: SourcesArgs) -> anyhow::Result<()> {
    let channel = crate::client_tls::endpoint(&args.target, &args.tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("cannot reach Tessera at {}: is it running?", args.target))?;
    let mut client = SourceServiceClient::new(crate::client_tls::authorized(channel, &args.tls)?);
    match args.command {
        SourcesCommand::Create {
            name,
            rate_limit,
            plan_mode,
        } => {
            let created = call(
                client.create_source(pb::CreateSourceRequest {
                    name,
                    rate_limit_per_second: rate_limit.unwrap_or(0),
                    tracking_plan_mode: plan_mode
                        .map_or(pb::TrackingPlanMode::Unspecified, Into::into)
                        .into(),
                }),
            )
            .await?;
            show_key("created", created.source, &created.write_key)
        }
        SourcesCommand::List => {
            let listed = call(client.list_sources(pb::ListSourcesRequest {})).await?;
            print_table(&listed.sources);
            Ok(())
        }
        SourcesCommand::Get { name } => {
            let got = call(client.get_source(pb::GetSourceRequest { name })).await?;
            print_table(got.source.as_slice());
            Ok(())
        }
        SourcesCommand::Disable { name } => {
            let done = call(client.disable_source(pb::DisableSourceRequest { name })).await?;
            print_table(done.source.as_slice());
            Ok(())
        }
        SourcesCommand::Enable { name } => {
            let done = call(client.enable_source(pb::EnableSourceRequest { name })).await?;
            print_table(done.source.as_slice());
            Ok(())
        }
        SourcesCommand::RotateKey { name } => {
            let rotated = call(client.rotate_write_key(pb::RotateWriteKeyRequest { name })).await?;
            show_key("rotated the key of", rotated.source, &rotated.write_key)
        }
        SourcesCommand::Update {
            name,
            rate_limit,
            no_rate_limit,
            plan_mode,
        } => {
            let rate_limit_per_second = if no_rate_limit { Some(0) } else { rate_limit };
            if rate_limit_per_second.is_none() && plan_mode.is_none() {
                anyhow::bail!(
                    "nothing to change: give --rate-limit, --no-rate-limit or --plan-mode"
                );
            }
            let done = call(
                client.update_source(pb::UpdateSourceRequest {
                    name,
                    rate_limit_per_second,
                    tracking_plan_mode: plan_mode
                        .map_or(pb::TrackingPlanMode::Unspecified, Into::into)
                        .into(),
                }),
            )
            .await?;
            print_table(done.source.as_slice());
            Ok(())
        }
    }
}

/// Awaits a call, turning a failed status into an error that says what the server said.
async fn call<T>(
    response: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    match response.await {
        Ok(r) => Ok(r.into_inner()),
        Err(status) => Err(anyhow::anyhow!(
            "{} ({:?})",
            status.message(),
            status.code()
        )),
    }
}

fn show_key(what: &str, source: Option<pb::Source>, key: &str) -> anyhow::Result<()> {
    let source = source.context("the server returned no source")?;
    println!("{what} source {} (id {})", source.name, source.id);
    println!("{}", key_line(&source.name, key));
    eprintln!(
        "tessera: the key is shown this once (only its hash is stored): keep it now. Clients send \
         it as the HTTP Basic user name (Segment libraries: writeKey) or in the gRPC metadata \
         x-tessera-write-key."
    );
    Ok(())
}

fn plan_mode_name(value: i32) -> &'static str {
    match pb::TrackingPlanMode::try_from(value) {
        Ok(pb::TrackingPlanMode::Allow | pb::TrackingPlanMode::Unspecified) => "allow",
        Ok(pb::TrackingPlanMode::Warn) => "warn",
        Ok(pb::TrackingPlanMode::Block) => "block",
        Err(_) => "unknown",
    }
}

fn format_time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| {
        time::OffsetDateTime::from_unix_timestamp(t.seconds)
            .ok()
            .and_then(|d| {
                d.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
    })
    .unwrap_or_else(|| "-".to_owned())
}

fn print_table(sources: &[pb::Source]) {
    let rows: Vec<[String; 8]> = sources
        .iter()
        .map(|s| {
            [
                s.name.clone(),
                if s.enabled { "enabled" } else { "disabled" }.to_owned(),
                format!("{}…", s.write_key_prefix),
                if s.rate_limit_per_second == 0 {
                    "-".to_owned()
                } else {
                    format!("{}/s", s.rate_limit_per_second)
                },
                plan_mode_name(s.tracking_plan_mode).to_owned(),
                format_time(s.create_time.as_ref()),
                format_time(s.key_rotate_time.as_ref()),
                s.id.clone(),
            ]
        })
        .collect();
    let header = [
        "NAME",
        "STATE",
        "KEY",
        "RATE",
        "PLAN",
        "CREATED",
        "KEY ROTATED",
        "ID",
    ]
    .map(str::to_owned);
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use clap::Parser as _;

    use super::*;
    use crate::run::{Plan, plan};
    use crate::{Cli, Command};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tessera").chain(args.iter().copied()))
    }

    #[test]
    fn sources_commands_parse() {
        let cli = parse(&[
            "sources",
            "create",
            "web",
            "--rate-limit",
            "50",
            "--plan-mode",
            "warn",
            "--target",
            "http://10.0.0.1:50051",
        ])
        .unwrap();
        let Command::Sources(args) = cli.command else {
            panic!("sources")
        };
        assert_eq!(args.target, "http://10.0.0.1:50051");
        assert!(matches!(
            args.command,
            SourcesCommand::Create {
                ref name,
                rate_limit: Some(50),
                plan_mode: Some(PlanMode::Warn),
            } if name == "web"
        ));
        for ok in [
            &["sources", "list"][..],
            &["sources", "disable", "web"],
            &["sources", "enable", "web"],
            &["sources", "rotate-key", "web"],
            &["sources", "update", "web", "--no-rate-limit"],
        ] {
            parse(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        for bad in [
            &["sources", "create"][..],
            &["sources", "create", "web", "--rate-limit", "0"],
            &["sources", "create", "web", "--plan-mode", "strict"],
            &[
                "sources",
                "update",
                "web",
                "--rate-limit",
                "5",
                "--no-rate-limit",
            ],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} is refused");
        }
    }

    fn dev_key(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Option<String>> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        // Planning `dev` writes its access token into the data directory: a temporary one.
        let data = tempfile::tempdir()?;
        let data_dir = data.path().to_str().expect("a UTF-8 path").to_owned();
        let args: Vec<&str> = args
            .iter()
            .copied()
            .chain(["--data-dir", data_dir.as_str()])
            .collect();
        match plan(parse(&args)?.command, &env)? {
            Plan::Serve { dev_write_key, .. } => Ok(dev_write_key.map(|k| k.0)),
            Plan::Migrate { .. }
            | Plan::DevCerts(_)
            | Plan::Bench(_)
            | Plan::BenchReads(_)
            | Plan::Sources(_)
            | Plan::Import(_)
            | Plan::Profiles(_)
            | Plan::Definitions(_)
            | Plan::Tokens { .. }
            | Plan::Audit { .. } => {
                panic!("serve")
            }
        }
    }

    #[test]
    fn dev_takes_a_fixed_write_key_from_the_flag_or_the_environment() {
        assert_eq!(dev_key(&["dev"], &[]).unwrap(), None);
        let from_env = dev_key(&["dev"], &[("TESSERA_WRITE_KEY", "env-key-123")]).unwrap();
        assert_eq!(from_env.as_deref(), Some("env-key-123"));
        let flag_wins = dev_key(
            &["dev", "--write-key", "flag-key-123"],
            &[("TESSERA_WRITE_KEY", "env-key-123")],
        )
        .unwrap();
        assert_eq!(flag_wins.as_deref(), Some("flag-key-123"));
        let err = dev_key(&["dev"], &[("TESSERA_WRITE_KEY", "bad key")]).unwrap_err();
        assert!(err.to_string().contains("TESSERA_WRITE_KEY"), "{err}");
        assert!(dev_key(&["dev", "--write-key", "short"], &[]).is_err());
    }

    #[test]
    fn write_keys_never_print_in_debug() {
        let cli = parse(&["dev", "--write-key", "secret-key-123"]).unwrap();
        assert!(!format!("{cli:?}").contains("secret-key-123"));
        assert!(key_line("default", "tsk_x").ends_with("source default: tsk_x"));
    }
}
