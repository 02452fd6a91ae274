{% if auth.kind in ["hmac", "standard-webhooks"] %}
import { createHmac } from "node:crypto";

{% endif %}
const URL = "{{ url }}";
const BODY = "{{ body }}";
const IDEMPOTENCY_KEY = "{{ key }}"; // one key per order status change
{% if auth.kind != "none" %}
const SECRET = process.env.{{ secret_env }};
{% endif %}

{% if auth.kind == "none" %}
function authHeaders() {
  return {};
}
{% elif auth.kind == "bearer" %}
function authHeaders() {
  return { Authorization: `Bearer ${SECRET}` };
}
{% elif auth.kind == "hmac" %}
{% set enc = "base64" if auth.base64 else "hex" %}
function authHeaders() {
{% if auth.ts_header %}
  const ts = Math.floor(Date.now() / 1000).toString();
  const sig = createHmac("sha256", SECRET).update(`${ts}.${BODY}`).digest("{{ enc }}");
  return { "{{ auth.ts_header }}": ts, "{{ auth.header }}": "{{ auth.prefix }}" + sig };
{% else %}
  const sig = createHmac("sha256", SECRET).update(BODY).digest("{{ enc }}");
  return { "{{ auth.header }}": "{{ auth.prefix }}" + sig };
{% endif %}
}
{% elif auth.kind == "standard-webhooks" %}
// Standard Webhooks: HMAC-SHA256 of "<id>.<timestamp>.<body>" keyed by the secret's base64
// part; the id is the idempotency key (the webhook-id header).
function authHeaders() {
  const ts = Math.floor(Date.now() / 1000).toString();
  const key = Buffer.from(SECRET.replace(/^whsec_/, ""), "base64");
  const sig = createHmac("sha256", key).update(`${IDEMPOTENCY_KEY}.${ts}.${BODY}`).digest("base64");
  return { "webhook-timestamp": ts, "webhook-signature": `v1,${sig}` };
}
{% endif %}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function send() {
  for (let attempt = 0; attempt < 6; attempt++) {
    let response;
    try {
      response = await fetch(URL, {
        method: "POST",
        headers: {
          "Content-Type": "application/x-www-form-urlencoded",
          "{{ key_header }}": IDEMPOTENCY_KEY,
          ...authHeaders(),
        },
        body: BODY,
        signal: AbortSignal.timeout(10_000),
      });
    } catch (error) {
      await sleep(Math.min(2 ** attempt, 30) * 1000); // connection error or timeout
      continue;
    }
    if (response.status === 429 || response.status === 503) {
      await sleep(Number(response.headers.get("Retry-After") ?? "1") * 1000);
      continue;
    }
    if (!response.ok) {
      throw new Error(`webhook refused: ${response.status} ${await response.text()}`);
    }
    return (await response.json()).hit_id;
  }
  throw new Error("gave up after 6 attempts");
}

console.log(await send());
