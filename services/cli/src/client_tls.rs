//! TLS and the access token for the commands that call a running Tessera (`sources`,
//! `profiles`, `definitions`, `import`): an `https://` target is checked against a CA, and a client certificate is sent when
//! one is given. The options default to the `[tls]` environment variables a service's pod
//! already has, so these commands work from inside a pod without flags.

use std::path::PathBuf;

use anyhow::Context as _;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// TLS options of a command that calls a running Tessera.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct ClientTlsArgs {
    /// For an https:// --target: the CA certificate (PEM) the server's certificate is checked
    /// against.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "TESSERA__TLS__CA_FILE"
    )]
    ca_file: Option<PathBuf>,
    /// A client certificate (PEM) to present: needed only for Tessera's internal services.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "TESSERA__TLS__CERT_FILE",
        requires = "key_file"
    )]
    cert_file: Option<PathBuf>,
    /// The private key (PEM) of --cert-file.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "TESSERA__TLS__KEY_FILE",
        requires = "cert_file"
    )]
    key_file: Option<PathBuf>,
    /// The access token sent with every call (`authorization: Bearer`): the admin APIs need
    /// the scope admin, profile reads profiles:read, export and delete privacy.
    #[arg(
        long,
        global = true,
        value_name = "TOKEN",
        env = "TESSERA_ACCESS_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
}

/// A channel whose calls carry the access token, when one is given.
pub(crate) type Authorized = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub(crate) struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// `channel` with the access token of `args` on every call.
pub(crate) fn authorized(channel: Channel, args: &ClientTlsArgs) -> anyhow::Result<Authorized> {
    with_token(channel, args.token.as_deref())
}

/// `channel` with `token` (when given) on every call.
pub(crate) fn with_token(channel: Channel, token: Option<&str>) -> anyhow::Result<Authorized> {
    let value = match token.filter(|t| !t.is_empty()) {
        Some(token) => {
            let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
                .parse()
                .map_err(|_| anyhow::anyhow!("--token: not a valid token (printable ASCII)"))?;
            value.set_sensitive(true);
            Some(value)
        }
        None => None,
    };
    Ok(InterceptedService::new(channel, Bearer(value)))
}

/// An endpoint for `target` (the value of `--target`): over TLS when it is `https://`.
pub(crate) fn endpoint(target: &str, tls: &ClientTlsArgs) -> anyhow::Result<Endpoint> {
    let endpoint = Endpoint::from_shared(target.to_owned())
        .with_context(|| format!("invalid --target {target:?}"))?;
    if !target.starts_with("https://") {
        return Ok(endpoint);
    }
    let read = |flag: &str, path: &PathBuf| {
        std::fs::read(path).with_context(|| format!("{flag}: cannot read {}", path.display()))
    };
    let ca = tls.ca_file.as_ref().with_context(|| {
        format!("--target {target} is https://: give the server's CA with --ca-file FILE")
    })?;
    let mut config =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--ca-file", ca)?));
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        config = config.identity(Identity::from_pem(
            read("--cert-file", cert)?,
            read("--key-file", key)?,
        ));
    }
    endpoint
        .tls_config(config)
        .with_context(|| format!("TLS to {target}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_needs_a_ca_and_http_needs_nothing() {
        let none = ClientTlsArgs::default();
        assert!(endpoint("http://127.0.0.1:50051", &none).is_ok());
        let err = endpoint("https://tessera-ingestion:50051", &none)
            .unwrap_err()
            .to_string();
        assert!(err.contains("give the server's CA with --ca-file"), "{err}");
        let missing = ClientTlsArgs {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..ClientTlsArgs::default()
        };
        let err = format!(
            "{:#}",
            endpoint("https://tessera-ingestion:50051", &missing).unwrap_err()
        );
        assert!(
            err.starts_with("--ca-file: cannot read /nonexistent/ca.pem"),
            "{err}"
        );
    }
}
