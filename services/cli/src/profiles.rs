//! `tessera profiles`: exporting and deleting what Tessera holds about a person (GDPR rights of
//! access and erasure) through the ProfileService API of a running Tessera.

// The CLI's output is its interface.
#![allow(clippy::print_stdout)]

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use tessera_proto::common::v1::Identifier;
use tessera_proto::profile::v1 as pb;
use tessera_proto::profile::v1::profile_service_client::ProfileServiceClient;

/// Options of `tessera profiles`.
#[derive(Debug, clap::Args)]
pub(crate) struct ProfilesArgs {
    /// The gRPC address of the profile service (or of `tessera dev`).
    #[arg(long, global = true, default_value = "http://127.0.0.1:50051")]
    target: String,
    #[command(flatten)]
    tls: crate::client_tls::ClientTlsArgs,
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
    /// Delete a person for good (GDPR right to erasure): the profile and the profiles merged
    /// into it, identifiers and identity graph, events (also in the event log), computed
    /// values, audience memberships, history and cache entries. Later events carrying the
    /// person's user id, email or phone are suppressed. Cannot be undone.
    Delete {
        /// The person: `type:value` of any identifier or `profile_id:<id>` (a deleted
        /// profile id finishes a deletion that failed midway).
        person: String,
        /// Why (for example a ticket number), kept with the record of the deletion.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// The lookup `type:value` names: a profile id or an identifier.
fn lookup(person: &str) -> anyhow::Result<Result<String, Identifier>> {
    let (kind, value) = person
        .split_once(':')
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .context("name the person as type:value, for example user_id:u1 or profile_id:<id>")?;
    Ok(if kind == "profile_id" {
        Ok(value.to_owned())
    } else {
        Err(Identifier {
            r#type: kind.to_owned(),
            value: value.to_owned(),
        })
    })
}

/// A client of the profile service at `target`.
async fn connect(
    target: &str,
    tls: &crate::client_tls::ClientTlsArgs,
) -> anyhow::Result<ProfileServiceClient<crate::client_tls::Authorized>> {
    let channel = crate::client_tls::endpoint(target, tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(120))
        .connect()
        .await
        .with_context(|| format!("cannot reach Tessera at {target}: is it running?"))?;
    Ok(
        ProfileServiceClient::new(crate::client_tls::authorized(channel, tls)?)
            .max_decoding_message_size(256 * 1024 * 1024),
    )
}

/// Runs `tessera profiles`.
pub(crate) async fn run(args: ProfilesArgs) -> anyhow::Result<()> {
    match args.command {
        ProfilesCommand::Export { person, output } => {
            use pb::export_profile_request::Lookup;
            let lookup = lookup(&person)?.map_or_else(Lookup::Identifier, Lookup::ProfileId);
            let export = connect(&args.target, &args.tls)
                .await?
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
        ProfilesCommand::Delete { person, reason } => {
            use pb::delete_profile_request::Lookup;
            let lookup = lookup(&person)?.map_or_else(Lookup::Identifier, Lookup::ProfileId);
            let deleted = connect(&args.target, &args.tls)
                .await?
                .delete_profile(pb::DeleteProfileRequest {
                    lookup: Some(lookup),
                    reason,
                })
                .await
                .map_err(|s| anyhow::anyhow!("delete {person}: {}", s.message()))?
                .into_inner();
            println!(
                "tessera: deleted profile {} ({} profiles, {} identifiers, {} events)",
                deleted.profile_id,
                deleted.profile_ids.len(),
                deleted.identifiers_forgotten,
                deleted.events_deleted
            );
            Ok(())
        }
    }
}
