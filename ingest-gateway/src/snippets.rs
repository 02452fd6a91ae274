//! Ready-to-paste integration snippets: the code a stream's sender adds to its backend to send
//! the order-status example, with the stream's auth (token header or HMAC signature computed
//! in the snippet), an idempotency key, a 2xx check, and retries on 429/503 after Retry-After
//! (and on connection errors). Secrets are never in a snippet: it reads `WEBHOOK_SECRET` from
//! its environment. Nor is the destination table: snippets go to other companies' developers.
//!
//! Every snippet but C# is executed against a real gateway by `tests/tests/snippets.rs`.

use std::fmt;
use std::str::FromStr;

use hookpipe_common::catalogue::{AuthSpec, SignatureEncoding, Stream};

/// The example every snippet sends: an order status change, as form data.
pub const EXAMPLE_BODY: &str = "orderId=N1&status=delivered&total=120.13&userId=U1";
/// Its idempotency key: one key per order status change, so the same change sent twice (a
/// retry, a resend) is one row.
pub const EXAMPLE_KEY: &str = "N1-delivered";
/// Where a snippet reads the stream's token or signing secret from.
pub const SECRET_ENV: &str = "WEBHOOK_SECRET";

/// A snippet's language.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    Curl,
    Python,
    PythonStdlib,
    Node,
    Php,
    Ruby,
    Go,
    Java,
    CSharp,
}

impl Lang {
    pub const ALL: [Lang; 9] = [
        Lang::Curl,
        Lang::Python,
        Lang::PythonStdlib,
        Lang::Node,
        Lang::Php,
        Lang::Ruby,
        Lang::Go,
        Lang::Java,
        Lang::CSharp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Lang::Curl => "curl",
            Lang::Python => "python",
            Lang::PythonStdlib => "python-stdlib",
            Lang::Node => "node",
            Lang::Php => "php",
            Lang::Ruby => "ruby",
            Lang::Go => "go",
            Lang::Java => "java",
            Lang::CSharp => "csharp",
        }
    }

    /// What the snippet is, for its first comment line.
    fn label(self) -> &'static str {
        match self {
            Lang::Curl => "shell (curl)",
            Lang::Python => "Python (requests)",
            Lang::PythonStdlib => "Python (standard library only)",
            Lang::Node => "Node.js 18+ (fetch)",
            Lang::Php => "PHP (curl extension)",
            Lang::Ruby => "Ruby (net/http)",
            Lang::Go => "Go (net/http)",
            Lang::Java => "Java 11+ (java.net.http)",
            Lang::CSharp => "C# (.NET 6+, HttpClient)",
        }
    }

    /// A file name the snippet can be saved and run as.
    pub fn file_name(self) -> &'static str {
        match self {
            Lang::Curl => "send_webhook.sh",
            Lang::Python | Lang::PythonStdlib => "send_webhook.py",
            Lang::Node => "send_webhook.mjs",
            Lang::Php => "send_webhook.php",
            Lang::Ruby => "send_webhook.rb",
            Lang::Go => "main.go",
            Lang::Java => "SendWebhook.java",
            Lang::CSharp => "Program.cs",
        }
    }
}

impl fmt::Display for Lang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Lang {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        let found = match s.as_str() {
            "sh" | "shell" | "bash" => Some(Lang::Curl),
            "python-requests" | "py" => Some(Lang::Python),
            "nodejs" | "javascript" | "js" => Some(Lang::Node),
            "golang" => Some(Lang::Go),
            "c#" | "cs" | "dotnet" => Some(Lang::CSharp),
            _ => Lang::ALL.into_iter().find(|l| l.name() == s),
        };
        found.ok_or_else(|| {
            let names: Vec<&str> = Lang::ALL.iter().map(|l| l.name()).collect();
            format!("unknown language `{s}`: use one of {}", names.join(", "))
        })
    }
}

/// How the snippet authenticates, from the stream's rule (secrets themselves never appear).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Auth {
    None,
    Bearer,
    Hmac {
        header: String,
        prefix: String,
        base64: bool,
        timestamp_header: Option<String>,
    },
    /// A provider's own scheme that the provider signs (its library or its servers).
    Provider(&'static str),
}

impl Auth {
    fn of(stream: &Stream) -> Self {
        match &stream.auth {
            None => Auth::None,
            Some(AuthSpec::Bearer { .. }) => Auth::Bearer,
            Some(AuthSpec::HmacSha256(h)) => Auth::Hmac {
                header: h.header.clone(),
                prefix: h.prefix.clone(),
                base64: h.encoding == SignatureEncoding::Base64,
                timestamp_header: h.timestamp_header.clone(),
            },
            // The providers' body-only schemes are our HMAC with their header and encoding, so
            // a test sender can stand in for the provider.
            Some(AuthSpec::GitHub { .. }) => Auth::Hmac {
                header: "X-Hub-Signature-256".into(),
                prefix: "sha256=".into(),
                base64: false,
                timestamp_header: None,
            },
            Some(AuthSpec::Shopify { .. }) => Auth::Hmac {
                header: "X-Shopify-Hmac-Sha256".into(),
                prefix: String::new(),
                base64: true,
                timestamp_header: None,
            },
            Some(spec @ (AuthSpec::Stripe { .. } | AuthSpec::StandardWebhooks { .. })) => {
                Auth::Provider(spec.kind())
            }
        }
    }

    /// One line saying what the sender needs, for the snippet's header comment.
    fn note(&self) -> String {
        match self {
            Auth::None | Auth::Provider(_) => {
                "The stream has no auth: its URL is the secret; keep it private.".into()
            }
            Auth::Bearer => format!("Auth: bearer token, read from ${SECRET_ENV}."),
            Auth::Hmac {
                header,
                timestamp_header: Some(ts),
                ..
            } => format!(
                "Auth: HMAC-SHA256 of \"<timestamp>.<body>\" in {header}, Unix time in {ts}; signing secret from ${SECRET_ENV}."
            ),
            Auth::Hmac { header, .. } => format!(
                "Auth: HMAC-SHA256 of the body in {header}; signing secret from ${SECRET_ENV}."
            ),
        }
    }
}

/// The snippet for `stream` in `lang`, sending to `base_url` (scheme, host and port of the
/// gateway as senders reach it, e.g. `https://hooks.example.com`).
pub fn snippet(lang: Lang, stream: &Stream, base_url: &str) -> String {
    let url = format!("{}/ds/{}", base_url.trim_end_matches('/'), stream.id);
    let auth = Auth::of(stream);
    if let Auth::Provider(kind) = auth {
        return provider_note(lang, kind, &url);
    }
    let header = format!(
        "Sends one webhook to data stream {}, {}.\n{}\nRetries on 429/503 after Retry-After and on connection errors, with the same Idempotency-Key,\nso a retry is never a second row. Exits non-zero unless the gateway answered 2xx.",
        stream.id,
        lang.label(),
        auth.note()
    );
    let code = match lang {
        Lang::Curl => curl(&url, &auth),
        Lang::Python => python(&url, &auth, true),
        Lang::PythonStdlib => python(&url, &auth, false),
        Lang::Node => node(&url, &auth),
        Lang::Php => php(&url, &auth),
        Lang::Ruby => ruby(&url, &auth),
        Lang::Go => go(&url, &auth),
        Lang::Java => java(&url, &auth),
        Lang::CSharp => csharp(&url, &auth),
    };
    let marker = match lang {
        Lang::Curl | Lang::Python | Lang::PythonStdlib | Lang::Ruby => "# ",
        _ => "// ",
    };
    let comment: String = header.lines().map(|l| format!("{marker}{l}\n")).collect();
    match lang {
        // A shebang must stay first.
        Lang::Curl => format!("#!/usr/bin/env bash\n{comment}{code}"),
        Lang::Php => format!("<?php\n{comment}{code}"),
        _ => format!("{comment}{code}"),
    }
}

/// A stream signed by a provider: what to set where, as a comment in the language.
fn provider_note(lang: Lang, kind: &str, url: &str) -> String {
    let text = format!(
        "Data stream endpoint: {url}\nThis stream checks {kind} signatures: the sender signs with its own library or\nservers (see the README's section on {kind}); give it the URL above and the signing secret."
    );
    let marker = match lang {
        Lang::Curl | Lang::Python | Lang::PythonStdlib | Lang::Ruby => "# ",
        _ => "// ",
    };
    text.lines().map(|l| format!("{marker}{l}\n")).collect()
}

fn curl(url: &str, auth: &Auth) -> String {
    let sign = |message: &str, base64: bool| {
        if base64 {
            format!(
                "$(printf '%s' \"{message}\" | openssl dgst -sha256 -hmac \"$secret\" -binary | base64)"
            )
        } else {
            format!(
                "$(printf '%s' \"{message}\" | openssl dgst -sha256 -hmac \"$secret\" -hex | sed 's/^.* //')"
            )
        }
    };
    let auth_lines = match auth {
        Auth::None | Auth::Provider(_) => "auth=()\n".to_owned(),
        Auth::Bearer => format!(
            "secret=\"${{{SECRET_ENV}:?set {SECRET_ENV}}}\"\nauth=(-H \"Authorization: Bearer $secret\")\n"
        ),
        Auth::Hmac {
            header,
            prefix,
            base64,
            timestamp_header: Some(ts),
        } => format!(
            "secret=\"${{{SECRET_ENV}:?set {SECRET_ENV}}}\"\nts=$(date +%s)  # the signature covers it; valid for the stream's tolerance, retries included\nsig={}\nauth=(-H \"{ts}: $ts\" -H \"{header}: {prefix}$sig\")\n",
            sign("$ts.$body", *base64)
        ),
        Auth::Hmac {
            header,
            prefix,
            base64,
            timestamp_header: None,
        } => format!(
            "secret=\"${{{SECRET_ENV}:?set {SECRET_ENV}}}\"\nsig={}\nauth=(-H \"{header}: {prefix}$sig\")\n",
            sign("$body", *base64)
        ),
    };
    format!(
        r#"set -euo pipefail

url='{url}'
body='{EXAMPLE_BODY}'
key='{EXAMPLE_KEY}'  # one key per order status change
{auth_lines}
# --retry covers 429/503 (waiting Retry-After), 408 and timeouts; --fail-with-body makes
# any other non-2xx answer an error.
curl --silent --show-error --fail-with-body \
  --retry 5 --retry-connrefused --retry-max-time 120 \
  -H 'Content-Type: application/x-www-form-urlencoded' \
  -H "Idempotency-Key: $key" \
  "${{auth[@]}}" \
  --data-binary "$body" \
  "$url"
echo
"#
    )
}

fn python(url: &str, auth: &Auth, requests: bool) -> String {
    let secret = format!("SECRET = os.environ[\"{SECRET_ENV}\"]\n");
    let (imports, secret_line, auth_fn) = match auth {
        Auth::None | Auth::Provider(_) => (
            "",
            String::new(),
            "def auth_headers():\n    return {}\n".to_owned(),
        ),
        Auth::Bearer => (
            "",
            secret,
            "def auth_headers():\n    return {\"Authorization\": \"Bearer \" + SECRET}\n"
                .to_owned(),
        ),
        Auth::Hmac {
            header,
            prefix,
            base64,
            timestamp_header,
        } => {
            let encode = if *base64 {
                "base64.b64encode(mac.digest()).decode()"
            } else {
                "mac.hexdigest()"
            };
            let body = match timestamp_header {
                Some(ts) => format!(
                    "def auth_headers():\n    ts = str(int(time.time()))\n    mac = hmac.new(SECRET.encode(), (ts + \".\" + BODY).encode(), hashlib.sha256)\n    return {{\"{ts}\": ts, \"{header}\": \"{prefix}\" + {encode}}}\n"
                ),
                None => format!(
                    "def auth_headers():\n    mac = hmac.new(SECRET.encode(), BODY.encode(), hashlib.sha256)\n    return {{\"{header}\": \"{prefix}\" + {encode}}}\n"
                ),
            };
            (
                if *base64 {
                    "import base64\nimport hashlib\nimport hmac\n"
                } else {
                    "import hashlib\nimport hmac\n"
                },
                secret,
                body,
            )
        }
    };
    let send = if requests {
        r#"def send():
    for attempt in range(6):
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Idempotency-Key": IDEMPOTENCY_KEY,
            **auth_headers(),
        }
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
    raise RuntimeError("gave up after 6 attempts")
"#
    } else {
        r#"def send():
    for attempt in range(6):
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Idempotency-Key": IDEMPOTENCY_KEY,
            **auth_headers(),
        }
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
    raise RuntimeError("gave up after 6 attempts")
"#
    };
    let client_import = if requests {
        "\nimport requests\n"
    } else {
        "import json\nimport urllib.error\nimport urllib.request\n"
    };
    let os = if matches!(auth, Auth::None) {
        ""
    } else {
        "import os\n"
    };
    format!(
        "{imports}{os}import time\n{client_import}\nURL = \"{url}\"\nBODY = \"{EXAMPLE_BODY}\"\nIDEMPOTENCY_KEY = \"{EXAMPLE_KEY}\"  # one key per order status change\n{secret_line}\n\n{auth_fn}\n\n{send}\n\nprint(send())\n"
    )
}

fn node(url: &str, auth: &Auth) -> String {
    let (import, secret, auth_fn) = match auth {
        Auth::None | Auth::Provider(_) => (
            "",
            String::new(),
            "function authHeaders() {\n  return {};\n}\n".to_owned(),
        ),
        Auth::Bearer => (
            "",
            format!("const SECRET = process.env.{SECRET_ENV};\n"),
            "function authHeaders() {\n  return { Authorization: `Bearer ${SECRET}` };\n}\n"
                .to_owned(),
        ),
        Auth::Hmac {
            header,
            prefix,
            base64,
            timestamp_header,
        } => {
            let enc = if *base64 { "base64" } else { "hex" };
            let body = match timestamp_header {
                Some(ts) => format!(
                    "function authHeaders() {{\n  const ts = Math.floor(Date.now() / 1000).toString();\n  const sig = createHmac(\"sha256\", SECRET).update(`${{ts}}.${{BODY}}`).digest(\"{enc}\");\n  return {{ \"{ts}\": ts, \"{header}\": \"{prefix}\" + sig }};\n}}\n"
                ),
                None => format!(
                    "function authHeaders() {{\n  const sig = createHmac(\"sha256\", SECRET).update(BODY).digest(\"{enc}\");\n  return {{ \"{header}\": \"{prefix}\" + sig }};\n}}\n"
                ),
            };
            (
                "import { createHmac } from \"node:crypto\";\n\n",
                format!("const SECRET = process.env.{SECRET_ENV};\n"),
                body,
            )
        }
    };
    format!(
        r#"{import}const URL = "{url}";
const BODY = "{EXAMPLE_BODY}";
const IDEMPOTENCY_KEY = "{EXAMPLE_KEY}"; // one key per order status change
{secret}
{auth_fn}
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function send() {{
  for (let attempt = 0; attempt < 6; attempt++) {{
    let response;
    try {{
      response = await fetch(URL, {{
        method: "POST",
        headers: {{
          "Content-Type": "application/x-www-form-urlencoded",
          "Idempotency-Key": IDEMPOTENCY_KEY,
          ...authHeaders(),
        }},
        body: BODY,
        signal: AbortSignal.timeout(10_000),
      }});
    }} catch (error) {{
      await sleep(Math.min(2 ** attempt, 30) * 1000); // connection error or timeout
      continue;
    }}
    if (response.status === 429 || response.status === 503) {{
      await sleep(Number(response.headers.get("Retry-After") ?? "1") * 1000);
      continue;
    }}
    if (!response.ok) {{
      throw new Error(`webhook refused: ${{response.status}} ${{await response.text()}}`);
    }}
    return (await response.json()).hit_id;
  }}
  throw new Error("gave up after 6 attempts");
}}

console.log(await send());
"#
    )
}

fn php(url: &str, auth: &Auth) -> String {
    let auth_fn = match auth {
        Auth::None | Auth::Provider(_) => {
            "function auth_headers(): array\n{\n    return [];\n}\n".to_owned()
        }
        Auth::Bearer => format!(
            "function auth_headers(): array\n{{\n    return ['Authorization: Bearer ' . getenv('{SECRET_ENV}')];\n}}\n"
        ),
        Auth::Hmac {
            header,
            prefix,
            base64,
            timestamp_header,
        } => {
            let sig = |msg: &str| {
                if *base64 {
                    format!(
                        "base64_encode(hash_hmac('sha256', {msg}, getenv('{SECRET_ENV}'), true))"
                    )
                } else {
                    format!("hash_hmac('sha256', {msg}, getenv('{SECRET_ENV}'))")
                }
            };
            match timestamp_header {
                Some(ts) => format!(
                    "function auth_headers(): array\n{{\n    $ts = (string) time();\n    $sig = {};\n    return [\"{ts}: $ts\", \"{header}: {prefix}$sig\"];\n}}\n",
                    sig("$ts . '.' . BODY")
                ),
                None => format!(
                    "function auth_headers(): array\n{{\n    $sig = {};\n    return [\"{header}: {prefix}$sig\"];\n}}\n",
                    sig("BODY")
                ),
            }
        }
    };
    format!(
        r#"
const URL = '{url}';
const BODY = '{EXAMPLE_BODY}';
const IDEMPOTENCY_KEY = '{EXAMPLE_KEY}'; // one key per order status change

{auth_fn}
function send(): string
{{
    for ($attempt = 0; $attempt < 6; $attempt++) {{
        $retryAfter = 1;
        $ch = curl_init(URL);
        curl_setopt_array($ch, [
            CURLOPT_POST => true,
            CURLOPT_POSTFIELDS => BODY,
            CURLOPT_RETURNTRANSFER => true,
            CURLOPT_TIMEOUT => 10,
            CURLOPT_HTTPHEADER => array_merge([
                'Content-Type: application/x-www-form-urlencoded',
                'Idempotency-Key: ' . IDEMPOTENCY_KEY,
            ], auth_headers()),
            CURLOPT_HEADERFUNCTION => function ($ch, $line) use (&$retryAfter) {{
                if (stripos($line, 'Retry-After:') === 0) {{
                    $retryAfter = (int) trim(substr($line, 12));
                }}
                return strlen($line);
            }},
        ]);
        $body = curl_exec($ch);
        $status = curl_getinfo($ch, CURLINFO_RESPONSE_CODE);
        curl_close($ch);
        if ($body === false) {{ // connection error or timeout
            sleep(min(2 ** $attempt, 30));
            continue;
        }}
        if ($status === 429 || $status === 503) {{
            sleep(max($retryAfter, 1));
            continue;
        }}
        if ($status < 200 || $status >= 300) {{
            throw new RuntimeException("webhook refused: $status $body");
        }}
        return json_decode($body, true)['hit_id'];
    }}
    throw new RuntimeException('gave up after 6 attempts');
}}

echo send(), PHP_EOL;
"#
    )
}

fn ruby(url: &str, auth: &Auth) -> String {
    let (requires, auth_fn) = match auth {
        Auth::None | Auth::Provider(_) => ("", "def auth_headers\n  {}\nend\n".to_owned()),
        Auth::Bearer => (
            "",
            format!(
                "def auth_headers\n  {{ 'Authorization' => \"Bearer #{{ENV.fetch('{SECRET_ENV}')}}\" }}\nend\n"
            ),
        ),
        Auth::Hmac {
            header,
            prefix,
            base64,
            timestamp_header,
        } => {
            let sig = |msg: &str| {
                if *base64 {
                    format!(
                        "Base64.strict_encode64(OpenSSL::HMAC.digest('SHA256', ENV.fetch('{SECRET_ENV}'), {msg}))"
                    )
                } else {
                    format!("OpenSSL::HMAC.hexdigest('SHA256', ENV.fetch('{SECRET_ENV}'), {msg})")
                }
            };
            let body = match timestamp_header {
                Some(ts) => format!(
                    "def auth_headers\n  ts = Time.now.to_i.to_s\n  {{ '{ts}' => ts, '{header}' => '{prefix}' + {} }}\nend\n",
                    sig("\"#{ts}.#{BODY}\"")
                ),
                None => format!(
                    "def auth_headers\n  {{ '{header}' => '{prefix}' + {} }}\nend\n",
                    sig("BODY")
                ),
            };
            (
                if *base64 {
                    "require 'base64'\nrequire 'openssl'\n"
                } else {
                    "require 'openssl'\n"
                },
                body,
            )
        }
    };
    format!(
        r#"{requires}require 'json'
require 'net/http'

URL = URI('{url}')
BODY = '{EXAMPLE_BODY}'
IDEMPOTENCY_KEY = '{EXAMPLE_KEY}' # one key per order status change

{auth_fn}
def send_webhook
  6.times do |attempt|
    headers = {{
      'Content-Type' => 'application/x-www-form-urlencoded',
      'Idempotency-Key' => IDEMPOTENCY_KEY
    }}.merge(auth_headers)
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
    raise "webhook refused: #{{response.code}} #{{response.body}}" unless response.is_a?(Net::HTTPSuccess)

    return JSON.parse(response.body)['hit_id']
  end
  raise 'gave up after 6 attempts'
end

puts send_webhook
"#
    )
}

fn go(url: &str, auth: &Auth) -> String {
    let (imports, auth_fn) = match auth {
        Auth::None | Auth::Provider(_) => {
            (vec![], "func setAuth(req *http.Request) {}\n".to_owned())
        }
        Auth::Bearer => (
            vec!["\"os\""],
            format!(
                "func setAuth(req *http.Request) {{\n\treq.Header.Set(\"Authorization\", \"Bearer \"+os.Getenv(\"{SECRET_ENV}\"))\n}}\n"
            ),
        ),
        Auth::Hmac {
            header,
            prefix,
            base64,
            timestamp_header,
        } => {
            let mut imports = vec!["\"crypto/hmac\"", "\"crypto/sha256\"", "\"os\""];
            let encode = if *base64 {
                imports.push("\"encoding/base64\"");
                "base64.StdEncoding.EncodeToString(mac.Sum(nil))"
            } else {
                imports.push("\"encoding/hex\"");
                "hex.EncodeToString(mac.Sum(nil))"
            };
            let body = match timestamp_header {
                Some(ts) => {
                    imports.push("\"strconv\"");
                    format!(
                        "func setAuth(req *http.Request) {{\n\tts := strconv.FormatInt(time.Now().Unix(), 10)\n\tmac := hmac.New(sha256.New, []byte(os.Getenv(\"{SECRET_ENV}\")))\n\tmac.Write([]byte(ts + \".\" + body))\n\treq.Header.Set(\"{ts}\", ts)\n\treq.Header.Set(\"{header}\", \"{prefix}\"+{encode})\n}}\n"
                    )
                }
                None => format!(
                    "func setAuth(req *http.Request) {{\n\tmac := hmac.New(sha256.New, []byte(os.Getenv(\"{SECRET_ENV}\")))\n\tmac.Write([]byte(body))\n\treq.Header.Set(\"{header}\", \"{prefix}\"+{encode})\n}}\n"
                ),
            };
            (imports, body)
        }
    };
    let mut all = vec![
        "\"encoding/json\"",
        "\"fmt\"",
        "\"io\"",
        "\"net/http\"",
        "\"strconv\"",
        "\"strings\"",
        "\"time\"",
    ];
    all.extend(imports);
    all.sort_unstable();
    all.dedup();
    let imports: String = all.iter().map(|i| format!("\t{i}\n")).collect();
    format!(
        r#"package main

import (
{imports})

const (
	url            = "{url}"
	body           = "{EXAMPLE_BODY}"
	idempotencyKey = "{EXAMPLE_KEY}" // one key per order status change
)

{auth_fn}
func send(client *http.Client) (string, error) {{
	for attempt := 0; attempt < 6; attempt++ {{
		req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
		if err != nil {{
			return "", err
		}}
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.Header.Set("Idempotency-Key", idempotencyKey)
		setAuth(req)
		resp, err := client.Do(req)
		if err != nil {{ // connection error or timeout
			time.Sleep(time.Duration(min(1<<attempt, 30)) * time.Second)
			continue
		}}
		answer, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == 429 || resp.StatusCode == 503 {{
			wait, err := strconv.Atoi(resp.Header.Get("Retry-After"))
			if err != nil || wait < 1 {{
				wait = 1
			}}
			time.Sleep(time.Duration(wait) * time.Second)
			continue
		}}
		if resp.StatusCode < 200 || resp.StatusCode > 299 {{
			return "", fmt.Errorf("webhook refused: %d %s", resp.StatusCode, answer)
		}}
		var accepted struct {{
			HitID string `json:"hit_id"`
		}}
		if err := json.Unmarshal(answer, &accepted); err != nil {{
			return "", err
		}}
		return accepted.HitID, nil
	}}
	return "", fmt.Errorf("gave up after 6 attempts")
}}

func min(a, b int) int {{
	if a < b {{
		return a
	}}
	return b
}}

func main() {{
	hitID, err := send(&http.Client{{Timeout: 10 * time.Second}})
	if err != nil {{
		panic(err)
	}}
	fmt.Println(hitID)
}}
"#
    )
}

fn java(url: &str, auth: &Auth) -> String {
    let auth_fn = match auth {
        Auth::None | Auth::Provider(_) => {
            "    static void auth(HttpRequest.Builder request) {}\n".to_owned()
        }
        Auth::Bearer => format!(
            "    static void auth(HttpRequest.Builder request) {{\n        request.header(\"Authorization\", \"Bearer \" + System.getenv(\"{SECRET_ENV}\"));\n    }}\n"
        ),
        Auth::Hmac {
            header,
            prefix,
            base64,
            timestamp_header,
        } => {
            let encode = if *base64 {
                "java.util.Base64.getEncoder().encodeToString(digest)"
            } else {
                "java.util.HexFormat.of().formatHex(digest)"
            };
            let (message, ts_line) = match timestamp_header {
                Some(ts) => (
                    "ts + \".\" + BODY",
                    format!(
                        "        String ts = Long.toString(System.currentTimeMillis() / 1000);\n        request.header(\"{ts}\", ts);\n"
                    ),
                ),
                None => ("BODY", String::new()),
            };
            format!(
                "    static void auth(HttpRequest.Builder request) throws Exception {{\n{ts_line}        Mac mac = Mac.getInstance(\"HmacSHA256\");\n        mac.init(new SecretKeySpec(System.getenv(\"{SECRET_ENV}\").getBytes(StandardCharsets.UTF_8), \"HmacSHA256\"));\n        byte[] digest = mac.doFinal(({message}).getBytes(StandardCharsets.UTF_8));\n        request.header(\"{header}\", \"{prefix}\" + {encode});\n    }}\n"
            )
        }
    };
    format!(
        r#"import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;

public class SendWebhook {{
    static final String URL = "{url}";
    static final String BODY = "{EXAMPLE_BODY}";
    static final String IDEMPOTENCY_KEY = "{EXAMPLE_KEY}"; // one key per order status change

{auth_fn}
    static String send(HttpClient client) throws Exception {{
        for (int attempt = 0; attempt < 6; attempt++) {{
            HttpRequest.Builder request = HttpRequest.newBuilder(URI.create(URL))
                .timeout(Duration.ofSeconds(10))
                .header("Content-Type", "application/x-www-form-urlencoded")
                .header("Idempotency-Key", IDEMPOTENCY_KEY)
                .POST(HttpRequest.BodyPublishers.ofString(BODY));
            auth(request);
            HttpResponse<String> response;
            try {{
                response = client.send(request.build(), HttpResponse.BodyHandlers.ofString());
            }} catch (java.io.IOException e) {{ // connection error or timeout
                Thread.sleep(Math.min(1L << attempt, 30) * 1000);
                continue;
            }}
            int status = response.statusCode();
            if (status == 429 || status == 503) {{
                long wait = response.headers().firstValue("Retry-After").map(Long::parseLong).orElse(1L);
                Thread.sleep(Math.max(wait, 1) * 1000);
                continue;
            }}
            if (status < 200 || status > 299) {{
                throw new IllegalStateException("webhook refused: " + status + " " + response.body());
            }}
            return response.body().replaceAll(".*\"hit_id\"\\s*:\\s*\"([^\"]+)\".*", "$1");
        }}
        throw new IllegalStateException("gave up after 6 attempts");
    }}

    public static void main(String[] args) throws Exception {{
        HttpClient client = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(10)).build();
        System.out.println(send(client));
    }}
}}
"#
    )
}

fn csharp(url: &str, auth: &Auth) -> String {
    let auth_fn = match auth {
        Auth::None | Auth::Provider(_) => {
            "static void Auth(HttpRequestMessage request) { }\n".to_owned()
        }
        Auth::Bearer => format!(
            "static void Auth(HttpRequestMessage request) =>\n    request.Headers.TryAddWithoutValidation(\"Authorization\", \"Bearer \" + Environment.GetEnvironmentVariable(\"{SECRET_ENV}\"));\n"
        ),
        Auth::Hmac {
            header,
            prefix,
            base64,
            timestamp_header,
        } => {
            let encode = if *base64 {
                "Convert.ToBase64String(digest)"
            } else {
                "Convert.ToHexString(digest).ToLowerInvariant()"
            };
            let (message, ts_line) = match timestamp_header {
                Some(ts) => (
                    "ts + \".\" + Body",
                    format!(
                        "    var ts = DateTimeOffset.UtcNow.ToUnixTimeSeconds().ToString();\n    request.Headers.TryAddWithoutValidation(\"{ts}\", ts);\n"
                    ),
                ),
                None => ("Body", String::new()),
            };
            format!(
                "static void Auth(HttpRequestMessage request)\n{{\n{ts_line}    using var hmac = new HMACSHA256(Encoding.UTF8.GetBytes(Environment.GetEnvironmentVariable(\"{SECRET_ENV}\")!));\n    var digest = hmac.ComputeHash(Encoding.UTF8.GetBytes({message}));\n    request.Headers.TryAddWithoutValidation(\"{header}\", \"{prefix}\" + {encode});\n}}\n"
            )
        }
    };
    format!(
        r#"using System.Net;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;

const string Url = "{url}";
const string Body = "{EXAMPLE_BODY}";
const string IdempotencyKey = "{EXAMPLE_KEY}"; // one key per order status change

using var client = new HttpClient {{ Timeout = TimeSpan.FromSeconds(10) }};
Console.WriteLine(await Send(client));

{auth_fn}
static async Task<string> Send(HttpClient client)
{{
    for (var attempt = 0; attempt < 6; attempt++)
    {{
        using var request = new HttpRequestMessage(HttpMethod.Post, Url)
        {{
            Content = new StringContent(Body, Encoding.UTF8, "application/x-www-form-urlencoded"),
        }};
        request.Headers.Add("Idempotency-Key", IdempotencyKey);
        Auth(request);
        HttpResponseMessage response;
        try
        {{
            response = await client.SendAsync(request);
        }}
        catch (Exception e) when (e is HttpRequestException or TaskCanceledException)
        {{
            await Task.Delay(TimeSpan.FromSeconds(Math.Min(1 << attempt, 30))); // connection error or timeout
            continue;
        }}
        var answer = await response.Content.ReadAsStringAsync();
        if (response.StatusCode is HttpStatusCode.TooManyRequests or HttpStatusCode.ServiceUnavailable)
        {{
            var wait = response.Headers.RetryAfter?.Delta ?? TimeSpan.FromSeconds(1);
            await Task.Delay(wait);
            continue;
        }}
        if (!response.IsSuccessStatusCode)
        {{
            throw new InvalidOperationException($"webhook refused: {{(int)response.StatusCode}} {{answer}}");
        }}
        return JsonDocument.Parse(answer).RootElement.GetProperty("hit_id").GetString()!;
    }}
    throw new InvalidOperationException("gave up after 6 attempts");
}}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookpipe_common::Catalogue;

    fn streams() -> Catalogue {
        Catalogue::from_yaml(
            "streams:
  - id: 522ed95e-9f07-45f6-a0b7-28bf2d0315e5
    table: p.d.open
    timezone: UTC
  - id: 9f1c2d3e-4b5a-4c6d-8e7f-0a1b2c3d4e5f
    table: p.d.bearer
    timezone: UTC
    auth: {type: bearer, secrets: [{env: T}]}
  - id: 0b7f3a52-9c1d-4e8a-b6f0-2d4c6e8a0b1c
    table: p.d.signed
    timezone: UTC
    auth: {type: hmac-sha256, header: X-Sig, prefix: 'sha256=', timestamp_header: X-Ts, secrets: [{env: S}]}
  - id: 5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b
    table: p.d.signed64
    timezone: UTC
    auth: {type: hmac-sha256, encoding: base64, secrets: [{file: /s}]}
",
        )
        .unwrap()
    }

    #[test]
    fn zz_dump() {
        let Ok(dir) = std::env::var("SNIPPET_DUMP") else {
            return;
        };
        std::fs::create_dir_all(&dir).unwrap();
        for stream in streams().streams() {
            for lang in Lang::ALL {
                let code = snippet(lang, stream, "https://hooks.example.com/");
                std::fs::write(
                    format!(
                        "{dir}/{}-{lang}",
                        stream.table.to_string().replace('.', "_")
                    ),
                    code,
                )
                .unwrap();
            }
        }
    }

    #[test]
    fn every_snippet_has_the_url_body_key_auth_and_retry_handling() {
        for stream in streams().streams() {
            for lang in Lang::ALL {
                let code = snippet(lang, stream, "https://hooks.example.com/");
                let what = format!("{lang} for {}", stream.table);
                assert!(
                    code.contains(&format!("https://hooks.example.com/ds/{}", stream.id)),
                    "{what}: url"
                );
                assert!(code.contains(EXAMPLE_BODY), "{what}: body");
                assert!(
                    !code.contains(&stream.table.to_string()),
                    "{what}: the table is internal"
                );
                assert!(code.contains(EXAMPLE_KEY), "{what}: key");
                assert!(code.contains("Idempotency-Key"), "{what}: key header");
                assert!(
                    code.contains("application/x-www-form-urlencoded"),
                    "{what}: content type"
                );
                assert!(
                    code.contains("Retry-After") || lang == Lang::Curl,
                    "{what}: Retry-After"
                );
                assert!(code.contains("429") || lang == Lang::Curl, "{what}: 429");
                assert!(code.contains("503") || lang == Lang::Curl, "{what}: 503");
                match &stream.auth {
                    None => assert!(!code.contains(SECRET_ENV), "{what}: no secret needed"),
                    Some(AuthSpec::Bearer { .. }) => {
                        assert!(code.contains("Bearer "), "{what}: bearer");
                        assert!(code.contains(SECRET_ENV), "{what}: secret from env");
                    }
                    Some(AuthSpec::HmacSha256(h)) => {
                        assert!(code.contains(&h.header), "{what}: signature header");
                        assert!(code.contains(&h.prefix), "{what}: prefix");
                        if let Some(ts) = &h.timestamp_header {
                            assert!(code.contains(ts.as_str()), "{what}: timestamp header");
                        }
                        assert!(code.contains(SECRET_ENV), "{what}: secret from env");
                    }
                    Some(other) => panic!("{what}: no test catalogue stream is {}", other.kind()),
                }
            }
        }
    }

    #[test]
    fn curl_relies_on_curls_own_retry_which_honours_retry_after() {
        let stream = streams().streams().next().unwrap().clone();
        let code = snippet(Lang::Curl, &stream, "http://127.0.0.1:8080");
        assert!(code.starts_with("#!/usr/bin/env bash\n"));
        assert!(code.contains("--retry 5") && code.contains("--fail-with-body"));
    }

    #[test]
    fn languages_parse_by_name_and_common_aliases() {
        for lang in Lang::ALL {
            assert_eq!(lang.name().parse::<Lang>().unwrap(), lang);
        }
        assert_eq!("C#".parse::<Lang>().unwrap(), Lang::CSharp);
        assert_eq!("nodejs".parse::<Lang>().unwrap(), Lang::Node);
        assert!(
            "cobol"
                .parse::<Lang>()
                .unwrap_err()
                .contains("python-stdlib")
        );
    }
}
