//! Credentials at the HTTP edge.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};

/// The user name of an `Authorization: Basic base64(user:password)` header value, whatever the
/// password (Segment clients send a write key or an access token as the user and no password).
/// `None` when the value is not Basic auth, does not decode, or has an empty user.
pub fn basic_auth_user(header: &str) -> Option<String> {
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let encoded = encoded.trim();
    // Some clients omit the padding.
    let decoded = STANDARD
        .decode(encoded)
        .or_else(|_| STANDARD_NO_PAD.decode(encoded))
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let user = text.split_once(':').map_or(text.as_str(), |(user, _)| user);
    (!user.is_empty()).then(|| user.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_yields_the_user() {
        let header = format!("Basic {}", STANDARD.encode("tsk_abc:"));
        assert_eq!(basic_auth_user(&header).as_deref(), Some("tsk_abc"));
        let unpadded = format!("basic {}", STANDARD_NO_PAD.encode("tsk_ab:"));
        assert_eq!(basic_auth_user(&unpadded).as_deref(), Some("tsk_ab"));
        let no_colon = format!("Basic {}", STANDARD.encode("tsk_abc"));
        assert_eq!(basic_auth_user(&no_colon).as_deref(), Some("tsk_abc"));
        assert_eq!(basic_auth_user("Bearer tsk_abc"), None);
        assert_eq!(basic_auth_user("Basic !!!"), None);
        let empty_user = format!("Basic {}", STANDARD.encode(":secret"));
        assert_eq!(basic_auth_user(&empty_user), None);
    }
}
