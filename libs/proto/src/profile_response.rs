//! `tessera.profile.v1.GetProfileResponse`, written by hand (the build maps the message here
//! with `extern_path`) so the profile service can answer a cache hit with the profile exactly as
//! the cache holds it, already encoded, instead of decoding it into a [`Profile`] only for
//! tonic to encode it again. That decode and encode were about a quarter of the service's CPU
//! per cached read.
//!
//! On the wire nothing changes: field 1 is a length-delimited `Profile` either way, so every
//! client (generated from the same `.proto` in any language) decodes it as before, and this
//! type decodes it into [`GetProfileResponse::profile`].

use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};

use crate::profile::v1::Profile;

/// GetProfileResponse holds the profile.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct GetProfileResponse {
    /// The profile.
    pub profile: Option<Profile>,
    /// The profile already encoded, sent in place of `profile` (never set by decoding).
    encoded_profile: Option<Bytes>,
}

impl GetProfileResponse {
    /// The response holding `profile`.
    pub fn new(profile: Profile) -> Self {
        Self {
            profile: Some(profile),
            encoded_profile: None,
        }
    }

    /// The response holding the profile `encoded`, which must be an encoded `Profile` message:
    /// its bytes are sent as they are, and a client decodes them as the profile.
    pub fn encoded(encoded: Bytes) -> Self {
        Self {
            profile: None,
            encoded_profile: Some(encoded),
        }
    }
}

/// The tag of `profile`.
const PROFILE: u32 = 1;

impl prost::Message for GetProfileResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if let Some(encoded) = &self.encoded_profile {
            // A message field is a length-delimited field holding the message's encoding.
            encoding::bytes::encode(PROFILE, encoded, buf);
        } else if let Some(profile) = &self.profile {
            encoding::message::encode(PROFILE, profile, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        if tag == PROFILE {
            let profile = self.profile.get_or_insert_with(Profile::default);
            encoding::message::merge(wire_type, profile, buf, ctx).map_err(|mut error| {
                error.push("GetProfileResponse", "profile");
                error
            })
        } else {
            encoding::skip_field(wire_type, tag, buf, ctx)
        }
    }

    fn encoded_len(&self) -> usize {
        if let Some(encoded) = &self.encoded_profile {
            encoding::bytes::encoded_len(PROFILE, encoded)
        } else {
            self.profile.as_ref().map_or(0, |profile| {
                encoding::message::encoded_len(PROFILE, profile)
            })
        }
    }

    fn clear(&mut self) {
        self.profile = None;
        self.encoded_profile = None;
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    fn profile() -> Profile {
        Profile {
            profile_id: "p1".into(),
            version: 7,
            merged_profile_ids: vec!["p0".into()],
            ..Profile::default()
        }
    }

    #[test]
    fn an_encoded_profile_is_sent_as_the_profile_field() {
        let encoded = Bytes::from(profile().encode_to_vec());
        let response = GetProfileResponse::encoded(encoded);
        let wire = response.encode_to_vec();
        assert_eq!(wire, GetProfileResponse::new(profile()).encode_to_vec());
        assert_eq!(response.encoded_len(), wire.len());
        let decoded = GetProfileResponse::decode(wire.as_slice()).unwrap();
        assert_eq!(decoded, GetProfileResponse::new(profile()));
    }

    #[test]
    fn an_empty_response_encodes_to_nothing_and_unknown_fields_are_skipped() {
        assert!(GetProfileResponse::default().encode_to_vec().is_empty());
        assert_eq!(GetProfileResponse::default().encoded_len(), 0);
        // Field 2 (a string, unknown here), then the profile.
        let mut wire = vec![0x12, 0x02, b'h', b'i'];
        wire.extend(GetProfileResponse::new(profile()).encode_to_vec());
        let decoded = GetProfileResponse::decode(wire.as_slice()).unwrap();
        assert_eq!(decoded.profile, Some(profile()));
    }

    #[test]
    fn a_truncated_profile_is_a_decode_error() {
        let wire = GetProfileResponse::new(profile()).encode_to_vec();
        let error = GetProfileResponse::decode(&wire[..wire.len() - 1]).unwrap_err();
        assert!(
            error.to_string().contains("GetProfileResponse.profile"),
            "{error}"
        );
    }
}
