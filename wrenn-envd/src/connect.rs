//! Connect protocol v1 framing: codecs, envelopes, end-of-stream messages and
//! error codes. Transport-agnostic; used by the guest server and the host client.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;

/// Envelope flag: the payload is compressed (never produced here; refused on input).
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Envelope flag: this is the end-of-stream message.
pub const FLAG_END_STREAM: u8 = 0x02;
/// Largest envelope payload accepted (a stdin chunk or request is far smaller).
pub const MAX_ENVELOPE: usize = 16 * 1024 * 1024;

/// Connect error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    Canceled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl Code {
    /// HTTP status of a unary error response with this code.
    pub fn http_status(self) -> u16 {
        match self {
            Code::Canceled => 499,
            Code::Unknown | Code::Internal | Code::DataLoss => 500,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
            Code::DeadlineExceeded => 504,
            Code::NotFound => 404,
            Code::AlreadyExists | Code::Aborted => 409,
            Code::PermissionDenied => 403,
            Code::ResourceExhausted => 429,
            Code::Unimplemented => 501,
            Code::Unavailable => 503,
            Code::Unauthenticated => 401,
        }
    }

    /// Code for a non-Connect error body, from its HTTP status (what clients do).
    pub fn from_http_status(status: u16) -> Code {
        match status {
            400 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            409 => Code::AlreadyExists,
            413 | 429 => Code::ResourceExhausted,
            499 => Code::Canceled,
            501 | 505 => Code::Unimplemented,
            502 | 503 => Code::Unavailable,
            504 => Code::DeadlineExceeded,
            _ => Code::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Connect error: the JSON body of a unary error, or the `error` of an end-of-stream message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ConnectError {
    pub code: Code,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<serde_json::Value>,
}

impl ConnectError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ConnectError {
            code,
            message: message.into(),
            details: Vec::new(),
        }
    }
    pub fn invalid_argument(m: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(Code::NotFound, m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(Code::Internal, m)
    }
    pub fn unauthenticated(m: impl Into<String>) -> Self {
        Self::new(Code::Unauthenticated, m)
    }

    /// Maps an I/O error on `what` to the code clients branch on.
    pub fn from_io(err: &std::io::Error, what: &str) -> Self {
        use std::io::ErrorKind as K;
        let code = match err.kind() {
            K::NotFound => Code::NotFound,
            K::PermissionDenied => Code::PermissionDenied,
            K::AlreadyExists => Code::AlreadyExists,
            // A name longer than the filesystem takes (ENAMETOOLONG) is the caller's.
            K::InvalidInput
            | K::InvalidData
            | K::InvalidFilename
            | K::NotADirectory
            | K::IsADirectory => Code::InvalidArgument,
            K::StorageFull => Code::ResourceExhausted,
            _ => Code::Internal,
        };
        Self::new(code, format!("{what}: {err}"))
    }
}

/// The end-of-stream message of a streaming response.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EndStream {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ConnectError>,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub metadata: HashMap<String, Vec<String>>,
}

/// Message codec, chosen by the request's content type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Json,
    Proto,
}

/// Whether a content type names a unary or a streaming call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    Unary,
    Stream,
}

impl Codec {
    /// Parses a request `Content-Type` (parameters like `; charset=utf-8` ignored).
    pub fn from_content_type(ct: &str) -> Option<(Codec, CallKind)> {
        let base = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match base.as_str() {
            "application/json" => Some((Codec::Json, CallKind::Unary)),
            "application/proto" => Some((Codec::Proto, CallKind::Unary)),
            "application/connect+json" => Some((Codec::Json, CallKind::Stream)),
            "application/connect+proto" => Some((Codec::Proto, CallKind::Stream)),
            _ => None,
        }
    }

    pub fn content_type(self, kind: CallKind) -> &'static str {
        match (self, kind) {
            (Codec::Json, CallKind::Unary) => "application/json",
            (Codec::Proto, CallKind::Unary) => "application/proto",
            (Codec::Json, CallKind::Stream) => "application/connect+json",
            (Codec::Proto, CallKind::Stream) => "application/connect+proto",
        }
    }

    pub fn encode<M: prost::Message + Serialize>(self, msg: &M) -> Bytes {
        match self {
            Codec::Proto => Bytes::from(msg.encode_to_vec()),
            // Serializing these plain data types cannot fail (string keys, no foreign impls).
            Codec::Json => Bytes::from(serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec())),
        }
    }

    pub fn decode<M: prost::Message + DeserializeOwned + Default>(
        self,
        data: &[u8],
    ) -> Result<M, ConnectError> {
        match self {
            Codec::Proto => M::decode(data).map_err(|e| {
                ConnectError::invalid_argument(format!("invalid protobuf message: {e}"))
            }),
            Codec::Json if data.iter().all(u8::is_ascii_whitespace) => Ok(M::default()),
            Codec::Json => serde_json::from_slice(data)
                .map_err(|e| ConnectError::invalid_argument(format!("invalid JSON message: {e}"))),
        }
    }
}

/// One decoded envelope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub flags: u8,
    pub data: Bytes,
}

impl Envelope {
    pub fn is_end_stream(&self) -> bool {
        self.flags & FLAG_END_STREAM != 0
    }
}

/// Frames a payload: flag byte, big-endian u32 length, payload.
pub fn encode_envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + payload.len());
    out.put_u8(flags);
    // Payloads are produced here and bounded far below 4 GiB.
    out.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    out.put_slice(payload);
    out.freeze()
}

/// Frames an end-of-stream message (always JSON, whatever the codec).
pub fn encode_end_stream(error: Option<ConnectError>) -> Bytes {
    let end = EndStream {
        error,
        metadata: HashMap::new(),
    };
    let payload = serde_json::to_vec(&end).unwrap_or_else(|_| b"{}".to_vec());
    encode_envelope(FLAG_END_STREAM, &payload)
}

/// Incremental envelope parser for a body that arrives in arbitrary chunks.
#[derive(Debug, Default)]
pub struct EnvelopeDecoder {
    buf: BytesMut,
}

impl EnvelopeDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Returns the next complete envelope, `Ok(None)` if more bytes are needed.
    pub fn next_envelope(&mut self) -> Result<Option<Envelope>, ConnectError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if flags & !(FLAG_COMPRESSED | FLAG_END_STREAM) != 0 {
            return Err(ConnectError::invalid_argument(format!(
                "invalid envelope flags 0x{flags:02x}"
            )));
        }
        if flags & FLAG_COMPRESSED != 0 {
            return Err(ConnectError::new(
                Code::Unimplemented,
                "compressed envelopes are not supported",
            ));
        }
        if len > MAX_ENVELOPE {
            return Err(ConnectError::new(
                Code::ResourceExhausted,
                format!("envelope of {len} bytes exceeds the {MAX_ENVELOPE} byte limit"),
            ));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        let data = self.buf.split_to(len).freeze();
        Ok(Some(Envelope { flags, data }))
    }

    /// Call at end of body: leftover bytes mean a truncated envelope.
    pub fn finish(&self) -> Result<(), ConnectError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ConnectError::invalid_argument(format!(
                "truncated envelope: {} trailing bytes",
                self.buf.len()
            )))
        }
    }
}

/// Decodes a body that must hold exactly one message envelope (server-stream requests).
pub fn decode_single_envelope(body: &[u8]) -> Result<Bytes, ConnectError> {
    let mut dec = EnvelopeDecoder::new();
    dec.push(body);
    let env = dec
        .next_envelope()?
        .ok_or_else(|| ConnectError::invalid_argument("request body holds no complete envelope"))?;
    if env.is_end_stream() {
        return Err(ConnectError::invalid_argument(
            "request envelope is marked end-of-stream",
        ));
    }
    dec.finish()?;
    Ok(env.data)
}

/// Parses the `Connect-Timeout-Ms` header value (at most 10 digits).
pub fn parse_timeout_ms(v: &str) -> Result<u64, ConnectError> {
    let v = v.trim();
    if v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ConnectError::invalid_argument(format!(
            "invalid Connect-Timeout-Ms {v:?}"
        )));
    }
    v.parse()
        .map_err(|_| ConnectError::invalid_argument(format!("invalid Connect-Timeout-Ms {v:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filesystem_errors_the_caller_caused_are_invalid_arguments() {
        // What the kernel says of a path with a 300-byte component, and of others.
        let long = std::path::Path::new("/tmp").join("x".repeat(300));
        let err = std::fs::metadata(&long).expect_err("name too long");
        assert_eq!(err.raw_os_error(), Some(36), "ENAMETOOLONG");
        assert_eq!(ConnectError::from_io(&err, "p").code, Code::InvalidArgument);
        for (errno, code) in [
            (2, Code::NotFound),
            (13, Code::PermissionDenied),
            (17, Code::AlreadyExists),
            (20, Code::InvalidArgument),
            (21, Code::InvalidArgument),
            (28, Code::ResourceExhausted),
            (5, Code::Internal),
        ] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert_eq!(ConnectError::from_io(&e, "p").code, code, "errno {errno}");
        }
    }

    #[test]
    fn envelope_round_trip_across_chunk_boundaries() {
        let a = encode_envelope(0, b"{\"a\":1}");
        let b = encode_end_stream(None);
        let mut all = a.to_vec();
        all.extend_from_slice(&b);
        let mut dec = EnvelopeDecoder::new();
        let mut got = Vec::new();
        for byte in all {
            dec.push(&[byte]);
            while let Some(e) = dec.next_envelope().unwrap() {
                got.push(e);
            }
        }
        dec.finish().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(&got[0].data[..], b"{\"a\":1}");
        assert!(!got[0].is_end_stream());
        assert!(got[1].is_end_stream());
        assert_eq!(&got[1].data[..], b"{}");
    }

    #[test]
    fn end_stream_carries_error() {
        let e = encode_end_stream(Some(ConnectError::not_found(
            "process with pid 9 not found",
        )));
        assert_eq!(e[0], FLAG_END_STREAM);
        let v: serde_json::Value = serde_json::from_slice(&e[5..]).unwrap();
        assert_eq!(v["error"]["code"], "not_found");
        assert_eq!(v["error"]["message"], "process with pid 9 not found");
    }

    #[test]
    fn malformed_envelopes_are_invalid_argument() {
        assert_eq!(
            decode_single_envelope(b"").unwrap_err().code,
            Code::InvalidArgument
        );
        assert_eq!(
            decode_single_envelope(b"\x00\x00\x00").unwrap_err().code,
            Code::InvalidArgument
        );
        // Declares 10 bytes, carries 2.
        assert_eq!(
            decode_single_envelope(b"\x00\x00\x00\x00\x0a{}")
                .unwrap_err()
                .code,
            Code::InvalidArgument
        );
        // Unknown flag bits.
        assert_eq!(
            decode_single_envelope(b"\x80\x00\x00\x00\x00")
                .unwrap_err()
                .code,
            Code::InvalidArgument
        );
        // Compressed.
        assert_eq!(
            decode_single_envelope(b"\x01\x00\x00\x00\x00")
                .unwrap_err()
                .code,
            Code::Unimplemented
        );
        // Two messages where one is expected.
        let mut two = encode_envelope(0, b"{}").to_vec();
        two.extend_from_slice(&encode_envelope(0, b"{}"));
        assert_eq!(
            decode_single_envelope(&two).unwrap_err().code,
            Code::InvalidArgument
        );
        // Oversized length is refused before buffering.
        let mut dec = EnvelopeDecoder::new();
        dec.push(b"\x00\xff\xff\xff\xff");
        assert_eq!(
            dec.next_envelope().unwrap_err().code,
            Code::ResourceExhausted
        );
    }

    #[test]
    fn error_codes_map_to_http_status_and_back() {
        let all = [
            Code::Canceled,
            Code::Unknown,
            Code::InvalidArgument,
            Code::DeadlineExceeded,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unimplemented,
            Code::Internal,
            Code::Unavailable,
            Code::DataLoss,
            Code::Unauthenticated,
        ];
        for c in all {
            let json = serde_json::to_value(c).unwrap();
            assert_eq!(json, c.as_str());
            let status = c.http_status();
            assert!((400..600).contains(&status), "{c}");
        }
        assert_eq!(Code::NotFound.http_status(), 404);
        assert_eq!(Code::Unauthenticated.http_status(), 401);
        assert_eq!(Code::from_http_status(404), Code::NotFound);
        assert_eq!(Code::from_http_status(502), Code::Unavailable);
    }

    #[test]
    fn codec_selection_and_empty_json_body() {
        assert_eq!(
            Codec::from_content_type("application/connect+json; charset=utf-8"),
            Some((Codec::Json, CallKind::Stream))
        );
        assert_eq!(
            Codec::from_content_type("application/proto"),
            Some((Codec::Proto, CallKind::Unary))
        );
        assert_eq!(Codec::from_content_type("text/plain"), None);
        let m: crate::proto::process::ListRequest = Codec::Json.decode(b"").unwrap();
        assert_eq!(m, crate::proto::process::ListRequest {});
        let err = Codec::Json
            .decode::<crate::proto::filesystem::StatRequest>(b"{\"path\":")
            .unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument);
    }

    #[test]
    fn timeout_header() {
        assert_eq!(parse_timeout_ms("60000").unwrap(), 60000);
        assert!(parse_timeout_ms("12345678901").is_err());
        assert!(parse_timeout_ms("-1").is_err());
    }
}
