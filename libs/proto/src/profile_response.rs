//! `tessera.profile.v1.GetProfileResponse` and `BatchProfileResult`, written by hand (the build
//! maps the messages here with `extern_path`) so the profile service can answer a cache hit with
//! the profile exactly as the cache holds it, already encoded, instead of decoding it into a
//! [`Profile`] only for tonic to encode it again. That decode and encode were about a quarter of
//! the service's CPU per cached read.
//!
//! On the wire nothing changes: the profile field is a length-delimited `Profile` either way, so
//! every client (generated from the same `.proto` in any language) decodes it as before, and
//! these types decode it into their `profile` field.

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

/// The tag of `profile` in both messages.
const PROFILE: u32 = 1;
/// The tag of `BatchProfileResult.error`.
const ERROR: u32 = 2;

/// Encodes a profile field: the encoded bytes when there are, else the profile.
fn encode_profile(profile: Option<&Profile>, encoded: Option<&Bytes>, buf: &mut impl BufMut) {
    if let Some(encoded) = encoded {
        // A message field is a length-delimited field holding the message's encoding.
        encoding::bytes::encode(PROFILE, encoded, buf);
    } else if let Some(profile) = profile {
        encoding::message::encode(PROFILE, profile, buf);
    }
}

/// The encoded length of what [`encode_profile`] writes.
fn profile_len(profile: Option<&Profile>, encoded: Option<&Bytes>) -> usize {
    if let Some(encoded) = encoded {
        encoding::bytes::encoded_len(PROFILE, encoded)
    } else {
        profile.map_or(0, |profile| {
            encoding::message::encoded_len(PROFILE, profile)
        })
    }
}

/// Decodes a profile field of `message` into `profile`.
fn merge_profile(
    message: &'static str,
    profile: &mut Option<Profile>,
    wire_type: WireType,
    buf: &mut impl Buf,
    ctx: DecodeContext,
) -> Result<(), prost::DecodeError> {
    let profile = profile.get_or_insert_with(Profile::default);
    encoding::message::merge(wire_type, profile, buf, ctx).map_err(|mut error| {
        error.push(message, "profile");
        error
    })
}

impl prost::Message for GetProfileResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_profile(self.profile.as_ref(), self.encoded_profile.as_ref(), buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        if tag == PROFILE {
            merge_profile("GetProfileResponse", &mut self.profile, wire_type, buf, ctx)
        } else {
            encoding::skip_field(wire_type, tag, buf, ctx)
        }
    }

    fn encoded_len(&self) -> usize {
        profile_len(self.profile.as_ref(), self.encoded_profile.as_ref())
    }

    fn clear(&mut self) {
        self.profile = None;
        self.encoded_profile = None;
    }
}

/// BatchProfileResult is the outcome of one lookup.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct BatchProfileResult {
    /// The profile; unset when the lookup found none.
    pub profile: Option<Profile>,
    /// Why the lookup found no profile (`not found`, or what is invalid about it); empty when
    /// it found one.
    pub error: String,
    /// The profile already encoded, sent in place of `profile` (never set by decoding).
    encoded_profile: Option<Bytes>,
}

impl BatchProfileResult {
    /// The result holding `profile`.
    pub fn found(profile: Profile) -> Self {
        Self {
            profile: Some(profile),
            ..Self::default()
        }
    }

    /// The result holding the profile `encoded`, which must be an encoded `Profile` message.
    pub fn found_encoded(encoded: Bytes) -> Self {
        Self {
            encoded_profile: Some(encoded),
            ..Self::default()
        }
    }

    /// The result of a lookup that found no profile, for `error`.
    pub fn failed(error: String) -> Self {
        Self {
            error,
            ..Self::default()
        }
    }
}

impl prost::Message for BatchProfileResult {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_profile(self.profile.as_ref(), self.encoded_profile.as_ref(), buf);
        if !self.error.is_empty() {
            encoding::string::encode(ERROR, &self.error, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        match tag {
            PROFILE => merge_profile("BatchProfileResult", &mut self.profile, wire_type, buf, ctx),
            ERROR => encoding::string::merge(wire_type, &mut self.error, buf, ctx).map_err(
                |mut error| {
                    error.push("BatchProfileResult", "error");
                    error
                },
            ),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let error = if self.error.is_empty() {
            0
        } else {
            encoding::string::encoded_len(ERROR, &self.error)
        };
        profile_len(self.profile.as_ref(), self.encoded_profile.as_ref()) + error
    }

    fn clear(&mut self) {
        self.profile = None;
        self.error.clear();
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

    /// What prost derives for the `.proto`'s message, to check the hand-written one against.
    #[derive(Clone, PartialEq, prost::Message)]
    struct DerivedBatchProfileResult {
        #[prost(message, optional, tag = "1")]
        profile: Option<Profile>,
        #[prost(string, tag = "2")]
        error: String,
    }

    #[test]
    fn batch_results_encode_as_the_proto_says_either_way() {
        let derived = |profile: Option<Profile>, error: &str| {
            DerivedBatchProfileResult {
                profile,
                error: error.into(),
            }
            .encode_to_vec()
        };
        let encoded = Bytes::from(profile().encode_to_vec());
        for (result, wire) in [
            (
                BatchProfileResult::found(profile()),
                derived(Some(profile()), ""),
            ),
            (
                BatchProfileResult::found_encoded(encoded),
                derived(Some(profile()), ""),
            ),
            (
                BatchProfileResult::failed("not found".into()),
                derived(None, "not found"),
            ),
        ] {
            assert_eq!(result.encode_to_vec(), wire);
            assert_eq!(result.encoded_len(), wire.len());
            let decoded = BatchProfileResult::decode(wire.as_slice()).unwrap();
            assert_eq!(
                decoded.profile,
                DerivedBatchProfileResult::decode(wire.as_slice())
                    .unwrap()
                    .profile
            );
            assert_eq!(
                decoded.error,
                DerivedBatchProfileResult::decode(wire.as_slice())
                    .unwrap()
                    .error
            );
        }
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
