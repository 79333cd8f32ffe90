//! `ProfilePipelineService.StreamPurchaseHistories`: the purchase history of every live profile
//! that bought something, for the scoring service's model fits. The store is scanned a page at
//! a time in profile id order, one page per message as the consumer asks for it, so neither
//! side holds the population in memory. Merged-away profiles are not live and deleted profiles
//! are gone from the store, so neither is streamed.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tessera_core::FieldViolation;
use tessera_proto::convert::from_timestamp;
use tessera_proto::profile::v1 as pb;
use tessera_proto::scoring::v1 as scoring;
use tonic::Status;

use crate::error::ProfileError;
use crate::service::Inner;

/// Profiles read per page when the request does not say.
const DEFAULT_PAGE: usize = 500;
/// The most profiles read per page.
const MAX_PAGE: usize = 1_000;
const SECONDS_PER_DAY: i64 = 86_400;

/// The messages of one stream.
pub(crate) type PurchaseStream = Pin<
    Box<dyn Stream<Item = Result<pb::StreamPurchaseHistoriesResponse, Status>> + Send + 'static>,
>;

/// A validated request.
#[derive(Debug)]
struct Scan {
    last_day: Option<i64>,
    after: Option<String>,
    page: usize,
}

fn scan(request: pb::StreamPurchaseHistoriesRequest) -> Result<Scan, ProfileError> {
    let pb::StreamPurchaseHistoriesRequest {
        as_of,
        after_profile_id,
        page_size,
    } = request;
    let mut violations = Vec::new();
    let last_day = match as_of.as_ref().map(from_timestamp) {
        None => None,
        Some(Some(t)) => Some(t.unix_timestamp().div_euclid(SECONDS_PER_DAY)),
        Some(None) => {
            violations.push(FieldViolation::new("as_of", "timestamp out of range"));
            None
        }
    };
    let page = match usize::try_from(page_size) {
        Ok(0) => DEFAULT_PAGE,
        Ok(n) if n <= MAX_PAGE => n,
        Ok(_) | Err(_) => {
            violations.push(FieldViolation::new(
                "page_size",
                format!("must be 0 (the default, {DEFAULT_PAGE}) to {MAX_PAGE}"),
            ));
            DEFAULT_PAGE
        }
    };
    if !violations.is_empty() {
        return Err(ProfileError::InvalidArgument(violations));
    }
    Ok(Scan {
        last_day,
        after: (!after_profile_id.is_empty()).then_some(after_profile_id),
        page,
    })
}

/// The stream `request` asks for, or why it is invalid.
pub(crate) fn stream(
    inner: Arc<Inner>,
    request: pb::StreamPurchaseHistoriesRequest,
) -> Result<PurchaseStream, ProfileError> {
    let Scan {
        last_day,
        after,
        page,
    } = scan(request)?;
    // The state between pages: the last profile id read, or `None` once the scan is over.
    let start = Some(after);
    Ok(Box::pin(futures::stream::unfold(start, move |cursor| {
        let inner = inner.clone();
        async move {
            let mut after = cursor?;
            loop {
                let profiles = match inner.store.scan(after.as_deref(), page).await {
                    Ok(profiles) => profiles,
                    Err(e) => return Some((Err(Status::from(e)), None)),
                };
                let last = profiles.last()?;
                after = Some(last.profile_id.clone());
                let more = profiles.len() >= page;
                let histories: Vec<pb::ProfilePurchaseHistory> = profiles
                    .iter()
                    .filter_map(|p| {
                        let bought =
                            crate::psychographic::purchases_until(&p.state.computed, last_day)?;
                        Some(pb::ProfilePurchaseHistory {
                            profile_id: p.profile_id.clone(),
                            purchases: Some(scoring::PurchaseHistory {
                                first_day: bought.first_day,
                                last_day: bought.last_day,
                                days: bought.days,
                                repeat_revenue: bought.repeat_revenue,
                                revenue: bought.revenue,
                            }),
                        })
                    })
                    .collect();
                let next = more.then_some(after.clone());
                if !histories.is_empty() {
                    let message = pb::StreamPurchaseHistoriesResponse {
                        profiles: histories,
                    };
                    return Some((Ok(message), next));
                }
                if !more {
                    return None;
                }
            }
        }
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_requests_name_their_fields() {
        let Err(ProfileError::InvalidArgument(violations)) =
            scan(pb::StreamPurchaseHistoriesRequest {
                as_of: Some(prost_types::Timestamp {
                    seconds: i64::MAX,
                    nanos: 0,
                }),
                after_profile_id: String::new(),
                page_size: 1_001,
            })
        else {
            panic!("expected invalid argument");
        };
        let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["as_of", "page_size"]);
        let ok = scan(pb::StreamPurchaseHistoriesRequest::default()).unwrap();
        assert_eq!((ok.page, ok.after, ok.last_day), (DEFAULT_PAGE, None, None));
    }
}
