//! `tessera tokens` and `tessera audit`: access tokens and the audit log, in the database
//! directly (like `tessera migrate`), so the first admin token of a deployment can be made
//! before anything can call an API.

use anyhow::Context as _;
use tessera_server::access::{MIGRATIONS, SCHEMA, Scope, TokenInfo, TokenStore};
use tessera_store::Database;

use crate::ConfigArgs;
use crate::settings::Settings;

/// `tessera tokens`.
#[derive(Debug, clap::Args)]
pub(crate) struct TokensArgs {
    #[command(flatten)]
    pub(crate) config: ConfigArgs,
    #[command(subcommand)]
    command: TokensCommand,
}

#[derive(Debug, clap::Subcommand)]
enum TokensCommand {
    /// Create a token; its secret is printed once.
    Create {
        /// A unique name (who or what uses it), without spaces.
        #[arg(long)]
        name: String,
        /// A scope: profiles:read, profiles:write, admin or privacy; repeat for several.
        #[arg(long = "scope", value_name = "SCOPE", required = true)]
        scopes: Vec<Scope>,
    },
    /// List the tokens (never their secrets).
    List,
    /// Replace a token's secret (printed once); the old one stops working within
    /// auth.token_cache_ms on every replica.
    Rotate {
        /// The token's name or id.
        name: String,
    },
    /// Revoke a token for good; it stops working within auth.token_cache_ms on every replica.
    Revoke {
        /// The token's name or id.
        name: String,
    },
}

/// `tessera audit`.
#[derive(Debug, clap::Args)]
pub(crate) struct AuditArgs {
    #[command(flatten)]
    pub(crate) config: ConfigArgs,
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Debug, clap::Subcommand)]
enum AuditCommand {
    /// The newest records, newest first: time, token, action, outcome, request id.
    List {
        /// How many records.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

/// Checks that `url` names a database these commands can open.
pub(crate) fn require_database(url: &str) -> anyhow::Result<()> {
    let known = ["postgres://", "postgresql://", "sqlite:"];
    if known.iter().any(|scheme| url.starts_with(scheme)) {
        Ok(())
    } else {
        anyhow::bail!(
            "DATABASE_URL (or --database-url) must be a postgres:// URL, or for `tessera dev` \
             sqlite://<data dir>/auth.db"
        )
    }
}

/// Opens the token store, applying its migrations (idempotent) so bootstrapping needs no other
/// step.
async fn open(settings: &Settings) -> anyhow::Result<(Database, TokenStore)> {
    let db = Database::connect(&settings.database_url, SCHEMA, &settings.db)
        .await
        .context("connecting to the database")?;
    db.migrate(MIGRATIONS)
        .await
        .context("migrating the token tables")?;
    Ok((db.clone(), TokenStore::new(db)))
}

fn scopes_of(info: &TokenInfo) -> String {
    info.scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn time(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// Runs `tessera tokens`.
#[allow(clippy::print_stdout)]
pub(crate) async fn run_tokens(args: TokensArgs, settings: &Settings) -> anyhow::Result<()> {
    let (db, store) = open(settings).await?;
    let result = async {
        match args.command {
            TokensCommand::Create { name, scopes } => {
                let scopes = scopes.into_iter().collect();
                let (info, secret) = store.create(&name, &scopes).await?;
                println!("tessera: access token {}: {}", info.name, secret.0);
                println!(
                    "tessera: id {}, scopes {}. The secret is shown this once: send it as \
                     `authorization: Bearer <token>`",
                    info.id,
                    scopes_of(&info)
                );
            }
            TokensCommand::List => {
                for info in store.list().await? {
                    let state = match (info.revoked_at, info.rotated_at) {
                        (Some(at), _) => format!("revoked {}", time(at)),
                        (None, Some(at)) => format!("rotated {}", time(at)),
                        (None, None) => "active".to_owned(),
                    };
                    println!(
                        "{}\t{}\t{}\tcreated {}\t{state}",
                        info.name,
                        info.id,
                        scopes_of(&info),
                        time(info.created_at)
                    );
                }
            }
            TokensCommand::Rotate { name } => {
                let (info, secret) = store.rotate(&name).await?;
                println!("tessera: access token {}: {}", info.name, secret.0);
                println!(
                    "tessera: the old secret stops working within {} ms",
                    settings.auth.token_cache_ms
                );
            }
            TokensCommand::Revoke { name } => {
                let info = store.revoke(&name).await?;
                println!(
                    "tessera: revoked {} ({}); it stops working within {} ms",
                    info.name, info.id, settings.auth.token_cache_ms
                );
            }
        }
        Ok::<_, tessera_server::access::AccessError>(())
    }
    .await;
    db.close().await;
    result.map_err(|e| anyhow::anyhow!("{e}"))
}

/// Runs `tessera audit`.
#[allow(clippy::print_stdout)]
pub(crate) async fn run_audit(args: AuditArgs, settings: &Settings) -> anyhow::Result<()> {
    let (db, store) = open(settings).await?;
    let AuditCommand::List { limit } = args.command;
    let records = store.audit_log(limit).await;
    db.close().await;
    for r in records.map_err(|e| anyhow::anyhow!("{e}"))? {
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}",
            time(r.at),
            r.token_name,
            r.action,
            r.target.as_deref().unwrap_or("-"),
            r.outcome,
            r.request_id
        );
    }
    Ok(())
}
