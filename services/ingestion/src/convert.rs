//! Conversions between protobuf and domain types at the ingestion edge.

use tessera_core::{Event, FieldViolation};
use tessera_proto::common::v1 as pb;

/// The domain event of a protobuf event, checked against the Segment Spec rules; every
/// violation otherwise. `received_at` is ignored: the server sets it.
pub(crate) fn accepted_event(event: pb::Event) -> Result<Event, Vec<FieldViolation>> {
    let mut event = tessera_proto::convert::event_from_pb(pb::Event {
        received_at: None,
        ..event
    })?;
    let violations = event.validate();
    if !violations.is_empty() {
        return Err(violations);
    }
    event.received_at = None;
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_and_spec_rules_are_both_checked() {
        let err = accepted_event(pb::Event::default()).unwrap_err();
        assert_eq!(err[0].field, "type");
        let no_user = pb::Event {
            r#type: pb::EventType::Identify.into(),
            ..pb::Event::default()
        };
        assert_eq!(accepted_event(no_user).unwrap_err()[0].field, "user_id");
    }
}
