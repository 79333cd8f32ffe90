//! A Python client generated from the .proto files with grpcio-tools drives `tessera dev`:
//! exactly what the README shows.

use std::path::Path;
use std::process::Command;

use tessera_tests::TesseraBuilder;

#[tokio::test(flavor = "multi_thread")]
async fn a_generated_python_client_ingests_and_reads_a_profile() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = root.join(".venv/bin/python");
    let python = std::env::var("TESSERA_PYTHON")
        .ok()
        .or_else(|| venv.exists().then(|| venv.display().to_string()));
    let python = python.unwrap_or_else(|| {
        panic!(
            "TESSERA_PYTHON is not set: it must name a Python with grpcio-tools installed; \
             scripts/test creates one in .venv"
        )
    });
    let stubs = tempfile::tempdir().unwrap();
    let generated = Command::new("bash")
        .arg(root.join("tests/python/gen_client.sh"))
        .arg(stubs.path())
        .env("PYTHON", &python)
        .current_dir(&root)
        .status()
        .expect("run gen_client.sh");
    assert!(generated.success(), "generating the Python client failed");

    let data = tempfile::tempdir().unwrap();
    let tessera = TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().to_str().unwrap()])
        .start()
        .await;
    let addr = tessera.grpc_addr.clone();
    let key = tessera.dev_write_key().to_owned();
    let token = tessera
        .access_token
        .clone()
        .expect("tessera dev prints its token");
    let script = root.join("tests/python/test_client.py");
    let stubs_path = stubs.path().to_owned();
    let status = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .arg(script)
            .arg("--stubs")
            .arg(&stubs_path)
            .arg("--write-key")
            .arg(&key)
            .arg("--access-token")
            .arg(&token)
            .arg(&addr)
            .status()
            .expect("run test_client.py")
    })
    .await
    .unwrap();
    assert!(status.success(), "the Python client test failed");
}
