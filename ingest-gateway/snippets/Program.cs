using System.Net;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;

const string Url = "{{ url }}";
const string Body = "{{ body }}";
const string IdempotencyKey = "{{ key }}"; // one key per order status change

using var client = new HttpClient { Timeout = TimeSpan.FromSeconds(10) };
Console.WriteLine(await Send(client));

{% if auth.kind == "none" %}
static void Auth(HttpRequestMessage request) { }
{% elif auth.kind == "bearer" %}
static void Auth(HttpRequestMessage request) =>
    request.Headers.TryAddWithoutValidation("Authorization", "Bearer " + Environment.GetEnvironmentVariable("{{ secret_env }}"));
{% elif auth.kind == "hmac" %}
static void Auth(HttpRequestMessage request)
{
{% if auth.ts_header %}
    var ts = DateTimeOffset.UtcNow.ToUnixTimeSeconds().ToString();
    request.Headers.TryAddWithoutValidation("{{ auth.ts_header }}", ts);
{% endif %}
    using var hmac = new HMACSHA256(Encoding.UTF8.GetBytes(Environment.GetEnvironmentVariable("{{ secret_env }}")!));
    var digest = hmac.ComputeHash(Encoding.UTF8.GetBytes({{ 'ts + "." + Body' if auth.ts_header else "Body" }}));
    request.Headers.TryAddWithoutValidation("{{ auth.header }}", "{{ auth.prefix }}" + {{ "Convert.ToBase64String(digest)" if auth.base64 else "Convert.ToHexString(digest).ToLowerInvariant()" }});
}
{% elif auth.kind == "standard-webhooks" %}
// Standard Webhooks: HMAC-SHA256 of "<id>.<timestamp>.<body>" keyed by the secret's base64
// part; the id is the idempotency key (the webhook-id header).
static void Auth(HttpRequestMessage request)
{
    var ts = DateTimeOffset.UtcNow.ToUnixTimeSeconds().ToString();
    var secret = Environment.GetEnvironmentVariable("{{ secret_env }}")!;
    using var hmac = new HMACSHA256(Convert.FromBase64String(secret.StartsWith("whsec_") ? secret[6..] : secret));
    var digest = hmac.ComputeHash(Encoding.UTF8.GetBytes(IdempotencyKey + "." + ts + "." + Body));
    request.Headers.TryAddWithoutValidation("webhook-timestamp", ts);
    request.Headers.TryAddWithoutValidation("webhook-signature", "v1," + Convert.ToBase64String(digest));
}
{% endif %}

static async Task<string> Send(HttpClient client)
{
    for (var attempt = 0; attempt < 6; attempt++)
    {
        using var request = new HttpRequestMessage(HttpMethod.Post, Url)
        {
            Content = new StringContent(Body, Encoding.UTF8, "application/x-www-form-urlencoded"),
        };
        request.Headers.Add("{{ key_header }}", IdempotencyKey);
        Auth(request);
        HttpResponseMessage response;
        try
        {
            response = await client.SendAsync(request);
        }
        catch (Exception e) when (e is HttpRequestException or TaskCanceledException)
        {
            await Task.Delay(TimeSpan.FromSeconds(Math.Min(1 << attempt, 30))); // connection error or timeout
            continue;
        }
        var answer = await response.Content.ReadAsStringAsync();
        if (response.StatusCode is HttpStatusCode.TooManyRequests or HttpStatusCode.ServiceUnavailable)
        {
            var wait = response.Headers.RetryAfter?.Delta ?? TimeSpan.FromSeconds(1);
            await Task.Delay(wait);
            continue;
        }
        if (!response.IsSuccessStatusCode)
        {
            throw new InvalidOperationException($"webhook refused: {(int)response.StatusCode} {answer}");
        }
        return JsonDocument.Parse(answer).RootElement.GetProperty("hit_id").GetString()!;
    }
    throw new InvalidOperationException("gave up after 6 attempts");
}
