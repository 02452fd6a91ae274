//! Turning a received request into the envelope that goes to Kafka. Pure: no I/O, no clock.

use bytes::Bytes;
use hookpipe_proto::Envelope;
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
    pub remote_addr: String,
    pub user_agent: &'a str,
    /// The stream's table and zone, as resolved from the catalogue at receipt.
    pub table: &'a str,
    pub timezone: &'a str,
}

/// The hit's id. With an idempotency key it is UUID v5 of (stream id, key), so a sender's retry
/// gets the same hit_id and the sink can drop the copy; the stream id as namespace keeps equal
/// keys of two streams apart. Without a key it is a fresh time-ordered UUID v7.
pub fn hit_id(stream_id: &Uuid, idempotency_key: Option<&str>) -> Uuid {
    match idempotency_key {
        Some(key) => Uuid::new_v5(stream_id, key.as_bytes()),
        None => Uuid::now_v7(),
    }
}

pub fn build(received: Received<'_>) -> Envelope {
    Envelope {
        hit_id: hit_id(&received.stream_id, received.idempotency_key).to_string(),
        received_at_ms: received.received_at_ms,
        stream_id: received.stream_id.to_string(),
        payload: received.payload,
        content_type: received.content_type.to_owned(),
        method: received.method.to_owned(),
        query: received.query.to_owned(),
        idempotency_key: received.idempotency_key.map(str::to_owned),
        remote_addr: received.remote_addr,
        user_agent: received.user_agent.to_owned(),
        replayed: false,
        table: received.table.to_owned(),
        timezone: received.timezone.to_owned(),
    }
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
            hit_id(&a, Some("order-N1-delivered")),
            hit_id(&a, Some("order-N1-delivered"))
        );
        assert_ne!(
            hit_id(&a, Some("order-N1-delivered")),
            hit_id(&b, Some("order-N1-delivered"))
        );
        assert_eq!(hit_id(&a, Some("k")).get_version_num(), 5);
    }

    #[test]
    fn without_a_key_every_hit_is_new_and_time_ordered() {
        let a: Uuid = STREAM.parse().unwrap();
        let (x, y) = (hit_id(&a, None), hit_id(&a, None));
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
            remote_addr: "127.0.0.1:5000".into(),
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
}
