//! Reading a request body within bounds: the raw bytes, then their gzip decoding, each stopped
//! as soon as it passes the limit, so neither a large upload nor a gzip bomb can grow memory.

use std::io::Read;

use axum::body::Body;
use futures::StreamExt;
use http::HeaderMap;

/// The largest request body, before and after decompression: Segment's 500 KB per batch.
pub(crate) const MAX_BODY_BYTES: usize = 500 * 1024;

/// Why a body could not be read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// The raw body is larger than the limit.
    TooLarge,
    /// The decompressed body is larger than the limit.
    InflatesTooLarge,
    /// A `Content-Encoding` other than gzip (or identity).
    UnsupportedEncoding(String),
    /// The gzip stream is corrupt.
    BadGzip,
    /// The connection failed while the body was being read.
    Broken,
}

/// Reads the raw body, at most `limit` bytes. Past the limit the rest is drained and dropped
/// (the server edge bounds that), so the client still reads a clean 413 instead of a reset.
pub(crate) async fn read(body: Body, limit: usize) -> Result<Vec<u8>, BodyError> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut over = false;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) if is_length_limit(&e) => return Err(BodyError::TooLarge),
            Err(_) => return Err(BodyError::Broken),
        };
        if over || buf.len() + chunk.len() > limit {
            over = true;
            buf = Vec::new();
            continue;
        }
        buf.extend_from_slice(&chunk);
    }
    if over {
        Err(BodyError::TooLarge)
    } else {
        Ok(buf)
    }
}

/// Whether a body error is the server edge's own size limit.
fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Decodes the body as its `Content-Encoding` says, whatever the `Content-Type` (one library
/// sends gzip as `application/x-www-form-urlencoded`), stopping past `limit` decoded bytes.
pub(crate) fn decode(
    headers: &HeaderMap,
    raw: Vec<u8>,
    limit: usize,
) -> Result<Vec<u8>, BodyError> {
    let mut gzip = false;
    for value in headers.get_all(http::header::CONTENT_ENCODING) {
        let value = value.to_str().unwrap_or("");
        for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            match coding.to_ascii_lowercase().as_str() {
                "identity" => {}
                "gzip" | "x-gzip" if !gzip => gzip = true,
                _ => return Err(BodyError::UnsupportedEncoding(coding.to_owned())),
            }
        }
    }
    if !gzip {
        return Ok(raw);
    }
    let decoder = flate2::read::MultiGzDecoder::new(raw.as_slice());
    let mut out = Vec::with_capacity(raw.len().saturating_mul(4).min(limit + 1));
    let bound = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    decoder
        .take(bound)
        .read_to_end(&mut out)
        .map_err(|_| BodyError::BadGzip)?;
    if out.len() > limit {
        return Err(BodyError::InflatesTooLarge);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn encoded(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::CONTENT_ENCODING, value.parse().unwrap());
        h
    }

    #[test]
    fn gzip_is_decoded_within_the_limit() {
        let body = br#"{"batch":[]}"#;
        assert_eq!(decode(&encoded("gzip"), gzip(body), 100).unwrap(), body);
        assert_eq!(decode(&encoded("x-gzip"), gzip(body), 100).unwrap(), body);
        assert_eq!(decode(&HeaderMap::new(), body.to_vec(), 100).unwrap(), body);
        assert_eq!(
            decode(&encoded("identity"), body.to_vec(), 100).unwrap(),
            body
        );
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_limit() {
        // 50 MB of zeros compress to about 50 KB; decoding stops after limit + 1 bytes.
        let bomb = gzip(&vec![0u8; 50 * 1024 * 1024]);
        assert!(bomb.len() < 100 * 1024);
        assert_eq!(
            decode(&encoded("gzip"), bomb, MAX_BODY_BYTES),
            Err(BodyError::InflatesTooLarge)
        );
    }

    #[test]
    fn corrupt_or_unknown_encodings_are_refused() {
        assert_eq!(
            decode(&encoded("gzip"), b"not gzip".to_vec(), 100),
            Err(BodyError::BadGzip)
        );
        assert_eq!(
            decode(&encoded("br"), b"x".to_vec(), 100),
            Err(BodyError::UnsupportedEncoding("br".into()))
        );
        assert!(matches!(
            decode(&encoded("gzip, gzip"), gzip(&gzip(b"{}")), 100),
            Err(BodyError::UnsupportedEncoding(_))
        ));
    }

    #[tokio::test]
    async fn raw_bodies_past_the_limit_are_refused() {
        assert_eq!(read(Body::from("12345"), 5).await.unwrap(), b"12345");
        assert_eq!(
            read(Body::from("123456"), 5).await,
            Err(BodyError::TooLarge)
        );
    }
}
