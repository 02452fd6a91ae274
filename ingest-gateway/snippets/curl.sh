set -euo pipefail

url='{{ url }}'
body='{{ body }}'
key='{{ key }}'  # one key per order status change
{% if auth.kind == "none" %}
auth=()
{% elif auth.kind == "bearer" %}
secret="${{ '{' }}{{ secret_env }}:?set {{ secret_env }}}"
auth=(-H "Authorization: Bearer $secret")
{% elif auth.kind == "hmac" %}
secret="${{ '{' }}{{ secret_env }}:?set {{ secret_env }}}"
{% if auth.ts_header %}
ts=$(date +%s)  # the signature covers it; valid for the stream's tolerance, retries included
{% set message = "$ts.$body" %}
{% else %}
{% set message = "$body" %}
{% endif %}
{% if auth.base64 %}
sig=$(printf '%s' "{{ message }}" | openssl dgst -sha256 -hmac "$secret" -binary | base64)
{% else %}
sig=$(printf '%s' "{{ message }}" | openssl dgst -sha256 -hmac "$secret" -hex | sed 's/^.* //')
{% endif %}
auth=({% if auth.ts_header %}-H "{{ auth.ts_header }}: $ts" {% endif %}-H "{{ auth.header }}: {{ auth.prefix }}$sig")
{% elif auth.kind == "standard-webhooks" %}
secret="${{ '{' }}{{ secret_env }}:?set {{ secret_env }}}"  # whsec_<base64>
hexkey=$(printf '%s' "${secret#whsec_}" | base64 -d | od -An -v -tx1 | tr -d ' \n')
ts=$(date +%s)  # signed with the message id; valid for the stream's tolerance, retries included
sig=$(printf '%s' "$key.$ts.$body" | openssl dgst -sha256 -mac HMAC -macopt "hexkey:$hexkey" -binary | base64)
auth=(-H "webhook-timestamp: $ts" -H "webhook-signature: v1,$sig")
{% endif %}

# --retry covers 429/503 (waiting Retry-After), 408 and timeouts; --fail-with-body makes
# any other non-2xx answer an error.
curl --silent --show-error --fail-with-body \
  --retry 5 --retry-connrefused --retry-max-time 120 \
  -H 'Content-Type: application/x-www-form-urlencoded' \
  -H "{{ key_header }}: $key" \
  "${auth[@]}" \
  --data-binary "$body" \
  "$url"
echo
