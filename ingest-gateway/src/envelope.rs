//! Turning a received request into the envelope that goes to Kafka. Pure: no I/O, no clock.
//!
//! The hot path uses [`encode`]: the envelope's wire bytes written straight from the request's
//! borrowed parts into one buffer of the exact size, instead of building an `Envelope` (a
//! `String` per field) and encoding that. [`build`] makes the same envelope as a message; a
//! test holds the two to the same bytes.

use std::io::Write as _;
use std::net::SocketAddr;

use bytes::{BufMut as _, Bytes};
use hookpipe_proto::Envelope;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use uuid::Uuid;

/// What the handler learned about one request.
pub struct Received<'a> {
    pub stream_id: Uuid,
    pub received_at_ms: i64,
    pub payload: Bytes,
    pub method: &'a str,
    pub content_type: &'a str,
    pub query: &'a str,
    pub idempotency_key: Option<&'a str>,
    /// The verified signature's text, for a signed request (see [`hit_id`]).
    pub signature: Option<&'a str>,
    pub remote_addr: Option<SocketAddr>,
    pub user_agent: &'a str,
    /// The stream's table and zone, as resolved from the catalogue at receipt.
    pub table: &'a str,
    pub timezone: &'a str,
}

/// The hit's id. With an idempotency key it is UUID v5 of (stream id, key), so a sender's retry
/// gets the same hit_id and the sink can drop the copy; the stream id as namespace keeps equal
/// keys of two streams apart. A signed request without a key takes UUID v5 of its signature
/// (in a namespace of its own under the stream's, so no key can name the same hit): a replay
/// of a captured request is the same hit, while any other request has another signature.
/// Otherwise it is a fresh time-ordered UUID v7.
pub fn hit_id(stream_id: &Uuid, idempotency_key: Option<&str>, signature: Option<&str>) -> Uuid {
    match (idempotency_key, signature) {
        (Some(key), _) => Uuid::new_v5(stream_id, key.as_bytes()),
        (None, Some(signature)) => {
            Uuid::new_v5(&Uuid::new_v5(stream_id, b"signature"), signature.as_bytes())
        }
        (None, None) => Uuid::now_v7(),
    }
}

/// The envelope of `received` as a message (for tools and tests; the gateway uses [`encode`]).
pub fn build(received: Received<'_>) -> Envelope {
    Envelope {
        hit_id: hit_id(
            &received.stream_id,
            received.idempotency_key,
            received.signature,
        )
        .to_string(),
        received_at_ms: received.received_at_ms,
        stream_id: received.stream_id.to_string(),
        payload: received.payload,
        content_type: received.content_type.to_owned(),
        method: received.method.to_owned(),
        query: received.query.to_owned(),
        idempotency_key: received.idempotency_key.map(str::to_owned),
        remote_addr: received
            .remote_addr
            .map(|a| a.to_string())
            .unwrap_or_default(),
        user_agent: received.user_agent.to_owned(),
        replayed: false,
        table: received.table.to_owned(),
        timezone: received.timezone.to_owned(),
    }
}

/// A peer address as text, formatted on the stack (at most 47 bytes: `[v6%scope]:port`).
struct AddrText {
    buf: [u8; 64],
    len: usize,
}

impl AddrText {
    fn new(addr: Option<SocketAddr>) -> Self {
        let mut text = Self {
            buf: [0; 64],
            len: 0,
        };
        match addr {
            // The common case by hand: `fmt` costs ~900 instructions per request here
            // (callgrind, docs/benchmarks.md), this a tenth of that.
            Some(SocketAddr::V4(v4)) => {
                for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                    if i > 0 {
                        text.push(b'.');
                    }
                    text.push_decimal(u16::from(octet));
                }
                text.push(b':');
                text.push_decimal(v4.port());
            }
            Some(addr) => {
                let mut cursor = std::io::Cursor::new(&mut text.buf[..]);
                if write!(cursor, "{addr}").is_ok() {
                    text.len = usize::try_from(cursor.position()).unwrap_or(0);
                }
            }
            None => {}
        }
        text
    }

    /// At most 21 bytes are pushed for an IPv4 address and port; the buffer holds 64.
    fn push(&mut self, byte: u8) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = byte;
            self.len += 1;
        }
    }

    fn push_decimal(&mut self, mut value: u16) {
        let mut digits = [0u8; 5];
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        for &digit in &digits[start..] {
            self.push(digit);
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Proto3 leaves fields at their default out; so does this.
fn bytes_field_len(tag: u32, value: &[u8]) -> usize {
    if value.is_empty() {
        0
    } else {
        key_len(tag) + encoded_len_varint(value.len() as u64) + value.len()
    }
}

fn put_bytes_field(tag: u32, value: &[u8], buf: &mut Vec<u8>) {
    if !value.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(value.len() as u64, buf);
        buf.put_slice(value);
    }
}

/// The envelope of `received`, encoded into one buffer of exactly its size, and its hit_id:
/// the same bytes as `build(received).encode_to_vec()`, without a `String` per field.
pub fn encode(received: &Received<'_>) -> (Uuid, Vec<u8>) {
    let id = hit_id(
        &received.stream_id,
        received.idempotency_key,
        received.signature,
    );
    let mut id_text = Uuid::encode_buffer();
    let id_text = id.hyphenated().encode_lower(&mut id_text).as_bytes();
    let mut stream_text = Uuid::encode_buffer();
    let stream_text = received
        .stream_id
        .hyphenated()
        .encode_lower(&mut stream_text)
        .as_bytes();
    let addr = AddrText::new(received.remote_addr);
    let received_at = received.received_at_ms as u64;
    // Field 8 is `optional`: present (even empty) when the sender gave a key.
    let key_field_len = received.idempotency_key.map_or(0, |k| {
        key_len(8) + encoded_len_varint(k.len() as u64) + k.len()
    });
    let len = bytes_field_len(1, id_text)
        + if received_at == 0 {
            0
        } else {
            key_len(2) + encoded_len_varint(received_at)
        }
        + bytes_field_len(3, stream_text)
        + bytes_field_len(4, &received.payload)
        + bytes_field_len(5, received.content_type.as_bytes())
        + bytes_field_len(6, received.method.as_bytes())
        + bytes_field_len(7, received.query.as_bytes())
        + key_field_len
        + bytes_field_len(9, addr.as_bytes())
        + bytes_field_len(10, received.user_agent.as_bytes())
        + bytes_field_len(12, received.table.as_bytes())
        + bytes_field_len(13, received.timezone.as_bytes());
    let mut buf = Vec::with_capacity(len);
    put_bytes_field(1, id_text, &mut buf);
    if received_at != 0 {
        encode_key(2, WireType::Varint, &mut buf);
        encode_varint(received_at, &mut buf);
    }
    put_bytes_field(3, stream_text, &mut buf);
    put_bytes_field(4, &received.payload, &mut buf);
    put_bytes_field(5, received.content_type.as_bytes(), &mut buf);
    put_bytes_field(6, received.method.as_bytes(), &mut buf);
    put_bytes_field(7, received.query.as_bytes(), &mut buf);
    if let Some(key) = received.idempotency_key {
        encode_key(8, WireType::LengthDelimited, &mut buf);
        encode_varint(key.len() as u64, &mut buf);
        buf.put_slice(key.as_bytes());
    }
    put_bytes_field(9, addr.as_bytes(), &mut buf);
    put_bytes_field(10, received.user_agent.as_bytes(), &mut buf);
    // Field 11 (`replayed`) is false for a received webhook: left out, as proto3 does.
    put_bytes_field(12, received.table.as_bytes(), &mut buf);
    put_bytes_field(13, received.timezone.as_bytes(), &mut buf);
    debug_assert_eq!(buf.len(), len);
    (id, buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookpipe_proto::Message;

    const STREAM: &str = "522ed95e-9f07-45f6-a0b7-28bf2d0315e5";

    #[test]
    fn idempotency_key_makes_hit_id_stable_per_stream() {
        let a: Uuid = STREAM.parse().unwrap();
        let b = Uuid::now_v7();
        assert_eq!(
            hit_id(&a, Some("order-N1-delivered"), None),
            hit_id(&a, Some("order-N1-delivered"), None)
        );
        assert_ne!(
            hit_id(&a, Some("order-N1-delivered"), None),
            hit_id(&b, Some("order-N1-delivered"), None)
        );
        assert_eq!(hit_id(&a, Some("k"), None).get_version_num(), 5);
    }

    #[test]
    fn a_signature_keys_a_keyless_hit_and_a_key_wins_over_it() {
        let a: Uuid = STREAM.parse().unwrap();
        let b = Uuid::now_v7();
        let sig = Some("t=1700000000,v1=5257a869e7");
        assert_eq!(hit_id(&a, None, sig), hit_id(&a, None, sig));
        assert_ne!(hit_id(&a, None, sig), hit_id(&b, None, sig));
        assert_ne!(
            hit_id(&a, None, sig),
            hit_id(&a, None, Some("t=1700000001,v1=00"))
        );
        // A sender's key equal to the signature's text is still another hit.
        assert_ne!(hit_id(&a, None, sig), hit_id(&a, sig, None));
        assert_eq!(hit_id(&a, Some("k"), sig), hit_id(&a, Some("k"), None));
    }

    #[test]
    fn without_a_key_every_hit_is_new_and_time_ordered() {
        let a: Uuid = STREAM.parse().unwrap();
        let (x, y) = (hit_id(&a, None, None), hit_id(&a, None, None));
        assert_ne!(x, y);
        assert_eq!(x.get_version_num(), 7);
    }

    #[test]
    fn the_envelope_keeps_the_payload_byte_for_byte_and_round_trips() {
        let body = Bytes::from_static(b"orderId=N1&status=delivered&total=120.13&userId=U1");
        let env = build(Received {
            stream_id: STREAM.parse().unwrap(),
            received_at_ms: 1_603_131_452_123,
            payload: body.clone(),
            method: "POST",
            content_type: "application/x-www-form-urlencoded",
            query: "",
            idempotency_key: None,
            signature: None,
            remote_addr: Some("127.0.0.1:5000".parse().unwrap()),
            user_agent: "curl/8",
            table: "local-project.offline_data.crm_orders",
            timezone: "+03:00",
        });
        let decoded = Envelope::decode(env.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, env);
        assert_eq!(decoded.payload, body);
        assert_eq!(decoded.stream_id, STREAM);
        assert_eq!(decoded.idempotency_key, None);
        assert_eq!(decoded.table, "local-project.offline_data.crm_orders");
        assert_eq!(decoded.timezone, "+03:00");
    }

    fn received<'a>(
        key: Option<&'a str>,
        addr: Option<SocketAddr>,
        query: &'a str,
    ) -> Received<'a> {
        Received {
            stream_id: STREAM.parse().unwrap(),
            received_at_ms: 1_603_131_452_123,
            payload: Bytes::from_static("orderId=N1&city=Zürich".as_bytes()),
            method: "POST",
            content_type: "application/x-www-form-urlencoded",
            query,
            idempotency_key: key,
            signature: None,
            remote_addr: addr,
            user_agent: "",
            table: "local-project.offline_data.crm_orders",
            timezone: "Europe/Berlin",
        }
    }

    #[test]
    fn encode_writes_the_bytes_prost_writes_for_the_built_envelope() {
        let v6: SocketAddr = "[fe80::1:2:3:4%4294967295]:65535".parse().unwrap();
        let cases = [
            received(None, Some("10.0.0.7:51234".parse().unwrap()), ""),
            received(None, Some("255.255.255.255:65535".parse().unwrap()), ""),
            received(None, Some("0.0.0.0:0".parse().unwrap()), ""),
            received(None, Some("[::1]:8".parse().unwrap()), ""),
            received(Some("order-N1-delivered"), Some(v6), "a=1&b=%20"),
            // An empty key is still a key (field 8 is `optional`), and no peer address.
            received(Some(""), None, "x"),
        ];
        for case in cases {
            let (id, bytes) = encode(&case);
            let decoded = Envelope::decode(bytes.as_slice()).unwrap();
            assert_eq!(decoded.hit_id, id.to_string());
            let keyless = case.idempotency_key.is_none();
            let mut built = build(case);
            if keyless {
                // A keyless hit_id is fresh each time; everything else must match.
                built.hit_id = id.to_string();
            }
            assert_eq!(bytes, built.encode_to_vec(), "{decoded:?}");
        }
    }
}
