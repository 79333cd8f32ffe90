//! Rebuilds the crate when a migration is added, changed or removed: `sqlx::migrate!` embeds the
//! files of these directories, and cargo does not see files a macro reads by itself.

fn main() {
    // A directory is scanned as a whole, so a new file counts too.
    println!("cargo:rerun-if-changed=migrations/postgres");
    println!("cargo:rerun-if-changed=migrations/sqlite");
}
