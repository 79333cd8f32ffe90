//! `tessera dev-certs`: a development CA and one certificate per service, for mutual TLS between
//! services (`[tls]`) on a laptop, in CI or in a development cluster. Production should use
//! certificates from its own CA (cert-manager, a cloud CA...); these are for everything else.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The services that get a certificate unless `--service` names others.
const SERVICES: [&str; 4] = ["ingestion", "identity", "profile", "scoring"];

/// The namespaces of the kustomize overlays, whose Service names go into each certificate.
const NAMESPACES: [&str; 2] = ["tessera", "tessera-dev"];

#[derive(Debug, clap::Args)]
pub(crate) struct DevCertsArgs {
    /// The directory to write to (created when missing): ca.pem and ca-key.pem (the CA), and
    /// NAME.pem and NAME-key.pem per service.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// A service to make a certificate for; repeat for several [default: ingestion, identity,
    /// profile and scoring].
    #[arg(long = "service", value_name = "NAME")]
    services: Vec<String>,
    /// One more DNS name or IP address for every certificate; repeat for several. Each
    /// certificate already holds NAME, tessera-NAME, tessera-NAME.NAMESPACE(.svc(.cluster.local))
    /// for the namespaces tessera and tessera-dev, localhost, 127.0.0.1 and ::1.
    #[arg(long = "dns", value_name = "NAME")]
    dns: Vec<String>,
    /// How many days the certificates are valid.
    #[arg(long, value_name = "DAYS", default_value_t = 365)]
    days: u32,
    /// Replace files that exist (a new CA: every certificate signed by the old one stops
    /// working).
    #[arg(long)]
    force: bool,
}

/// The names a service's certificate is valid for.
fn names_of(service: &str, extra: &[String]) -> Vec<String> {
    let mut names = vec![service.to_owned(), format!("tessera-{service}")];
    for namespace in NAMESPACES {
        for suffix in ["", ".svc", ".svc.cluster.local"] {
            names.push(format!("tessera-{service}.{namespace}{suffix}"));
        }
    }
    names.extend(["localhost", "127.0.0.1", "::1"].map(str::to_owned));
    names.extend(extra.iter().cloned());
    names
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // A day of slack for clocks that lag.
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

/// The files `args` asks for, as (file name, contents, is a key).
fn make(args: &DevCertsArgs) -> anyhow::Result<Vec<(String, String, bool)>> {
    anyhow::ensure!(args.days > 0, "--days must be 1 or more");
    let services: Vec<&str> = if args.services.is_empty() {
        SERVICES.to_vec()
    } else {
        args.services.iter().map(String::as_str).collect()
    };
    for service in &services {
        anyhow::ensure!(
            !service.is_empty()
                && service
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "--service {service:?}: use lower-case letters, digits and '-' (it becomes a file \
             and a DNS name)"
        );
    }

    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "Tessera development CA");
    ca.distinguished_name
        .push(DnType::OrganizationName, "Tessera (development only)");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca, args.days);
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let ca_cert = ca.self_signed(&ca_key).context("signing the CA")?;
    let mut files = vec![
        ("ca.pem".to_owned(), ca_cert.pem(), false),
        ("ca-key.pem".to_owned(), ca_key.serialize_pem(), true),
    ];
    let issuer = Issuer::new(ca, ca_key);

    for service in services {
        let mut params = CertificateParams::new(names_of(service, &args.dns))
            .with_context(|| format!("the names of {service} (check --dns)"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("tessera-{service}"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Each service is the server of its callers and a client of its peers.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut params, args.days);
        let key = KeyPair::generate().with_context(|| format!("generating {service}'s key"))?;
        let cert = params
            .signed_by(&key, &issuer)
            .with_context(|| format!("signing {service}'s certificate"))?;
        files.push((format!("{service}.pem"), cert.pem(), false));
        files.push((format!("{service}-key.pem"), key.serialize_pem(), true));
    }
    Ok(files)
}

fn write(dir: &Path, name: &str, contents: &str, key: bool, force: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    let path = dir.join(name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    if key {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = key;
    let mut file = options.open(&path).with_context(|| {
        if path.exists() && !force {
            format!(
                "{} exists: choose another --out, or replace every file with --force",
                path.display()
            )
        } else {
            format!("writing {}", path.display())
        }
    })?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes the CA and the certificates into `args.out` and says what it wrote.
pub(crate) fn run(args: &DevCertsArgs) -> anyhow::Result<()> {
    let files = make(args)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    if !args.force {
        // All or nothing: no half-written set beside an older CA.
        for (name, _, _) in &files {
            let path = args.out.join(name);
            anyhow::ensure!(
                !path.exists(),
                "{} exists: choose another --out, or replace every file with --force",
                path.display()
            );
        }
    }
    for (name, contents, key) in &files {
        write(&args.out, name, contents, *key, args.force)?;
    }
    #[allow(clippy::print_stdout)]
    {
        let dir = args.out.display();
        println!("tessera: wrote a development CA and certificates to {dir}:");
        for (name, _, _) in &files {
            println!("  {name}");
        }
        println!(
            "tessera: each service reads tls.ca_file = {dir}/ca.pem, tls.cert_file = \
             {dir}/NAME.pem and tls.key_file = {dir}/NAME-key.pem; keep ca-key.pem to yourself"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(out: &Path, services: &[&str]) -> DevCertsArgs {
        DevCertsArgs {
            out: out.to_owned(),
            services: services.iter().map(|s| (*s).to_owned()).collect(),
            dns: vec!["tessera.example.com".to_owned()],
            days: 30,
            force: false,
        }
    }

    #[test]
    fn makes_certificates_each_service_can_use() {
        let dir = tempfile::tempdir().unwrap();
        run(&args(dir.path(), &[])).unwrap();
        let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
        for service in SERVICES {
            // The same check a service makes at start: parseable, the key matches, signed by
            // the CA and valid for client authentication.
            tessera_server::tls::Tls::from_pem(
                &read("ca.pem"),
                &read(&format!("{service}.pem")),
                &read(&format!("{service}-key.pem")),
            )
            .unwrap_or_else(|e| panic!("{service}: {e}"));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join("identity-key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "keys are private: {mode:o}");
        }

        // A second run into the same directory would replace the CA: refused without --force.
        let err = run(&args(dir.path(), &[])).unwrap_err().to_string();
        assert!(err.contains("exists") && err.contains("--force"), "{err}");
        let mut again = args(dir.path(), &["admin"]);
        again.force = true;
        run(&again).unwrap();
        assert!(dir.path().join("admin.pem").exists());
    }

    #[test]
    fn names_cover_the_kubernetes_services_and_loopback() {
        let names = names_of("identity", &["extra.example".to_owned()]);
        for name in [
            "identity",
            "tessera-identity",
            "tessera-identity.tessera.svc.cluster.local",
            "tessera-identity.tessera-dev.svc",
            "localhost",
            "127.0.0.1",
            "extra.example",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
        }
    }

    #[test]
    fn bad_service_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = run(&args(dir.path(), &["../x"])).unwrap_err().to_string();
        assert!(err.starts_with("--service \"../x\""), "{err}");
    }
}
