//! `tessera definitions`: computed traits and audiences declared at run time, through the
//! DefinitionService API of a running Tessera. A definition file has the config's form
//! (`[[computed_traits]]` and `[[audiences]]` tables in TOML, or the same keys in JSON).

// The CLI's output is its interface.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use tessera_profile::audience::Audience;
use tessera_profile::computed::ComputedTrait;
use tessera_profile::definitions::{audience_definition, computed_trait_definition};
use tessera_proto::profile::v1 as pb;
use tessera_proto::profile::v1::definition_service_client::DefinitionServiceClient;

/// Options of `tessera definitions`.
#[derive(Debug, clap::Args)]
pub(crate) struct DefinitionsArgs {
    /// The gRPC address of the profile service (or of `tessera dev`).
    #[arg(long, global = true, default_value = "http://127.0.0.1:50051")]
    target: String,
    #[command(flatten)]
    tls: crate::client_tls::ClientTlsArgs,
    #[command(subcommand)]
    command: DefinitionsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum DefinitionsCommand {
    /// List the computed traits and audiences in effect (config's and the API's), with their
    /// source and version.
    List,
    /// Print one definition as JSON (its config form, version, source and times).
    Get {
        /// `computed-trait` or `audience`.
        kind: KindArg,
        /// Its name.
        name: String,
    },
    /// Declare every computed trait and audience of a file (TOML, or JSON when it ends in
    /// `.json`: `computed_traits` and `audiences` lists of the config's form).
    Create {
        /// The definition file.
        file: PathBuf,
    },
    /// Replace stored definitions with those of a file (each at the version read just before,
    /// or at `--expected-version` for a file of one definition).
    Update {
        /// The definition file.
        file: PathBuf,
        /// The version the change applies to (refused when it moved).
        #[arg(long)]
        expected_version: Option<i64>,
    },
    /// Delete a stored definition (its values and memberships go with the recompute).
    Delete {
        /// `computed-trait` or `audience`.
        kind: KindArg,
        /// Its name.
        name: String,
        /// Only at this version (refused when it moved).
        #[arg(long)]
        expected_version: Option<i64>,
    },
}

/// The kind of a definition on the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum KindArg {
    /// A computed trait.
    ComputedTrait,
    /// An audience.
    Audience,
}

/// A definition file: the config's `[[profile.computed_traits]]` and `[[profile.audiences]]`
/// without the `profile.` prefix.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DefinitionFile {
    #[serde(default)]
    computed_traits: Vec<ComputedTrait>,
    #[serde(default)]
    audiences: Vec<Audience>,
}

/// Reads and parses a definition file (JSON by its extension, else TOML).
fn read_file(path: &Path) -> anyhow::Result<DefinitionFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: DefinitionFile = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display()))?
    } else {
        toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))?
    };
    if file.computed_traits.is_empty() && file.audiences.is_empty() {
        anyhow::bail!(
            "{} declares nothing: add [[computed_traits]] or [[audiences]]",
            path.display()
        );
    }
    Ok(file)
}

/// A client of the definitions API at `target`.
async fn connect(
    target: &str,
    tls: &crate::client_tls::ClientTlsArgs,
) -> anyhow::Result<DefinitionServiceClient<crate::client_tls::Authorized>> {
    let channel = crate::client_tls::endpoint(target, tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .connect()
        .await
        .with_context(|| format!("cannot reach Tessera at {target}: is it running?"))?;
    Ok(DefinitionServiceClient::new(crate::client_tls::authorized(
        channel, tls,
    )?))
}

/// A failed call as an error naming what was asked, the code and, for invalid arguments, each
/// field.
fn failed(what: &str, status: &tonic::Status) -> anyhow::Error {
    use tonic_types::StatusExt as _;
    let mut message = format!("{what}: {} ({:?})", status.message(), status.code());
    if let Some(bad) = status.get_error_details().bad_request() {
        for v in &bad.field_violations {
            message.push_str(&format!("\n  {}: {}", v.field, v.description));
        }
    }
    anyhow::anyhow!(message)
}

fn source(source: i32) -> &'static str {
    match pb::DefinitionSource::try_from(source) {
        Ok(pb::DefinitionSource::Config) => "config",
        Ok(pb::DefinitionSource::Api) => "api",
        Ok(pb::DefinitionSource::Unspecified) | Err(_) => "?",
    }
}

/// Runs `tessera definitions`.
pub(crate) async fn run(args: DefinitionsArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.target, &args.tls).await?;
    match args.command {
        DefinitionsCommand::List => {
            let traits = client
                .list_computed_traits(pb::ListComputedTraitsRequest {})
                .await
                .map_err(|s| failed("list computed traits", &s))?
                .into_inner();
            let audiences = client
                .list_audience_definitions(pb::ListAudienceDefinitionsRequest {})
                .await
                .map_err(|s| failed("list audiences", &s))?
                .into_inner();
            println!("revision {}", traits.revision.max(audiences.revision));
            for t in &traits.computed_traits {
                let version = t.version;
                println!(
                    "computed-trait  {:<32} {:<6} v{version}",
                    t.name,
                    source(t.source)
                );
            }
            for a in &audiences.audiences {
                let version = a.version;
                println!(
                    "audience        {:<32} {:<6} v{version}",
                    a.name,
                    source(a.source)
                );
            }
        }
        DefinitionsCommand::Get { kind, name } => {
            let json = match kind {
                KindArg::ComputedTrait => {
                    let t = client
                        .get_computed_trait(pb::GetComputedTraitRequest { name: name.clone() })
                        .await
                        .map_err(|s| failed(&format!("get computed trait {name}"), &s))?
                        .into_inner()
                        .computed_trait
                        .context("an empty answer")?;
                    let kind = pb::ComputedTraitKind::try_from(t.kind)
                        .map_or("?".to_owned(), |k| k.as_str_name().to_owned());
                    serde_json::json!({
                        "name": t.name,
                        "kind": kind,
                        "events": t.events,
                        "types": t.types,
                        "property": t.property,
                        "window_seconds": t.window_seconds,
                        "version": t.version,
                        "source": source(t.source),
                    })
                }
                KindArg::Audience => {
                    let a = client
                        .get_audience(pb::GetAudienceRequest { name: name.clone() })
                        .await
                        .map_err(|s| failed(&format!("get audience {name}"), &s))?
                        .into_inner()
                        .audience
                        .context("an empty answer")?;
                    let condition: serde_json::Value =
                        serde_json::from_str(&a.condition_json).unwrap_or_default();
                    serde_json::json!({
                        "name": a.name,
                        "condition": condition,
                        "version": a.version,
                        "source": source(a.source),
                    })
                }
            };
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        DefinitionsCommand::Create { file } => {
            let file = read_file(&file)?;
            for computed in file.computed_traits {
                let name = computed.name.clone();
                let created = client
                    .create_computed_trait(pb::CreateComputedTraitRequest {
                        computed_trait: Some(computed_trait_definition(computed)),
                    })
                    .await
                    .map_err(|s| failed(&format!("create computed trait {name}"), &s))?
                    .into_inner();
                println!(
                    "tessera: created computed trait {name} (revision {})",
                    created.revision
                );
            }
            for audience in file.audiences {
                let name = audience.name.clone();
                let created = client
                    .create_audience(pb::CreateAudienceRequest {
                        audience: Some(audience_definition(audience)),
                    })
                    .await
                    .map_err(|s| failed(&format!("create audience {name}"), &s))?
                    .into_inner();
                println!(
                    "tessera: created audience {name} (revision {})",
                    created.revision
                );
            }
        }
        DefinitionsCommand::Update {
            file,
            expected_version,
        } => {
            let file = read_file(&file)?;
            if expected_version.is_some() && file.computed_traits.len() + file.audiences.len() > 1 {
                anyhow::bail!("--expected-version needs a file of one definition");
            }
            for computed in file.computed_traits {
                let name = computed.name.clone();
                let expected_version = match expected_version {
                    Some(v) => v,
                    None => client
                        .get_computed_trait(pb::GetComputedTraitRequest { name: name.clone() })
                        .await
                        .map_err(|s| failed(&format!("get computed trait {name}"), &s))?
                        .into_inner()
                        .computed_trait
                        .map_or(0, |t| t.version),
                };
                let updated = client
                    .update_computed_trait(pb::UpdateComputedTraitRequest {
                        computed_trait: Some(computed_trait_definition(computed)),
                        expected_version,
                    })
                    .await
                    .map_err(|s| failed(&format!("update computed trait {name}"), &s))?
                    .into_inner();
                let version = updated.computed_trait.map_or(0, |t| t.version);
                println!("tessera: updated computed trait {name} to version {version}");
            }
            for audience in file.audiences {
                let name = audience.name.clone();
                let expected_version = match expected_version {
                    Some(v) => v,
                    None => client
                        .get_audience(pb::GetAudienceRequest { name: name.clone() })
                        .await
                        .map_err(|s| failed(&format!("get audience {name}"), &s))?
                        .into_inner()
                        .audience
                        .map_or(0, |a| a.version),
                };
                let updated = client
                    .update_audience(pb::UpdateAudienceRequest {
                        audience: Some(audience_definition(audience)),
                        expected_version,
                    })
                    .await
                    .map_err(|s| failed(&format!("update audience {name}"), &s))?
                    .into_inner();
                let version = updated.audience.map_or(0, |a| a.version);
                println!("tessera: updated audience {name} to version {version}");
            }
        }
        DefinitionsCommand::Delete {
            kind,
            name,
            expected_version,
        } => {
            let expected_version = expected_version.unwrap_or(0);
            let (label, revision) = match kind {
                KindArg::ComputedTrait => (
                    "computed trait",
                    client
                        .delete_computed_trait(pb::DeleteComputedTraitRequest {
                            name: name.clone(),
                            expected_version,
                        })
                        .await
                        .map_err(|s| failed(&format!("delete computed trait {name}"), &s))?
                        .into_inner()
                        .revision,
                ),
                KindArg::Audience => (
                    "audience",
                    client
                        .delete_audience(pb::DeleteAudienceRequest {
                            name: name.clone(),
                            expected_version,
                        })
                        .await
                        .map_err(|s| failed(&format!("delete audience {name}"), &s))?
                        .into_inner()
                        .revision,
                ),
            };
            println!("tessera: deleted {label} {name} (revision {revision})");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definition_files_take_the_config_form_in_toml_and_json() {
        let dir = tempfile::tempdir().unwrap();
        let toml_path = dir.path().join("defs.toml");
        std::fs::write(
            &toml_path,
            r#"
[[computed_traits]]
name = "orders"
kind = "count"
events = ["Order Completed"]

[[audiences]]
name = "pros"
condition = { trait = { name = "plan", op = "eq", value = "pro" } }
"#,
        )
        .unwrap();
        let file = read_file(&toml_path).unwrap();
        assert_eq!(file.computed_traits[0].name, "orders");
        assert_eq!(file.audiences[0].name, "pros");
        let request = audience_definition(file.audiences[0].clone());
        assert!(request.condition_json.contains("\"plan\""));

        let json_path = dir.path().join("defs.json");
        std::fs::write(
            &json_path,
            r#"{"computed_traits": [{"name": "spent", "kind": "sum", "property": "total"}]}"#,
        )
        .unwrap();
        let file = read_file(&json_path).unwrap();
        assert_eq!(
            computed_trait_definition(file.computed_traits[0].clone()).kind,
            pb::ComputedTraitKind::Sum as i32
        );

        std::fs::write(&json_path, r#"{"computed_trait": []}"#).unwrap();
        let unknown = read_file(&json_path).unwrap_err();
        assert!(
            format!("{unknown:#}").contains("computed_trait"),
            "{unknown:#}"
        );
        std::fs::write(&json_path, "{}").unwrap();
        assert!(read_file(&json_path).is_err(), "an empty file is refused");
    }
}
