
const URL = '{{ url }}';
const BODY = '{{ body }}';
const IDEMPOTENCY_KEY = '{{ key }}'; // one key per order status change

{% if auth.kind == "none" %}
function auth_headers(): array
{
    return [];
}
{% elif auth.kind == "bearer" %}
function auth_headers(): array
{
    return ['Authorization: Bearer ' . getenv('{{ secret_env }}')];
}
{% elif auth.kind == "hmac" %}
{% set message = "$ts . '.' . BODY" if auth.ts_header else "BODY" %}
function auth_headers(): array
{
{% if auth.ts_header %}
    $ts = (string) time();
{% endif %}
{% if auth.base64 %}
    $sig = base64_encode(hash_hmac('sha256', {{ message }}, getenv('{{ secret_env }}'), true));
{% else %}
    $sig = hash_hmac('sha256', {{ message }}, getenv('{{ secret_env }}'));
{% endif %}
    return [{% if auth.ts_header %}"{{ auth.ts_header }}: $ts", {% endif %}"{{ auth.header }}: {{ auth.prefix }}$sig"];
}
{% elif auth.kind == "standard-webhooks" %}
// Standard Webhooks: HMAC-SHA256 of "<id>.<timestamp>.<body>" keyed by the secret's base64
// part; the id is the idempotency key (the webhook-id header).
function auth_headers(): array
{
    $ts = (string) time();
    $key = base64_decode(preg_replace('/^whsec_/', '', getenv('{{ secret_env }}')));
    $sig = base64_encode(hash_hmac('sha256', IDEMPOTENCY_KEY . '.' . $ts . '.' . BODY, $key, true));
    return ["webhook-timestamp: $ts", "webhook-signature: v1,$sig"];
}
{% endif %}

function send(): string
{
    for ($attempt = 0; $attempt < 6; $attempt++) {
        $retryAfter = 1;
        $ch = curl_init(URL);
        curl_setopt_array($ch, [
            CURLOPT_POST => true,
            CURLOPT_POSTFIELDS => BODY,
            CURLOPT_RETURNTRANSFER => true,
            CURLOPT_TIMEOUT => 10,
            CURLOPT_HTTPHEADER => array_merge([
                'Content-Type: application/x-www-form-urlencoded',
                '{{ key_header }}: ' . IDEMPOTENCY_KEY,
            ], auth_headers()),
            CURLOPT_HEADERFUNCTION => function ($ch, $line) use (&$retryAfter) {
                if (stripos($line, 'Retry-After:') === 0) {
                    $retryAfter = (int) trim(substr($line, 12));
                }
                return strlen($line);
            },
        ]);
        $body = curl_exec($ch);
        $status = curl_getinfo($ch, CURLINFO_RESPONSE_CODE);
        curl_close($ch);
        if ($body === false) { // connection error or timeout
            sleep(min(2 ** $attempt, 30));
            continue;
        }
        if ($status === 429 || $status === 503) {
            sleep(max($retryAfter, 1));
            continue;
        }
        if ($status < 200 || $status >= 300) {
            throw new RuntimeException("webhook refused: $status $body");
        }
        return json_decode($body, true)['hit_id'];
    }
    throw new RuntimeException('gave up after 6 attempts');
}

echo send(), PHP_EOL;
