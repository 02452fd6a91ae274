import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;

public class SendWebhook {
    static final String URL = "{{ url }}";
    static final String BODY = "{{ body }}";
    static final String IDEMPOTENCY_KEY = "{{ key }}"; // one key per order status change

{% if auth.kind == "none" %}
    static void auth(HttpRequest.Builder request) {}
{% elif auth.kind == "bearer" %}
    static void auth(HttpRequest.Builder request) {
        request.header("Authorization", "Bearer " + System.getenv("{{ secret_env }}"));
    }
{% elif auth.kind == "hmac" %}
    static void auth(HttpRequest.Builder request) throws Exception {
{% if auth.ts_header %}
        String ts = Long.toString(System.currentTimeMillis() / 1000);
        request.header("{{ auth.ts_header }}", ts);
{% endif %}
        Mac mac = Mac.getInstance("HmacSHA256");
        mac.init(new SecretKeySpec(System.getenv("{{ secret_env }}").getBytes(StandardCharsets.UTF_8), "HmacSHA256"));
        byte[] digest = mac.doFinal(({{ 'ts + "." + BODY' if auth.ts_header else "BODY" }}).getBytes(StandardCharsets.UTF_8));
        request.header("{{ auth.header }}", "{{ auth.prefix }}" + {{ "java.util.Base64.getEncoder().encodeToString(digest)" if auth.base64 else "java.util.HexFormat.of().formatHex(digest)" }});
    }
{% elif auth.kind == "standard-webhooks" %}
    // Standard Webhooks: HMAC-SHA256 of "<id>.<timestamp>.<body>" keyed by the secret's base64
    // part; the id is the idempotency key (the webhook-id header).
    static void auth(HttpRequest.Builder request) throws Exception {
        String ts = Long.toString(System.currentTimeMillis() / 1000);
        byte[] key = java.util.Base64.getDecoder().decode(System.getenv("{{ secret_env }}").replaceFirst("^whsec_", ""));
        Mac mac = Mac.getInstance("HmacSHA256");
        mac.init(new SecretKeySpec(key, "HmacSHA256"));
        byte[] digest = mac.doFinal((IDEMPOTENCY_KEY + "." + ts + "." + BODY).getBytes(StandardCharsets.UTF_8));
        request.header("webhook-timestamp", ts);
        request.header("webhook-signature", "v1," + java.util.Base64.getEncoder().encodeToString(digest));
    }
{% endif %}

    static String send(HttpClient client) throws Exception {
        for (int attempt = 0; attempt < 6; attempt++) {
            HttpRequest.Builder request = HttpRequest.newBuilder(URI.create(URL))
                .timeout(Duration.ofSeconds(10))
                .header("Content-Type", "application/x-www-form-urlencoded")
                .header("{{ key_header }}", IDEMPOTENCY_KEY)
                .POST(HttpRequest.BodyPublishers.ofString(BODY));
            auth(request);
            HttpResponse<String> response;
            try {
                response = client.send(request.build(), HttpResponse.BodyHandlers.ofString());
            } catch (java.io.IOException e) { // connection error or timeout
                Thread.sleep(Math.min(1L << attempt, 30) * 1000);
                continue;
            }
            int status = response.statusCode();
            if (status == 429 || status == 503) {
                long wait = response.headers().firstValue("Retry-After").map(Long::parseLong).orElse(1L);
                Thread.sleep(Math.max(wait, 1) * 1000);
                continue;
            }
            if (status < 200 || status > 299) {
                throw new IllegalStateException("webhook refused: " + status + " " + response.body());
            }
            return response.body().replaceAll(".*\"hit_id\"\\s*:\\s*\"([^\"]+)\".*", "$1");
        }
        throw new IllegalStateException("gave up after 6 attempts");
    }

    public static void main(String[] args) throws Exception {
        HttpClient client = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(10)).build();
        System.out.println(send(client));
    }
}
