{% if auth.kind == "standard-webhooks" or (auth.kind == "hmac" and auth.base64) %}
require 'base64'
{% endif %}
{% if auth.kind in ["hmac", "standard-webhooks"] %}
require 'openssl'
{% endif %}
require 'json'
require 'net/http'

URL = URI('{{ url }}')
BODY = '{{ body }}'
IDEMPOTENCY_KEY = '{{ key }}' # one key per order status change

{% if auth.kind == "none" %}
def auth_headers
  {}
end
{% elif auth.kind == "bearer" %}
def auth_headers
  { 'Authorization' => "Bearer #{ENV.fetch('{{ secret_env }}')}" }
end
{% elif auth.kind == "hmac" %}
{% set message = '"#{ts}.#{BODY}"' if auth.ts_header else "BODY" %}
{% if auth.base64 %}
{% set sig = "Base64.strict_encode64(OpenSSL::HMAC.digest('SHA256', ENV.fetch('" ~ secret_env ~ "'), " ~ message ~ "))" %}
{% else %}
{% set sig = "OpenSSL::HMAC.hexdigest('SHA256', ENV.fetch('" ~ secret_env ~ "'), " ~ message ~ ")" %}
{% endif %}
def auth_headers
{% if auth.ts_header %}
  ts = Time.now.to_i.to_s
  { '{{ auth.ts_header }}' => ts, '{{ auth.header }}' => '{{ auth.prefix }}' + {{ sig }} }
{% else %}
  { '{{ auth.header }}' => '{{ auth.prefix }}' + {{ sig }} }
{% endif %}
end
{% elif auth.kind == "standard-webhooks" %}
# Standard Webhooks: HMAC-SHA256 of "<id>.<timestamp>.<body>" keyed by the secret's base64
# part; the id is the idempotency key (the webhook-id header).
def auth_headers
  ts = Time.now.to_i.to_s
  key = Base64.strict_decode64(ENV.fetch('{{ secret_env }}').delete_prefix('whsec_'))
  sig = Base64.strict_encode64(OpenSSL::HMAC.digest('SHA256', key, "#{IDEMPOTENCY_KEY}.#{ts}.#{BODY}"))
  { 'webhook-timestamp' => ts, 'webhook-signature' => "v1,#{sig}" }
end
{% endif %}

def send_webhook
  6.times do |attempt|
    headers = {
      'Content-Type' => 'application/x-www-form-urlencoded',
      '{{ key_header }}' => IDEMPOTENCY_KEY
    }.merge(auth_headers)
    begin
      response = Net::HTTP.start(URL.host, URL.port, use_ssl: URL.scheme == 'https',
                                 open_timeout: 10, read_timeout: 10) do |http|
        http.post(URL.request_uri, BODY, headers)
      end
    rescue SystemCallError, IOError, Timeout::Error
      sleep([2**attempt, 30].min) # connection error or timeout
      next
    end
    if %w[429 503].include?(response.code)
      sleep((response['Retry-After'] || '1').to_i)
      next
    end
    raise "webhook refused: #{response.code} #{response.body}" unless response.is_a?(Net::HTTPSuccess)

    return JSON.parse(response.body)['hit_id']
  end
  raise 'gave up after 6 attempts'
end

puts send_webhook
