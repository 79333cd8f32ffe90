//! `tessera profiles`: reading what Tessera holds about a person through the ProfileService
//! API of a running Tessera.

// The CLI's output is its interface.
#![allow(clippy::print_stdout)]

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use tessera_proto::common::v1::Identifier;
use tessera_proto::profile::v1 as pb;
use tessera_proto::profile::v1::profile_service_client::ProfileServiceClient;
use tonic::transport::Endpoint;

/// Options of `tessera profiles`.
#[derive(Debug, clap::Args)]
pub(crate) struct ProfilesArgs {
    /// The gRPC address of the profile service (or of `tessera dev`).
    #[arg(long, global = true, default_value = "http://127.0.0.1:50051")]
    target: String,
    #[command(subcommand)]
    command: ProfilesCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ProfilesCommand {
    /// Print everything Tessera holds about a person as JSON (GDPR right of access): the
    /// profile, its identity graph and every event of its timeline.
    Export {
        /// The person: `type:value` of any identifier (`user_id:u1`, `email:ann@example.com`)
        /// or `profile_id:<id>`.
        person: String,
        /// Write the JSON to this file instead of standard output.
        #[arg(long, value_name = "FILE")]
        output: Option<std::path::PathBuf>,
    },
}

/// The lookup `type:value` names.
fn lookup(person: &str) -> anyhow::Result<pb::export_profile_request::Lookup> {
    use pb::export_profile_request::Lookup;
    let (kind, value) = person
        .split_once(':')
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .context("name the person as type:value, for example user_id:u1 or profile_id:<id>")?;
    Ok(if kind == "profile_id" {
        Lookup::ProfileId(value.to_owned())
    } else {
        Lookup::Identifier(Identifier {
            r#type: kind.to_owned(),
            value: value.to_owned(),
        })
    })
}

/// Runs `tessera profiles`.
pub(crate) async fn run(args: ProfilesArgs) -> anyhow::Result<()> {
    match args.command {
        ProfilesCommand::Export { person, output } => {
            let lookup = lookup(&person)?;
            let channel = Endpoint::from_shared(args.target.clone())
                .with_context(|| format!("invalid --target {}", args.target))?
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(120))
                .connect()
                .await
                .with_context(|| {
                    format!("cannot reach Tessera at {}: is it running?", args.target)
                })?;
            let export = ProfileServiceClient::new(channel)
                .max_decoding_message_size(256 * 1024 * 1024)
                .export_profile(pb::ExportProfileRequest {
                    lookup: Some(lookup),
                })
                .await
                .map_err(|s| anyhow::anyhow!("export {person}: {}", s.message()))?
                .into_inner();
            match output {
                Some(path) => {
                    std::fs::write(&path, &export.document)
                        .with_context(|| format!("writing {}", path.display()))?;
                    println!(
                        "tessera: exported profile {} to {}",
                        export.profile_id,
                        path.display()
                    );
                }
                None => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&export.document)?;
                    out.write_all(b"\n")?;
                }
            }
            Ok(())
        }
    }
}
