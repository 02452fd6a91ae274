{% if auth.kind == "standard-webhooks" or (auth.kind == "hmac" and auth.base64) %}
import base64
{% endif %}
{% if auth.kind in ["hmac", "standard-webhooks"] %}
import hashlib
import hmac
{% endif %}
{% if auth.kind != "none" %}
import os
{% endif %}
import time
{% if requests %}

import requests
{% else %}
import json
import urllib.error
import urllib.request
{% endif %}

URL = "{{ url }}"
BODY = "{{ body }}"
IDEMPOTENCY_KEY = "{{ key }}"  # one key per order status change
{% if auth.kind != "none" %}
SECRET = os.environ["{{ secret_env }}"]
{% endif %}


{% if auth.kind == "none" %}
def auth_headers():
    return {}
{% elif auth.kind == "bearer" %}
def auth_headers():
    return {"Authorization": "Bearer " + SECRET}
{% elif auth.kind == "hmac" %}
{% set encode = "base64.b64encode(mac.digest()).decode()" if auth.base64 else "mac.hexdigest()" %}
def auth_headers():
{% if auth.ts_header %}
    ts = str(int(time.time()))
    mac = hmac.new(SECRET.encode(), (ts + "." + BODY).encode(), hashlib.sha256)
    return {"{{ auth.ts_header }}": ts, "{{ auth.header }}": "{{ auth.prefix }}" + {{ encode }}}
{% else %}
    mac = hmac.new(SECRET.encode(), BODY.encode(), hashlib.sha256)
    return {"{{ auth.header }}": "{{ auth.prefix }}" + {{ encode }}}
{% endif %}
{% elif auth.kind == "standard-webhooks" %}
def auth_headers():
    # Standard Webhooks: HMAC-SHA256 of "<id>.<timestamp>.<body>" keyed by the secret's
    # base64 part; the id is the idempotency key (the webhook-id header).
    ts = str(int(time.time()))
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    mac = hmac.new(key, (IDEMPOTENCY_KEY + "." + ts + "." + BODY).encode(), hashlib.sha256)
    return {"webhook-timestamp": ts, "webhook-signature": "v1," + base64.b64encode(mac.digest()).decode()}
{% endif %}


def send():
    for attempt in range(6):
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "{{ key_header }}": IDEMPOTENCY_KEY,
            **auth_headers(),
        }
{% if requests %}
        try:
            r = requests.post(URL, data=BODY.encode(), headers=headers, timeout=10)
        except requests.ConnectionError:
            time.sleep(min(2 ** attempt, 30))
            continue
        if r.status_code in (429, 503):
            time.sleep(int(r.headers.get("Retry-After", "1")))
            continue
        r.raise_for_status()  # any other non-2xx is an error
        return r.json()["hit_id"]
{% else %}
        request = urllib.request.Request(URL, data=BODY.encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return json.load(r)["hit_id"]
        except urllib.error.HTTPError as e:
            if e.code not in (429, 503):
                raise  # any other non-2xx is an error
            time.sleep(int(e.headers.get("Retry-After", "1")))
        except urllib.error.URLError:
            time.sleep(min(2 ** attempt, 30))
{% endif %}
    raise RuntimeError("gave up after 6 attempts")


print(send())
