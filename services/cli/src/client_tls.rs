//! TLS for the commands that call a running Tessera (`sources`, `profiles`, `definitions`,
//! `import`): an `https://` target is checked against a CA, and a client certificate is sent when
//! one is given. The options default to the `[tls]` environment variables a service's pod
//! already has, so these commands work from inside a pod without flags.

use std::path::PathBuf;

use anyhow::Context as _;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

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
