//! Identifiers of people and accounts, and the candidates an event carries.

use serde::{Deserialize, Serialize};

/// The built-in identifier type of a known user.
pub const USER_ID: &str = "user_id";
/// The built-in identifier type of an anonymous visitor (cookie, install).
pub const ANONYMOUS_ID: &str = "anonymous_id";
/// The built-in identifier type of an email address.
pub const EMAIL: &str = "email";
/// The built-in identifier type of a phone number.
pub const PHONE: &str = "phone";
/// The built-in identifier type of a device or advertising id.
pub const DEVICE_ID: &str = "device_id";
/// The built-in identifier type of an account (B2B group).
pub const GROUP_ID: &str = "group_id";

/// An identifier: a type and a value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Identifier {
    /// The type, for example `user_id`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The value.
    pub value: String,
}

impl Identifier {
    /// An identifier of type `kind` with `value`.
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            value: value.into(),
        }
    }
}

/// Whether `kind` is a well-formed identifier type: 1 to 64 characters of lower-case ASCII
/// letters, digits and underscores, starting with a letter.
pub fn is_valid_type(kind: &str) -> bool {
    let bytes = kind.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 64
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
}
