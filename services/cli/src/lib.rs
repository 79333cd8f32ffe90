//! The tessera binary: every service, dev mode, migrations and the load tool
