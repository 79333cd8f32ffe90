//! Write keys: generation, hashing, display prefixes and the HTTP Basic form clients send them
//! in.
//!
//! A key is `tsk_` followed by 32 random bytes in URL-safe base64 (43 characters), drawn from
//! the thread-local CSPRNG. Only its SHA-256 is stored, and keys are looked up by that hash, so
//! no comparison of secret bytes happens at all (nothing to leak through timing). A plain,
//! unsalted hash is enough: with 256 bits of entropy a key cannot be guessed from its hash;
//! slow password hashes exist for low-entropy secrets.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

/// The prefix of generated keys, so a leaked key is recognisable (secret scanners) and a key is
/// not mistaken for another token.
pub(crate) const PREFIX: &str = "tsk_";

/// How many characters of a key are kept for display: the prefix and 6 more, 36 bits of the
/// key, enough to tell keys apart and far too few to use one.
const DISPLAY_CHARS: usize = PREFIX.len() + 6;

/// The longest key accepted; longer input is refused before hashing.
pub(crate) const MAX_LEN: usize = 256;

/// The SHA-256 of a write key: what is stored and looked up.
pub(crate) type KeyHash = [u8; 32];

/// A write key in the clear: exists only between its creation and the response that shows it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct WriteKey(String);

impl std::fmt::Debug for WriteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WriteKey({}…)", self.display_prefix())
    }
}

impl WriteKey {
    /// A new random key.
    pub(crate) fn generate() -> Self {
        let mut bytes = [0u8; 32];
        // ThreadRng is a CSPRNG (ChaCha12) seeded and periodically reseeded from the OS.
        rand::rng().fill_bytes(&mut bytes);
        Self(format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// A key chosen by the operator (`tessera dev --write-key`), when it is acceptable: 8 to
    /// 256 printable ASCII characters without spaces or `:` (the Basic auth separator).
    pub(crate) fn chosen(key: &str) -> Option<Self> {
        let ok = (8..=MAX_LEN).contains(&key.len())
            && key.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        ok.then(|| Self(key.to_owned()))
    }

    /// The key in the clear, to show once.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    /// The key's hash.
    pub(crate) fn hash(&self) -> KeyHash {
        hash(&self.0)
    }

    /// The first characters of the key, safe to store and show.
    pub(crate) fn display_prefix(&self) -> String {
        self.0.chars().take(DISPLAY_CHARS).collect()
    }
}

/// The SHA-256 of `key`.
pub(crate) fn hash(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// The write key in an `Authorization: Basic base64(key:)` header value (the user name; the
/// password is ignored, Segment clients send it empty). `None` when the value is not Basic
/// auth, does not decode, or has an empty user.
pub(crate) fn from_basic_auth(header: &str) -> Option<String> {
    tessera_server::basic_auth_user(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_random_prefixed_and_url_safe() {
        let a = WriteKey::generate();
        let b = WriteKey::generate();
        assert_ne!(a, b);
        assert!(a.expose().starts_with(PREFIX));
        assert_eq!(a.expose().len(), PREFIX.len() + 43);
        assert!(
            a.expose()[PREFIX.len()..]
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        assert_eq!(a.display_prefix().len(), 10);
        assert!(a.expose().starts_with(&a.display_prefix()));
        assert!(
            !format!("{a:?}").contains(a.expose()),
            "Debug hides the key"
        );
    }

    #[test]
    fn hashes_are_sha256() {
        // echo -n abc | sha256sum
        assert_eq!(
            hash("abc")[..4],
            [0xba, 0x78, 0x16, 0xbf],
            "SHA-256 of abc starts ba7816bf"
        );
        let key = WriteKey::chosen("my-dev-key").unwrap();
        assert_eq!(key.hash(), hash("my-dev-key"));
    }

    #[test]
    fn chosen_keys_are_checked() {
        assert!(WriteKey::chosen("abcdefgh").is_some());
        assert!(WriteKey::chosen("short").is_none());
        assert!(WriteKey::chosen("has:colon").is_none());
        assert!(WriteKey::chosen("has space").is_none());
        assert!(WriteKey::chosen(&"k".repeat(MAX_LEN + 1)).is_none());
    }
}
